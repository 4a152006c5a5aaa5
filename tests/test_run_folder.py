"""A run folder survives a kill at any write (issue 50): the trainer is stopped at each write of
its run in turn, resumed, and must leave the files an uninterrupted run leaves, bit for bit;
and what that rests on: _atomic_write, the time budget, a fork's checks, a resumed DDP run; and
every committed run folder restoring exactly into today's trainer."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srnn_fast import train as T
from srnn_fast.data.synthetic import write_tiny
from srnn_fast.train import checkpoints, loop
from srnn_fast.train.checkpoints import _atomic_write

# Four epochs chosen on validation images: epochs 1-3 improve (best.pt written), epoch 4 does not.
ARGS = ["--task", "smnist", "--encoding", "window", "--window", "28", "--batch-size", "16", "--val-fraction", "0.25",
        "--threads", "1", "--quiet", "--epochs", "4"]
FILES = ["best.pt", "config.json", "last.pt", "metrics.csv", "metrics.json"]
COMMITTED_RUNS = sorted(p.parent for p in (Path(__file__).parent.parent / "results" / "runs").glob("*/last.pt"))


class Killed(BaseException):
    """The process ends here: no handler of the trainer catches a BaseException of its own."""


class Clock:
    """The trainer's clock: every reading one second after the last, so each epoch's time_s and
    cpu_time_s are the same in every run and metrics.json can be compared byte for byte."""

    def __init__(self):
        self.t = 0.0

    def perf_counter(self):
        self.t += 1.0
        return self.t

    process_time = perf_counter


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tiny("smnist", root)
    return root


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    monkeypatch.setattr(loop, "time", Clock())


def _train(data_dir, out, *extra):
    return T.main(ARGS + ["--data-dir", str(data_dir), "--out", str(out)] + list(extra))


def _contents(run):
    """Every file of a run folder: the JSON and CSV files as bytes, the checkpoints as loaded."""
    return {p.name: torch.load(p, weights_only=False) if p.suffix == ".pt" else p.read_bytes()
            for p in sorted(run.iterdir())}


def _assert_same_run(run, reference):
    got, want = _contents(run), _contents(reference)
    assert list(got) == list(want) == FILES  # and no temporary file left by a killed writer
    for name in FILES:
        _equal(got[name], want[name], name)


def _equal(a, b, where):
    """Deep equality, tensors and arrays bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    elif hasattr(a, "dtype") and hasattr(a, "shape"):  # numpy's RNG state
        assert (a == b).all(), where
    else:
        assert a == b, (where, a, b)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run, and the names of the files it writes, in order."""
    out = tmp_path_factory.mktemp("reference") / "run"
    writes = []
    real = checkpoints._atomic_write

    def recording(path, write):
        writes.append(path.name)
        real(path, write)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "time", Clock())
        mp.setattr(checkpoints, "_atomic_write", recording)
        assert _train(data_dir, out) == 0
    # config.json, then per epoch last.pt (the commit point), best.pt when it improved, the metrics;
    # epochs that improve and one that does not, so every kind of write is killed
    improved, plain = ["last.pt", "best.pt", "metrics.json", "metrics.csv"], ["last.pt", "metrics.json", "metrics.csv"]
    assert writes == ["config.json"] + 3 * improved + plain
    return out, writes


def _killed_at(n, real):
    """A writer that is killed during the n-th write: its temporary file written, not yet renamed."""
    count = [0]

    def write(path, fn):
        count[0] += 1
        if count[0] == n:
            fn(path.with_name(f".{path.name}.tmp{os.getpid()}"))
            raise Killed(f"write {n}: {path.name}")
        real(path, fn)
    return write


@pytest.mark.parametrize("n", range(1, 17))  # the 16 writes of the reference run
def test_killed_at_any_write_resumes_to_the_uninterrupted_run(n, data_dir, reference, tmp_path, monkeypatch):
    """Killed during write n (each write of each epoch in turn), then resumed (or, killed before its
    first checkpoint, started again): metrics.json, metrics.csv, config.json, best.pt and last.pt
    equal the uninterrupted run's, bit for bit, and no temporary file is left."""
    ref, writes = reference
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoints, "_atomic_write", _killed_at(n, checkpoints._atomic_write))
    with pytest.raises(Killed, match=f"write {n}: {writes[n - 1]}"):
        _train(data_dir, out)
    monkeypatch.undo()
    monkeypatch.setattr(loop, "time", Clock())
    if (out / "last.pt").exists():
        assert T.main(["--resume", str(out), "--quiet"]) == 0
    else:  # killed before the first epoch committed: the command is run again
        assert _train(data_dir, out) == 0
    _assert_same_run(out, ref)


