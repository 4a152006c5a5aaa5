"""srnn_fast.show_config() and python -m srnn_fast: the report a bug report includes."""
import os
import subprocess
import sys

import pytest

import srnn_fast
from srnn_fast import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ext = pytest.mark.skipif(_ops.EXTENSION_ERROR is not None, reason="srnn_fast._C is not built")


def rows():
    from srnn_fast._config import config_rows

    return dict(config_rows())


def test_quiet_returns_the_text_without_printing(capsys):
    text = srnn_fast.show_config(quiet=True)
    assert capsys.readouterr().out == ""
    assert text.splitlines()[0].split()[:2] == ["srnn_fast:", srnn_fast.__version__]


def test_prints_what_it_returns(capsys):
    text = srnn_fast.show_config()
    assert capsys.readouterr().out == text + "\n"


def test_versions_and_backends():
    import torch

    r = rows()
    assert r["srnn_fast"].startswith(srnn_fast.__version__ + " ")
    assert r["torch"].startswith(torch.__version__ + " ")
    assert r["backends available"] == ", ".join(srnn_fast.available_backends())


@needs_ext
def test_cpu_kernels_in_use_and_supported():
    from srnn_fast import _C

    r = rows()
    assert r["compiled extension"].startswith("loaded, CPU")
    assert r["CPU kernels in use"].split()[0] == srnn_fast.cpu_capability()
    assert r["CPU kernels this CPU runs"] == ", ".join(_C.supported_cpu_capabilities())


@needs_ext
def test_cpu_kernels_chosen_in_process_say_so():
    from srnn_fast import _C

    supported, previous = _C.supported_cpu_capabilities(), _C.cpu_capability()
    if len(supported) < 2:
        pytest.skip("this CPU runs one build only")
    _C.set_cpu_capability(supported[-1])
    try:
        assert rows()["CPU kernels in use"] == f"{supported[-1]} (set by srnn_fast._C.set_cpu_capability)"
    finally:
        _C.set_cpu_capability(previous)


def test_a_bad_cpu_capability_is_reported_not_raised():
    """The report must come out when something is broken: a value the kernels refuse is
    shown as the error (in a fresh process: the choice is read once)."""
    code = "import srnn_fast; print(srnn_fast.show_config(quiet=True))"
    env = dict(os.environ, SRNN_FAST_CPU_CAPABILITY="avx9000")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    line = next(row for row in p.stdout.splitlines() if row.startswith("CPU kernels in use:"))
    if _ops.EXTENSION_ERROR is None:
        assert "error: RuntimeError" in line and "avx9000" in line, line
    else:
        assert line.endswith("none (the extension is not loaded)"), line


def test_data_folder_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "qtdb").mkdir()
    monkeypatch.setenv("SRNN_FAST_DATA", str(tmp_path))
    assert rows()["data folder"] == f"{tmp_path} (from $SRNN_FAST_DATA), exists, holds: qtdb"
    monkeypatch.setenv("SRNN_FAST_DATA", str(tmp_path / "missing"))
    assert rows()["data folder"] == f"{tmp_path / 'missing'} (from $SRNN_FAST_DATA), does not exist"
    monkeypatch.delenv("SRNN_FAST_DATA")
    assert rows()["data folder"].startswith("none ($SRNN_FAST_DATA is not set")


def test_the_cache_folder_is_not_created(tmp_path, monkeypatch):
    monkeypatch.setenv("SRNN_FAST_CACHE", str(tmp_path / "cache"))
    assert rows()["cache folder"] == f"{tmp_path / 'cache'} (from $SRNN_FAST_CACHE)"
    assert not (tmp_path / "cache").exists()


def test_python_m_srnn_fast_prints_the_report(tmp_path):
    env = dict(os.environ, SRNN_FAST_DATA=str(tmp_path), PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "srnn_fast"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    labels = [line.split(":")[0] for line in p.stdout.splitlines()]
    for label in ("srnn_fast", "torch", "backends available", "CPU kernels in use", "CPU kernels this CPU runs",
                  "compiled extension", "data folder"):
        assert label in labels, p.stdout
    assert "data folder:" in p.stdout and f"{tmp_path} (from $SRNN_FAST_DATA), exists" in p.stdout
