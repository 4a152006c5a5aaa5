"""The training loop: ``train`` runs (or continues) one run into its folder, epoch by epoch;
``WeightEMA`` is the weight average it can evaluate and checkpoint (``--ema``)."""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoints import _checkpoint, _save_json, commit_epoch, reconcile_run, resumed_metrics
from .distributed import _all_sum, _rng_state, _set_rng_state, _world
from .model import _load_data, build_model, clamp_time_constants, make_optimizer, make_scheduler
from .steps import TBPTT_DECODERS, evaluate, global_batches, train_batch


class WeightEMA:
    """Exponential moving average of a model's parameters and buffers (``--ema``): after every
    optimizer step avg = decay * avg + (1 - decay) * w. Averaging damps the epoch-to-epoch
    swings of a small network trained at a high learning rate, so the epoch chosen on
    validation data is less a matter of luck. Time constants stay >= dt (a convex combination)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay must be in (0, 1); got {decay!r}")
        self.decay = decay
        # torch's AveragedModel does the update (a foreach lerp, bit for bit the per-tensor lerp of
        # the checkpoints written before it); use_buffers: frozen time constants are averaged too.
        self._averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        # Its first update copies the weights: taken here, the average starts at them and every step lerps.
        self._averaged.update_parameters(model)
        self.model = self._averaged.module.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        self._averaged.update_parameters(model)

    def state_dict(self) -> dict:  # the network's own keys: the "ema" of a checkpoint loads into build_model's
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def train(cfg: dict, out: Path, resume: dict = None, quiet: bool = False, time_budget: float = None) -> dict:
    """Train (or continue) one run into folder ``out``; returns the metrics dict."""
    rank, world = _world()
    if cfg.get("tbptt") and world > 1:
        raise ValueError("--tbptt trains in one process (its chunks bypass DDP's forward); run without torchrun")
    if cfg.get("tbptt") and cfg["decode"] not in TBPTT_DECODERS:
        raise ValueError(f"tbptt needs decode in {TBPTT_DECODERS}; got {cfg['decode']!r}")
    device = torch.device(cfg["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg["dtype"])
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])

    train_ds, test_ds, info = _load_data(cfg)
    val_ds = info.pop("val", None)  # epochs are chosen on it when present, else on the test set
    for key in ("input_size", "num_classes", "seq_len"):
        cfg[key] = info[key]
    cfg["data_info"] = {k: v for k, v in info.items() if k not in ("input_size", "num_classes", "seq_len")}
    cfg["n_train"], cfg["n_test"] = len(train_ds), len(test_ds)
    if val_ds is not None:
        cfg["n_val"] = len(val_ds)
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])
    model = build_model(cfg).to(device)
    cfg["params"] = sum(p.numel() for p in model.parameters())
    cfg["world_size"] = world
    # Different random initial membranes per rank; the model itself is identical on every rank.
    torch.manual_seed(cfg["seed"] + rank)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    loader_gen = torch.Generator().manual_seed(cfg["seed"])
    metrics = {"epochs": [], "best_test_acc": None, "best_epoch": None, "wall_time_s": 0.0, "params": cfg["params"],
               "selected_on": "val" if val_ds is not None else "test"}
    start_epoch, best = 1, -1.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        rng = resume["rng_state"]
        _set_rng_state(rng["ranks"][rank] if world > 1 else rng, loader_gen)
        # "best_test_acc": the key of checkpoints written before validation splits existed
        start_epoch, best = resume["epoch"] + 1, resume.get("best_score", resume.get("best_test_acc"))
        metrics = resumed_metrics(out, resume)
    # After the resumed weights are loaded: an average switched on at resume (--ema) starts from them.
    ema = WeightEMA(model, cfg["ema"]) if cfg.get("ema") else None
    if ema is not None and resume is not None and "ema" in resume:
        ema.load_state_dict(resume["ema"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _save_json(out / "config.json", cfg)
        if resume is not None:  # what a kill after the resumed checkpoint left unwritten
            reconcile_run(out, resume, metrics)
    net = model

    def after_step():  # after every optimizer step taken
        clamp_time_constants(model)
        if ema is not None:
            ema.update(model)

    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from tqdm.auto import tqdm

    show = not quiet and rank == 0 and sys.stderr.isatty()
    for epoch in range(start_epoch, cfg["epochs"] + 1):
        t0, cpu0 = time.perf_counter(), time.process_time()
        model.train()
        batches = global_batches(len(train_ds), cfg["batch_size"], world, loader_gen)
        local = [b[rank::world] for b in batches]
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=local)
        totals = torch.zeros(3, dtype=torch.float64)
        skipped = steps = 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg['epochs']}", disable=not show, leave=False)
        for x, y in bar:
            x, y = x.to(device, dtype), y.to(device)
            loss_sum, count, correct, n_steps, n_skipped = train_batch(model, opt, x, y, cfg, after_step, net, world)
            steps, skipped = steps + n_steps, skipped + n_skipped
            totals += torch.tensor([loss_sum.item(), count.item(), correct.item()], dtype=torch.float64)
            bar.set_postfix(loss=f"{loss_sum.item() / max(count.item(), 1):.4f}")
        totals = _all_sum(totals.to(device)).cpu()
        if steps and skipped == steps:
            raise FloatingPointError(
                f"training diverged: every optimizer step of epoch {epoch} had a non-finite gradient "
                f"(BPTT overflowing {cfg['dtype']}); try --tbptt K, a smaller --lr, --dtype float64 or a shorter --seq-len"
                + (f"; {out / 'last.pt'} holds the last good epoch" if epoch > 1 else ""))
        lr = opt.param_groups[0]["lr"]
        sched.step()
        evaluated = model if ema is None else ema.model
        result = evaluate(evaluated, test_ds, cfg, device, dtype, rank, world)
        val = evaluate(evaluated, val_ds, cfg, device, dtype, rank, world) if val_ds is not None else None
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        n = max(totals[1].item(), 1.0)
        entry = {"epoch": epoch, "loss": totals[0].item() / n, "train_acc": totals[2].item() / n,
                 "test_acc": result["test_acc"], "test_loss": result["test_loss"],
                 "test_acc_full": result["test_acc_full"], "fr": result["fr"],
                 "fr_layers": result["fr_layers"], "time_s": elapsed, "cpu_time_s": cpu, "lr": lr,
                 "skipped_steps": skipped}
        if val is not None:
            entry.update(val_acc=val["test_acc"], val_loss=val["test_loss"])
        metrics["epochs"].append(entry)
        metrics["wall_time_s"] += elapsed
        metrics["cpu_time_s"] = metrics.get("cpu_time_s", 0.0) + cpu  # (absent from runs before it was recorded)
        score = entry["val_acc"] if val is not None else entry["test_acc"]
        improved = score > best
        if improved:  # best_test_acc: the test accuracy of the chosen epoch
            best = score
            metrics["best_test_acc"], metrics["best_epoch"] = entry["test_acc"], epoch
            if val is not None:
                metrics["best_val_acc"] = score
        rng = _rng_state(loader_gen)
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, rng)
            rng = dict(ranks[0], ranks=ranks)
        if rank == 0:
            commit_epoch(out, _checkpoint(model, opt, sched, epoch, cfg, rng, best, ema, metrics), improved)
            fr = "" if entry["fr"] is None else f" Fr {entry['fr']:.4f}"
            va = "" if val is None else f" val_acc {entry['val_acc']:.4f}"
            skip = f" (skipped {skipped} of {steps} steps: non-finite gradients)" if skipped else ""
            print(f"epoch {epoch:4d} loss {entry['loss']:.4f} train_acc {entry['train_acc']:.4f}{va} "
                  f"test_loss {entry['test_loss']:.4f} test_acc {entry['test_acc']:.4f}{fr} "
                  f"lr {lr:.3g} {elapsed:.1f}s{skip}", flush=True)
        if time_budget is not None and metrics["wall_time_s"] >= time_budget:
            if rank == 0:
                print(f"time budget of {time_budget:g} s reached after epoch {epoch}", flush=True)
            break
    return metrics
