"""Training time per epoch of a task's preset, per backend, from a few batches (an epoch of
S-MNIST with the reference backend takes hours, so it is extrapolated, not run).

    python bench/epoch_time.py --task smnist --val-fraction 0.1 --batches 30 --threads 1 --data-dir DATA
    python bench/epoch_time.py --task smnist --preset mnist_256_128 --backends cpp --batches 20 ...

Takes the training CLI's flags (python -m srnn_fast.train: the preset, its overrides, the data
options) plus ``--backends`` and ``--batches``. Each backend gets the same network (same seed)
and the same batches of real data; the backends take turns batch by batch, so a change of load
on a shared machine hits both alike. Timed per batch: a training step (forward, backward,
clipping, optimizer step, or the chunks of truncated BPTT: the trainer's own ``train_batch``), a
forward pass in eval mode (validation and test), and loading + encoding the batch. After one
untimed warm-up batch per backend the medians are extrapolated to an epoch as the trainer
runs it:

    epoch = n_train / B x (load + train step) + (n_val + n_test) / B x (load + eval pass)

``--backends cpp,reference,reference+ftz``: a name with ``+ftz`` runs that backend with
``torch.set_flush_denormal(True)``. The fused float32 kernels flush subnormal numbers themselves;
PyTorch's own ops (the reference) do not, and on Intel CPUs, where each subnormal operand costs a
microcode assist, a trained network's reference step is several times slower for it
(``--weights RUN``).

Like the trainer, it keeps freed memory for reuse (train.keep_freed_memory); ``--malloc-defaults``
leaves glibc malloc as it is, to measure what that saves.
Both wall time and the process's CPU time are reported (CPU time is the steadier of the two
when other jobs share the cores). ``--json FILE`` also writes the figures as JSON.
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

import srnn_fast
from srnn_fast import data as data_mod
from srnn_fast import train as T
from srnn_fast._cli import user_errors
from srnn_fast.train.checkpoints import _save_json
from srnn_fast.train.cli import _positive


def _clock() -> tuple:
    return time.perf_counter(), time.process_time()


def _since(start: tuple) -> tuple:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextlib.contextmanager
def _flush_subnormals(on: bool):
    """torch.set_flush_denormal(on) while the block runs (main has checked that the CPU can); off again after it,
    even if it raises."""
    torch.set_flush_denormal(on)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def main(argv=None) -> int:
    parser = T.make_parser()
    parser.prog = "python bench/epoch_time.py"
    parser.add_argument("--backends", default="cpp,reference",
                        help="comma-separated backends to compare; a backend named with '+ftz' (e.g. reference+ftz) "
                             "runs with torch.set_flush_denormal(True), to tell what subnormal numbers cost it")
    parser.add_argument("--batches", type=_positive(int), default=30, help="timed batches per backend")
    parser.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    parser.add_argument("--weights", metavar="RUN",
                        help="start every backend from this run's trained weights (its last.pt, or a checkpoint "
                             "file) instead of a fresh network: a trained network's backward meets subnormal "
                             "numbers a fresh one does not (give the run's preset and size flags)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc malloc as it is (the trainer keeps freed memory: train.keep_freed_memory)")
    args = parser.parse_args(argv)
    keeps_freed = False if args.malloc_defaults else T.keep_freed_memory()
    backends = args.backends.split(",")
    for backend in backends:
        name = backend.removesuffix("+ftz")
        if name not in srnn_fast.available_backends() + ["auto"]:
            parser.error(f"--backends: unknown backend {name!r} (available: {srnn_fast.available_backends()})")
    if any(backend.endswith("+ftz") for backend in backends):  # refuse before the data and networks are loaded
        if not torch.set_flush_denormal(True):
            parser.error("--backends: '+ftz' needs flush-to-zero, which this CPU does not support")
        torch.set_flush_denormal(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = T.config_from_args(args, parser)
    with user_errors(parser, data_mod.DataError):  # missing or unusable data: one line, as the trainer
        train_ds, test_ds, info = data_mod.build_datasets(cfg["task"], cfg["data_dir"], seed=cfg["data_seed"],
                                                          **cfg["data"])
    val_ds = info.pop("val", None)
    cfg.update(input_size=info["input_size"], num_classes=info["num_classes"])
    B = cfg["batch_size"]
    n_train, n_eval = len(train_ds), len(test_ds) + (len(val_ds) if val_ds is not None else 0)
    if n_train < B:
        parser.error(f"the training set ({n_train}) is smaller than one batch ({B})")
    dtype = getattr(torch, cfg["dtype"])
    with user_errors(parser, FileNotFoundError, ValueError):
        checkpoint = T.load_checkpoint(T.find_checkpoint(args.weights, "--weights"), "--weights") if args.weights else None
    trained = checkpoint["model"] if checkpoint else None
    nets, opts = {}, {}
    for backend in backends:
        torch.manual_seed(cfg["seed"])
        nets[backend] = T.build_model(dict(cfg, backend=backend.removesuffix("+ftz")))
        if args.weights:
            nets[backend].load_state_dict(trained)
        opts[backend] = T.make_optimizer(nets[backend], cfg)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    loader = torch.utils.data.DataLoader(train_ds, batch_size=B, sampler=order)
    times = {b: {"train": [], "eval": []} for b in backends}
    load = []
    from tqdm.auto import tqdm

    batches = iter(loader)
    for i in tqdm(range(args.batches + 1), desc="batches", disable=args.quiet or not sys.stderr.isatty()):
        start = _clock()
        try:
            x, y = next(batches)
        except StopIteration:
            parser.error(f"--batches {args.batches} is more than the {len(loader) - 1} batches the training set has")
        x = x.to(dtype)
        if i:
            load.append(_since(start))
        for backend in backends:
            net, opt = nets[backend], opts[backend]
            with _flush_subnormals(backend.endswith("+ftz")):
                net.train()
                start = _clock()
                T.train_batch(net, opt, x, y, cfg, lambda: T.clamp_time_constants(net))
                step = _since(start)
                net.eval()
                start = _clock()
                with torch.no_grad():
                    net(x)
                forward = _since(start)
            if i:  # batch 0 warms up
                times[backend]["train"].append(step)
                times[backend]["eval"].append(forward)

    def median(pairs, k):
        return statistics.median(p[k] for p in pairs)

    result = {"date": date.today().isoformat(), "cpu": _cpu_model(), "threads": torch.get_num_threads(),
              "malloc_keeps_freed": keeps_freed,
              # the CPU path that ran (srnn_fast.cpu_capability: from the per-instruction-set builds on)
              "capability": srnn_fast.cpu_capability() if hasattr(srnn_fast, "cpu_capability") else None,
              "task": cfg["task"], "preset": cfg["preset"], "hidden_sizes": cfg["hidden_sizes"],
              "dense_sizes": cfg.get("dense_sizes") or [],
              "batch_size": B, "n_train": n_train, "n_eval": n_eval, "batches": args.batches, "weights": args.weights,
              # a run's last.pt moves on while the run trains: say which epoch's weights were timed
              "weights_epoch": checkpoint.get("epoch") if checkpoint else None,
              "train_batches_per_epoch": math.ceil(n_train / B), "eval_batches_per_epoch": math.ceil(n_eval / B),
              "load_s": {k: median(load, j) for j, k in enumerate(("wall", "cpu"))}, "backends": {}}
    for backend in backends:
        r = {}
        for j, clock in enumerate(("wall", "cpu")):
            step, fwd, ld = median(times[backend]["train"], j), median(times[backend]["eval"], j), median(load, j)
            r[clock] = {"train_step_s": step, "eval_batch_s": fwd,
                        "epoch_s": n_train / B * (ld + step) + n_eval / B * (ld + fwd)}
        result["backends"][backend] = r
    print(f"{result['cpu']}, {result['threads']} thread(s), {cfg['task']} preset {cfg['preset']} "
          f"{T.hidden_widths(cfg)}, batch {B}, {n_train} training + {n_eval} validation/test sequences, "
          f"medians of {args.batches} batches (load + encode {result['load_s']['wall']:.3f} s wall per batch)")
    print(f"{'backend':<10} {'train step s':>13} {'eval batch s':>13} {'epoch wall':>11} {'epoch cpu':>10}")
    for backend, r in result["backends"].items():
        print(f"{backend:<10} {r['wall']['train_step_s']:>13.3f} {r['wall']['eval_batch_s']:>13.3f} "
              f"{r['wall']['epoch_s'] / 60:>9.1f} m {r['cpu']['epoch_s'] / 60:>8.1f} m")
    if len(backends) > 1:
        first = backends[0]
        for other in backends[1:]:
            ratio = result["backends"][other]["cpu"]["epoch_s"] / result["backends"][first]["cpu"]["epoch_s"]
            print(f"{other} / {first}: {ratio:.2f}x the CPU time per epoch")
    if args.json_out:
        _save_json(Path(args.json_out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