@pytest.mark.parametrize("k", range(1, 5))
def test_killed_again_while_resuming(k, data_dir, reference, tmp_path, monkeypatch):
    """Killed during epoch 2's best.pt (after its last.pt), then killed again during the k-th write
    of the resume that mends the folder (config.json, best.pt, metrics.json, metrics.csv): the
    next resume still ends as the uninterrupted run."""
    ref, writes = reference
    out = tmp_path / "run"
    real = checkpoints._atomic_write
    monkeypatch.setattr(checkpoints, "_atomic_write", _killed_at(7, real))
    with pytest.raises(Killed, match="write 7: best.pt"):
        _train(data_dir, out)
    monkeypatch.setattr(checkpoints, "_atomic_write", _killed_at(k, real))
    with pytest.raises(Killed, match=f"write {k}: " + ["config.json", "best.pt", "metrics.json", "metrics.csv"][k - 1]):
        T.main(["--resume", str(out), "--quiet"])
    monkeypatch.setattr(checkpoints, "_atomic_write", real)
    monkeypatch.setattr(loop, "time", Clock())
    assert T.main(["--resume", str(out), "--quiet"]) == 0
    _assert_same_run(out, ref)


def test_sigkilled_after_the_commit_point_resumes_to_the_uninterrupted_run(data_dir, reference, tmp_path):
    """A real SIGKILL in the window of issue 50: epoch 2's last.pt committed, its best.pt and metrics
    not yet written. The resumed folder equals the uninterrupted run's."""
    ref, writes = reference
    out = tmp_path / "run"
    kill_at = [i for i, name in enumerate(writes, 1) if name == "last.pt"][1] + 1  # the write after epoch 2's last.pt
    script = f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from srnn_fast.train import checkpoints, loop, main
from test_run_folder import ARGS, Clock
loop.time = Clock()
real, count = checkpoints._atomic_write, [0]
def write(path, fn):
    count[0] += 1
    if count[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, fn)
checkpoints._atomic_write = write
main(ARGS + ["--data-dir", {str(data_dir)!r}, "--out", {str(out)!r}])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1]
    assert T.main(["--resume", str(out), "--quiet"]) == 0
    _assert_same_run(out, ref)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def half_then_fail(p):
        p.write_text("new, cut sh")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    _atomic_write(path, lambda p: p.write_text("new"))
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_time_budget_stops_and_the_run_resumes_exactly(data_dir, reference, tmp_path, capsys):
    """--time-budget S stops after the epoch in which the run's training wall time (over all its
    sessions) reaches S; resumed, the run ends as the uninterrupted one. Each epoch takes 2 s of
    the test's clock (two readings)."""
    ref, _ = reference
    out = tmp_path / "run"
    assert _train(data_dir, out, "--time-budget", "4") == 0
    assert "time budget of 4 s reached after epoch 2" in capsys.readouterr().out
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 2
    assert T.main(["--resume", str(out), "--quiet", "--time-budget", "6"]) == 0
    assert "time budget of 6 s reached after epoch 3" in capsys.readouterr().out
    assert T.main(["--resume", str(out), "--quiet"]) == 0
    _assert_same_run(out, ref)


