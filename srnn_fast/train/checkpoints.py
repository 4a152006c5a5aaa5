"""Checkpoints and run folders: what a run folder holds (config.json, metrics.json,
metrics.csv, best.pt, last.pt), how its files are written, found, evaluated and forked.

An epoch's files commit as a whole. Each file is written atomically (a temporary file renamed),
and last.pt is written first: it is the commit point, and it holds the epoch's metrics too, so
whatever a kill leaves unwritten after it (best.pt, metrics.json, metrics.csv) is written again
from it when the run resumes (``reconcile_run``). A kill before it leaves the previous epoch's
files, which the resumed run continues from; it trains the lost epoch again, bit for bit."""
from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from .model import DATA_OPTIONS, _load_data, build_model
from .steps import evaluate

METRIC_FIELDS = ("epoch", "loss", "train_acc", "val_acc", "val_loss", "test_acc", "test_loss", "test_acc_full", "fr",
                 "time_s", "cpu_time_s", "lr", "skipped_steps")

_TMP = ".tmp"  # .NAME.tmpPID: the temporary file _atomic_write renames to NAME


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename tmp to ``path``: a reader sees the old file or the new one, never
    part of one; a write that fails leaves the old file and no temporary file (a killed process
    leaves its temporary file, which ``reconcile_run`` removes)."""
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename: after a machine crash, too, old or new
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_json(path: Path, obj) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def _save_csv(path: Path, epochs: list) -> None:
    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS + ("fr_layers",))
            w.writeheader()
            for e in epochs:
                row = {k: e.get(k) for k in METRIC_FIELDS}
                row["fr_layers"] = ";".join(f"{v:.6g}" for v in e["fr_layers"]) if e["fr_layers"] else ""
                w.writerow(row)
    _atomic_write(path, write)


def _checkpoint(model, opt, sched, epoch, cfg, rng, best, ema, metrics):
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "epoch": epoch, "config": cfg, "rng_state": rng, "best_score": best,
            "metrics": metrics}  # the run's metrics up to this epoch: what reconcile_run writes again
    if ema is not None:  # the weights that were evaluated (--evaluate loads them)
        ckpt["ema"] = ema.state_dict()
    return ckpt


def commit_epoch(out: Path, ckpt: dict, improved: bool) -> None:
    """Write an epoch's files into run folder ``out``: last.pt, the commit point, first; then
    best.pt when the epoch ``improved``, metrics.json and metrics.csv, all from ``ckpt``."""
    _atomic_write(out / "last.pt", lambda p: torch.save(ckpt, p))
    if improved:
        _atomic_write(out / "best.pt", lambda p: torch.save(ckpt, p))
    _save_metrics(out, ckpt["metrics"])


def _save_metrics(out: Path, metrics: dict) -> None:
    _save_json(out / "metrics.json", metrics)
    _save_csv(out / "metrics.csv", metrics["epochs"])


def resumed_metrics(out: Path, ckpt: dict) -> dict:
    """The run's metrics as they stood when ``ckpt`` was committed: the ones it holds, or for a
    checkpoint written before checkpoints held them (the committed runs), the rows of
    ``out``/metrics.json up to its epoch."""
    if "metrics" in ckpt:
        return ckpt["metrics"]
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["epochs"] = [e for e in metrics["epochs"] if e["epoch"] <= ckpt["epoch"]]
    return metrics


def reconcile_run(out: Path, ckpt: dict, metrics: dict) -> None:
    """Bring run folder ``out`` to what the run wrote when it committed ``ckpt`` (a kill may have
    stopped it after that, at any write): best.pt as that epoch left it, metrics.json and
    metrics.csv from ``metrics`` (``resumed_metrics``), and no temporary file of a killed writer.
    Idempotent, so a kill while it runs is mended by the next resume."""
    for tmp in out.glob(f".*{_TMP}[0-9]*"):
        tmp.unlink()
    best = out / "best.pt"
    if metrics["best_epoch"] == ckpt["epoch"] and (
            not best.exists() or load_checkpoint(best, "--resume")["epoch"] != ckpt["epoch"]):
        _atomic_write(best, lambda p: torch.save(ckpt, p))  # the epoch improved; killed before best.pt
    _save_metrics(out, metrics)


def find_checkpoint(path: str, flag: str = "--resume", name: str = "last.pt") -> Path:
    """The checkpoint that ``flag`` names: the file, or a run folder's ``name``."""
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise FileNotFoundError(f"{flag}: no checkpoint at {p} (give a run folder holding {name}, or the file)")
    return p


def load_checkpoint(path: Path, flag: str) -> dict:
    """A checkpoint written by the trainer; any other file is a ValueError that names it and ``flag``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:  # what torch.load meets in other files
        raise ValueError(f"{flag} {path}: not a checkpoint of srnn_fast.train ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "epoch"} <= ckpt.keys():
        raise ValueError(f"{flag} {path}: not a checkpoint of srnn_fast.train (no model, config and epoch in it)")
    return ckpt


def evaluate_checkpoint(path: str, data_overrides: dict, device: str = "cpu") -> dict:
    """Test (and validation) accuracy, loss and Fr of a checkpoint (a run folder means its
    best.pt), on the run's data with ``data_overrides`` applied (e.g. {"context": 300})."""
    p = find_checkpoint(path, "--evaluate", "best.pt")
    ckpt = load_checkpoint(p, "--evaluate")
    cfg = dict(ckpt["config"], device=device)
    unknown = sorted(set(data_overrides) - set(DATA_OPTIONS[cfg["task"]]))
    if unknown:
        raise ValueError(f"--evaluate: data option(s) {unknown} do not apply to task {cfg['task']}")
    cfg["data"] = dict(cfg["data"], **data_overrides)
    _, test_ds, info = _load_data(cfg)
    val_ds = info.pop("val", None)
    model = build_model(cfg).to(device)
    model.load_state_dict(ckpt.get("ema", ckpt["model"]))  # the weights that were evaluated in training
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    out = {"checkpoint": str(p), "epoch": ckpt["epoch"], "data": cfg["data"],
           **evaluate(model, test_ds, cfg, torch.device(device), dtype, 0, 1)}
    if val_ds is not None:
        v = evaluate(model, val_ds, cfg, torch.device(device), dtype, 0, 1)
        out.update(val_acc=v["test_acc"], val_loss=v["test_loss"])
    return out


def fork_run(source: Path, out: Path, epoch: int) -> None:
    """Start run folder ``out`` as a copy of run ``source`` at ``epoch`` (the resumed checkpoint's):
    its metrics (cut to ``epoch`` when training resumes) and best.pt, so the fork's best epoch is
    chosen over the shared history and its own epochs. ``source`` is not touched. A fork stopped
    before its first checkpoint (no last.pt yet) is started again."""
    if (out / "last.pt").exists():
        raise ValueError(f"--out {out} already holds a run; continue it with --resume {out}")
    if not (source / "metrics.json").exists():
        raise ValueError(f"--resume {source}: no metrics.json beside the checkpoint, so there is no run to fork")
    best = source / "best.pt"
    if best.exists():
        best_epoch = load_checkpoint(best, "--resume")["epoch"]
        if best_epoch > epoch:
            raise ValueError(f"{best} is from epoch {best_epoch}, after the resumed checkpoint's epoch {epoch}: "
                             f"fork from {source / 'last.pt'} or a later checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "metrics.csv", "best.pt"):
        if (source / name).exists():
            _atomic_write(out / name, lambda p, name=name: shutil.copyfile(source / name, p))
