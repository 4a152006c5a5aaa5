"""Every command ends on an error its user can fix (no such run or checkpoint, a file that is not
one, missing data) with one ``PROG: error: MESSAGE`` line on stderr and exit status 1 (argparse's
own, for a wrong flag: 2), never a traceback."""
import os
import subprocess
import sys

import pytest

from srnn_fast import report, segment
from srnn_fast import train as T
from srnn_fast.data import download
from srnn_fast.data.synthetic import write_tiny

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import epoch_time  # noqa: E402
import run as bench_run  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "garbage.pt").write_text("not a checkpoint\n")
    (root / "empty").mkdir()
    write_tiny("smnist", root / "data")
    return root


def _one_error_line(capsys, prog, message):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--resume", "{nowhere}"], "--resume: no checkpoint at {nowhere} (give a run folder holding last.pt"),
    (["--resume", "{files}/garbage.pt"], "--resume {files}/garbage.pt: not a checkpoint of srnn_fast.train"),
    (["--resume", "{files}/empty"], "--resume: no checkpoint at {files}/empty/last.pt"),
    (["--evaluate", "{nowhere}"], "--evaluate: no checkpoint at {nowhere} (give a run folder holding best.pt"),
    (["--evaluate", "{files}/garbage.pt"], "--evaluate {files}/garbage.pt: not a checkpoint of srnn_fast.train"),
    (["--task", "smnist", "--data-dir", "{nowhere}", "--out", "{files}/run"], "data folder {nowhere}"),
], ids=["resume-nowhere", "resume-garbage", "resume-empty-folder", "evaluate-nowhere", "evaluate-garbage",
        "no-data"])
def test_train(argv, message, files, capsys):
    fill = dict(files=files, nowhere=files / "nowhere")
    with pytest.raises(SystemExit) as exc:
        T.main([a.format(**fill) for a in argv])
    assert exc.value.code == 1
    _one_error_line(capsys, "python -m srnn_fast.train", message.format(**fill))


def test_report(files, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main([str(files / "nowhere"), "--out", str(files / "report")])
    assert exc.value.code == 1
    _one_error_line(capsys, "python -m srnn_fast.report", f"run folder {files / 'nowhere'} does not exist")


def test_segment(files, capsys):
    with pytest.raises(SystemExit) as exc:
        segment.main([str(files / "rec"), "--checkpoint", str(files / "garbage.pt"), "--out", str(files / "seg")])
    assert exc.value.code == 1
    _one_error_line(capsys, "python -m srnn_fast.segment", f"--checkpoint {files / 'garbage.pt'}: not a checkpoint")


def test_download(files, capsys):
    with pytest.raises(SystemExit) as exc:
        download.main(["mnist", "--verify", "--data-dir", str(files / "nowhere")])
    assert exc.value.code == 1
    _one_error_line(capsys, "python -m srnn_fast.data.download", f"data folder {files / 'nowhere'}")


@pytest.mark.parametrize("argv, message", [
    (["--data-dir", "{nowhere}"], "data folder {nowhere}"),
    (["--data-dir", "{files}/data", "--weights", "{nowhere}"], "--weights: no checkpoint at {nowhere} (give"),
    (["--data-dir", "{files}/data", "--weights", "{files}/garbage.pt"], "--weights {files}/garbage.pt: not a checkpoint"),
], ids=["no-data", "weights-nowhere", "weights-garbage"])
def test_bench_epoch_time(argv, message, files, capsys):
    fill = dict(files=files, nowhere=files / "nowhere")
    common = ["--task", "smnist", "--encoding", "window", "--window", "28", "--batch-size", "8", "--batches", "1",
              "--backends", "reference", "--threads", "1", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        epoch_time.main(common + [a.format(**fill) for a in argv])
    assert exc.value.code == 1
    _one_error_line(capsys, "python bench/epoch_time.py", message.format(**fill))


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "ecg,lstm"], "--shapes: unknown shape 'lstm'; choose from ecg, shd, smnist"),
    (["--backends", "cpp,nope"], "--backends: unknown ['nope']"),
    (["--cpu-capability", "avx1024"], "--cpu-capability: avx1024 not among the builds this CPU runs"),
], ids=["shapes", "backends", "cpu-capability"])
def test_bench_run(argv, message, tmp_path, capsys):
    """bench/run.py's wrong flag values end as argparse's own do: the usage, then one error line, exit status 2."""
    with pytest.raises(SystemExit) as exc:
        bench_run.main(["--quick", "--out", str(tmp_path)] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: python bench/run.py"), err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("python bench/run.py: error: ") and message in last, err
    assert not any(tmp_path.iterdir())  # nothing measured or written


@pytest.mark.parametrize("flag", ["--resume", "--evaluate"])
def test_python_m_train_prints_no_traceback(flag, tmp_path):
    """The issue's own commands, run as a user runs them."""
    proc = subprocess.run([sys.executable, "-m", "srnn_fast.train", flag, str(tmp_path / "nonexistent")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"python -m srnn_fast.train: error: {flag}: no checkpoint at ") \
        and proc.stderr.count("\n") == 1, proc.stderr
