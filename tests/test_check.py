"""srnn_fast.check() / python -m srnn_fast check: every backend here against the reference."""
import io
import runpy
import sys

import pytest
import torch

import srnn_fast
from srnn_fast import selfcheck as check_module
from srnn_fast import cuda_sim, scan


def test_every_backend_here_passes_with_a_row_per_dtype():
    out = io.StringIO()
    assert srnn_fast.check(file=out)
    rows = [line for line in out.getvalue().splitlines() if line.startswith("| ") and "| backend |" not in line
            and "---" not in line]
    labels = {label for label, _, _, _ in check_module._targets()}
    if "cpp" in srnn_fast.available_backends():
        from srnn_fast import _C

        assert {f"cpp ({isa})" for isa in _C.supported_cpu_capabilities()} <= labels
    if cuda_sim.SIM_ERROR is None:
        assert "cuda_sim" in labels
    assert len(rows) == 2 * len(check_module._targets())
    assert {row.split(" | ")[2] for row in rows} == {"float64", "float32"}
    assert all(row.endswith("| pass |") for row in rows) and "all passed" in out.getvalue()


def test_a_wrong_backend_fails(monkeypatch):
    """A backend whose final membrane is off by 1e-6 of its largest value (1000x float64's
    tolerance), and one that raises: FAIL rows, check() False."""
    real = scan.kernels_for

    def off(name):
        k = real(name)
        if name != "cpp":
            return k

        def fwd(*args):
            s, u_T, eta_T, u_seq, bits = k.fwd(*args)
            return s, u_T + 1e-6 * u_T.abs().max(), eta_T, u_seq, bits
        return scan.Kernels(fwd, k.bwd)

    monkeypatch.setattr(scan, "kernels_for", off)
    cases = check_module.CASES[:1]
    rows = [r for r in check_module.check_rows(cases) if r.backend.startswith("cpp")]
    if not rows:
        pytest.skip("the cpp backend is not built")
    assert all(not r.passed for r in rows if r.dtype == "float64")
    assert all("(u)" in r.worst for r in rows if r.dtype == "float64")

    def broken(name):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(scan, "kernels_for", broken)
    out = io.StringIO()
    assert not srnn_fast.check(cases, file=out)
    assert "RuntimeError: kernel exploded" in out.getvalue() and "FAILED" in out.getvalue()


def test_command_exit_status(monkeypatch):
    """python -m srnn_fast check exits 1 when check() fails (.ci/smoke.py runs the real one)."""
    monkeypatch.setattr(sys, "argv", ["srnn_fast", "check"])
    monkeypatch.setattr(srnn_fast, "check", lambda: False)
    with pytest.raises(SystemExit) as e:
        runpy.run_module("srnn_fast", run_name="__main__")
    assert e.value.code == 1