def test_fork_refuses_a_best_checkpoint_newer_than_the_resumed_one(data_dir, tmp_path, capsys):
    """--resume RUN/x.pt --out NEW, where RUN's best.pt is from a later epoch than x.pt: NEW would
    start with a best epoch outside its history, so the fork is refused and nothing is written."""
    run = tmp_path / "run"
    assert _train(data_dir, run, "--epochs", "1") == 0
    older = run / "epoch1.pt"
    older.write_bytes((run / "last.pt").read_bytes())
    best = torch.load(run / "best.pt", weights_only=False)
    torch.save(dict(best, epoch=3), run / "best.pt")  # as if epochs 2 and 3 ran and 3 was the best
    with pytest.raises(ValueError, match="is from epoch 3, after the resumed checkpoint's epoch 1"):
        T.fork_run(run, tmp_path / "direct", 1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        T.main(["--resume", str(older), "--out", str(tmp_path / "fork"), "--quiet"])
    assert exc.value.code == 2 and "is from epoch 3, after the resumed checkpoint's epoch 1" in capsys.readouterr().err
    assert not (tmp_path / "fork").exists() and not (tmp_path / "direct").exists()


@pytest.mark.slow
def test_ddp_resume_is_bit_exact(data_dir, tmp_path):
    """Two processes (gloo): 2 epochs, then resumed by two processes to 3, equal 3 uninterrupted
    epochs bit for bit (weights, optimizer, each rank's RNG state, metrics)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + (os.getpid() + len(args)) % 1000), "-m", "srnn_fast.train"] + list(args)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    common = ["--task", "smnist", "--encoding", "window", "--window", "28", "--batch-size", "16", "--threads", "1",
              "--quiet", "--data-dir", str(data_dir)]
    torchrun(*common, "--epochs", "3", "--out", str(tmp_path / "full"))
    torchrun(*common, "--epochs", "2", "--out", str(tmp_path / "part"))
    torchrun("--resume", str(tmp_path / "part"), "--epochs", "3", "--quiet")
    full, part = (torch.load(tmp_path / r / "last.pt", weights_only=False) for r in ("full", "part"))
    assert part["epoch"] == 3 and part["config"]["world_size"] == 2 and len(part["rng_state"]["ranks"]) == 2
    assert not torch.equal(part["rng_state"]["ranks"][0]["torch"], part["rng_state"]["ranks"][1]["torch"])
    for key in ("model", "optimizer", "scheduler", "rng_state", "best_score"):
        _equal(part[key], full[key], key)
    timeless = [{k: v for k, v in e.items() if k not in ("time_s", "cpu_time_s")} for e in full["metrics"]["epochs"]]
    _equal([{k: v for k, v in e.items() if k not in ("time_s", "cpu_time_s")} for e in part["metrics"]["epochs"]],
           timeless, "metrics")


@pytest.mark.skipif(not COMMITTED_RUNS, reason="no committed run folders beside the tests")
@pytest.mark.parametrize("run_dir", COMMITTED_RUNS, ids=lambda p: p.name)
def test_committed_run_folders_restore_exactly(run_dir):
    """Every committed run folder's last.pt restores into today's trainer as --resume restores it:
    network, weight average, optimizer, schedule and RNG state load strictly and read back equal,
    bit for bit (so a resumed epoch starts where the run stopped)."""
    from srnn_fast.train.distributed import _rng_state, _set_rng_state

    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    model = T.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    opt = T.make_optimizer(model, cfg)
    sched = T.make_scheduler(opt, cfg)  # made before the loads, as train() does: it sets the lr of epoch 0
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    _equal(model.state_dict(), ckpt["model"], "model")
    _equal(opt.state_dict(), ckpt["optimizer"], "optimizer")
    _equal({k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"},
           {k: v for k, v in ckpt["scheduler"].items() if k != "lr_lambdas"}, "scheduler")
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ckpt["optimizer"]["param_groups"]]
    assert ("ema" in ckpt) == bool(cfg.get("ema"))
    if cfg.get("ema"):
        ema = T.WeightEMA(model, cfg["ema"])
        ema.load_state_dict(ckpt["ema"])
        _equal(ema.state_dict(), ckpt["ema"], "ema")
    gen = torch.Generator()
    with torch.random.fork_rng():
        state = ckpt["rng_state"]
        _set_rng_state(state, gen)
        _equal(_rng_state(gen), {**state, "cuda": _rng_state(gen)["cuda"]}, "rng_state")
