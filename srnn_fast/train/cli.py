"""Training CLI for the four tasks of the method, SRNNs and baselines: ``python -m srnn_fast.train``.

The command line (``make_parser``), the run configuration it gives (``config_from_args``),
and ``main``: train, resume, fork or evaluate a run."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .._cli import user_errors
from ..data import DataError
from ..data.mnist import ENCODINGS as MNIST_ENCODINGS
from ..modules import INIT_STATES, REC_INITS, TRAIN_TAU
from .checkpoints import evaluate_checkpoint, find_checkpoint, fork_run, load_checkpoint
from .distributed import _world
from .loop import train
from .model import (ALL_DATA_OPTIONS, BASELINES, DATA_OPTIONS, OPTIMIZERS, PRESET_KEYS, PRESETS, SRNN_MODELS,
                    TASKS)
from .steps import TBPTT_DECODERS


def _pair(text: str) -> list:
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MEAN,STD (e.g. 20,5); got {text!r}") from None
    if mean <= 0 or std < 0:
        raise argparse.ArgumentTypeError(f"expected a positive mean and a non-negative std; got {text!r}")
    return [mean, std]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1); got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1); got {text!r}")
    return value


def _sizes(text: str) -> list:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths (e.g. 120,100); got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"layer widths must be positive; got {text!r}")
    return sizes


def _dense_sizes(text: str) -> list:
    """--dense-sizes: widths as _sizes, or "none" for no dense layers (to drop a preset's)."""
    return [] if text.strip().lower() == "none" else _sizes(text)


def _clip_norm(text: str) -> float:
    if text.lower() == "none":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a positive norm, or 0 / none for no clipping; got {text!r}")
    return value


def _milestones(text: str) -> list:
    try:
        epochs = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs (e.g. 25,50,100); got {text!r}") from None
    if min(epochs) < 1 or any(b <= a for a, b in zip(epochs, epochs[1:])):
        raise argparse.ArgumentTypeError(f"expected increasing positive epochs (e.g. 25,50,100); got {text!r}")
    return epochs


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}; got {text!r}") from None
        if not v > 0 or (kind is float and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}; got {text!r}")
        return v
    return parse


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m srnn_fast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=TASKS, help="benchmark task (required unless --resume)")
    p.add_argument("--model", choices=SRNN_MODELS + BASELINES, default="adaptive",
                   help="adaptive / lif / relu SRNN, or a baseline")
    p.add_argument("--out", help="run folder (default runs/<task>_<model>)")
    p.add_argument("--evaluate", metavar="RUN",
                   help="evaluate a run folder's best.pt (or a checkpoint file) on its test set and exit; data "
                        "options given here (e.g. --context) replace the run's; prints one JSON line")
    p.add_argument("--resume", help="run folder or checkpoint (last.pt) to continue; only --epochs, "
                   "--device, --threads, --quiet and --time-budget may change, and --ema may switch weight "
                   "averaging on for a run without it (the average starts from the resumed weights)")
    p.add_argument("--data-dir", help="folder with qtdb/, mnist/, shd/ (default $SRNN_FAST_DATA)")
    p.add_argument("--epochs", type=_positive(int))
    p.add_argument("--batch-size", type=_positive(int), help="global batch (split across DDP ranks)")
    p.add_argument("--lr", type=_positive(float), help="learning rate of weights and biases")
    p.add_argument("--lr-tau", type=_positive(float), help="learning rate of the time constants")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), help="presets: adam; psmnist_64_256_256: adamax")
    p.add_argument("--preset", choices=tuple(PRESETS),
                   help="the network and training settings to start from (default: the task's own)")
    p.add_argument("--lr-step", type=_positive(int), help="StepLR: decay every this many epochs")
    p.add_argument("--lr-milestones", type=_milestones,
                   help="MultiStepLR instead of StepLR: decay at these epochs, e.g. 25,50,100,150")
    p.add_argument("--lr-gamma", type=_positive(float), help="decay factor of StepLR / MultiStepLR")
    p.add_argument("--lr-linear", type=_positive(int), metavar="N",
                   help="instead of StepLR / MultiStepLR: the learning rates fall linearly to 0 over N epochs")
    p.add_argument("--hidden-sizes", type=_sizes, help="recurrent layer widths, e.g. 120,100")
    p.add_argument("--dense-sizes", type=_dense_sizes,
                   help="SRNN models: widths of feed-forward spiking layers after the recurrent ones, e.g. 256, "
                        "or none (presets: none; psmnist_64_256_256: 256)")
    p.add_argument("--rec-init", choices=REC_INITS, help="SRNN models: initial recurrent weights (presets: "
                   "orthogonal; psmnist_64_256_256: zeros)")
    p.add_argument("--readout", choices=("integrator", "spiking", "membrane"))
    p.add_argument("--decode", choices=("count", "last", "max", "mean", "per_step"))
    p.add_argument("--tau-m-init", type=_pair, help="MEAN,STD of the membrane time constants")
    p.add_argument("--tau-adp-init", type=_pair, help="MEAN,STD of the adaptation time constants")
    p.add_argument("--train-tau", choices=TRAIN_TAU, default="all",
                   help="time constants that train: all (tau_m, tau_adp, tau_out), none, m (tau_m and tau_out) "
                        "or adp (tau_adp); frozen ones keep their initial values (the method's Fig. 6b ablation)")
    p.add_argument("--tau-out-init", type=_pair, help="MEAN,STD of the readout time constants")
    p.add_argument("--b0", type=_positive(float),
                   help="baseline threshold (presets: 0.01; the S-MNIST / PS-MNIST RBF presets: 0.1)")
    p.add_argument("--tbptt", type=_positive(int), metavar="K",
                   help="truncated BPTT: an optimizer step every K time steps of a batch, on the loss of the "
                        "output decoded so far, the state carried on detached (SRNN models; decode count, mean, "
                        "last or max; one process)")
    p.add_argument("--ema", type=_fraction, metavar="DECAY",
                   help="evaluate and checkpoint an exponential moving average of the weights, updated after "
                        "every step with this decay in (0, 1) (e.g. 0.99); training itself is unchanged")
    p.add_argument("--weight-decay", type=_positive(float), metavar="W",
                   help="decoupled weight decay (AdamW's) of the weight matrices: w <- w * (1 - lr * W) before "
                        "each step; biases, thresholds and time constants are not decayed (default: none)")
    p.add_argument("--grad-clip", type=_clip_norm,
                   help="clip the gradient's global norm to this before each step; 0 or none: no clipping "
                        "(presets: none, S-MNIST / PS-MNIST 1)")
    p.add_argument("--surrogate", choices=("gaussian", "multi_gaussian"),
                   help="surrogate gradient of the spike (presets: gaussian; psmnist_64_256_256: multi_gaussian)")
    p.add_argument("--init-state", choices=INIT_STATES,
                   help="initial membranes: U(0,1) in training and 0 in evaluation (uniform), U(0,1) in both "
                        "(uniform_always; evaluation draws them under a fixed seed), U(0,b0) in both (uniform_b0) "
                        "or 0 (zeros); presets: uniform, S-MNIST / PS-MNIST uniform_always, psmnist_64_256_256 "
                        "uniform_b0")
    p.add_argument("--backend", default="auto", choices=("auto", "cuda", "triton", "cpp", "reference"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (DDP ranks use cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and initial states")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data (ECG record split, PS-MNIST permutation)")
    p.add_argument("--threads", type=_positive(int), help="torch.set_num_threads per process")
    p.add_argument("--time-budget", type=_positive(float),
                   help="stop after the epoch in which the training wall time passes this many seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("data options (passed to srnn_fast.data.build_datasets)")
    g.add_argument("--seq-len", type=_positive(int), help="ecg: steps per sequence")
    g.add_argument("--threshold", type=_positive(float), help="ecg: level-crossing threshold")
    g.add_argument("--test-fraction", type=_positive(float), help="ecg: fraction of records held out")
    g.add_argument("--val-fraction", type=_fraction,
                   help="ecg: fraction of the training records, smnist/psmnist: of the training images, held "
                        "out for validation; the best epoch is then chosen on it, not on the test set")
    g.add_argument("--npz", help="ecg: preprocessed .npz instead of the wfdb records")
    g.add_argument("--test-npz", help="ecg: preprocessed .npz that is the whole test set (bring-your-own split): "
                   "every sequence of --npz (or every record) then trains")
    g.add_argument("--context", type=int, help="ecg: steps of the record's preceding signal (unlabelled) "
                   "before each window, so the network enters it running (default 0)")
    g.add_argument("--filter", choices=("none", "bandpass"),
                   help="ecg: filter of the raw leads before normalisation (bandpass: baseline removal + 40 Hz low-pass)")
    g.add_argument("--augment", type=int, metavar="K",
                   help="ecg: add K randomly distorted copies (gain, time stretch, noise) of each training record")
    g.add_argument("--stride", type=_positive(int), help="ecg: steps between window starts (default seq_len)")
    g.add_argument("--cache-dir", help="ecg: folder for the preprocessed-record cache")
    g.add_argument("--encoding", choices=MNIST_ENCODINGS, help="smnist/psmnist")
    g.add_argument("--population", type=_positive(int), help="smnist/psmnist: RBF/Poisson population size")
    g.add_argument("--window", type=_positive(int), help="smnist/psmnist: pixels per step")
    g.add_argument("--gain", type=_positive(float), help="smnist/psmnist: factor on the encoded input (the method's "
                   "RBF densities: srnn_fast.data.mnist.rbf_density_gain(population), ~31 for 80)")
    g.add_argument("--limit", type=_positive(int), help="smnist/psmnist/shd: first N samples of each split")
    g.add_argument("--frame-ms", type=int, choices=(4, 10), help="shd: frame length")
    return p


def config_from_args(args, parser) -> dict:
    if args.task is None:
        parser.error("--task is required (or --resume a run)")
    name = args.preset or args.task
    preset = PRESETS[name]
    if args.task not in preset["tasks"]:
        parser.error(f"--preset {name} is for --task {' / '.join(preset['tasks'])}, not {args.task}")
    if sum(v is not None for v in (args.lr_step, args.lr_milestones, args.lr_linear)) > 1:
        parser.error("--lr-step, --lr-milestones and --lr-linear are three schedules: give one")
    if args.tbptt is not None and args.model in BASELINES:
        parser.error(f"--tbptt applies to the SRNN models ({', '.join(SRNN_MODELS)}), not {args.model}")
    for flag, value in (("--dense-sizes", args.dense_sizes), ("--rec-init", args.rec_init)):
        if value is not None and args.model in BASELINES:
            parser.error(f"{flag} applies to the SRNN models ({', '.join(SRNN_MODELS)}), not {args.model}")
    if args.train_tau != "all" and args.model in BASELINES:
        parser.error(f"--train-tau applies to the SRNN models ({', '.join(SRNN_MODELS)}); {args.model} has no "
                     "time constants")
    cfg = {"task": args.task, "model": args.model, "preset": name}
    for key in PRESET_KEYS:
        value = getattr(args, key)
        cfg[key] = preset[key] if value is None else value
    # a schedule asked for replaces the preset's
    if args.lr_step is not None:
        cfg["lr_milestones"], cfg["lr_linear"] = None, None
    elif args.lr_milestones is not None:
        cfg["lr_linear"] = None
    elif args.lr_linear is not None:
        cfg["lr_milestones"] = None
    if args.model in BASELINES:
        cfg["readout"] = "linear"
        cfg["tbptt"], cfg["dense_sizes"] = None, []
        if cfg["decode"] != "per_step":
            cfg["decode"] = "last"  # baselines classify from the final step
    if cfg["tbptt"] is not None and cfg["decode"] not in TBPTT_DECODERS:
        parser.error(f"--tbptt needs a sequence-level decoder ({', '.join(TBPTT_DECODERS)}); "
                     f"decode is {cfg['decode']}")
    data = dict(preset["data"])
    for key in ALL_DATA_OPTIONS:
        value = getattr(args, key)
        if value is None:
            continue
        if key not in DATA_OPTIONS[args.task]:
            parser.error(f"--{key.replace('_', '-')} does not apply to --task {args.task} "
                         f"(its data options: {', '.join('--' + k.replace('_', '-') for k in DATA_OPTIONS[args.task])})")
        data[key] = value
    cfg.update(data=data, neuron=args.model if args.model in SRNN_MODELS else None,
               ema=args.ema, weight_decay=args.weight_decay or 0.0, train_tau=args.train_tau,
               backend=args.backend,
               device=args.device, dtype=args.dtype, seed=args.seed, data_seed=args.data_seed,
               data_dir=args.data_dir, threads=args.threads)
    return cfg


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse rather than give it back to the OS.

    A training step allocates and frees tensors of tens of MB ([T, B, H] spikes, their
    gradients, x_proj). glibc serves blocks that large by mmap and unmaps them when freed, so
    every step page-faults again on each 4 KB and the kernel zeroes each page: a fifth of an
    S-MNIST training step's CPU time and half of an evaluation batch's
    (results/mnist/malloc_step.json). With mmap off (M_MMAP_MAX = 0) and trimming off
    (M_TRIM_THRESHOLD) they come from the heap and are reused; the price is that the process
    keeps its peak memory. Process-wide, so entry points call it (the trainer's,
    bench/epoch_time.py's), not the library on import. Returns whether it took effect (False
    where the C library is not glibc).
    """
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":  # the mallopt parameters below are glibc's
        return False
    mallopt = ctypes.CDLL(None).mallopt
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc malloc.h
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    # What the user can fix ends in one line: missing or unusable data, no checkpoint or not one,
    # data options that do not apply, a run that diverged (its message says what to try).
    with user_errors(parser, DataError, FileNotFoundError, ValueError, FloatingPointError):
        return _run(args, parser)


def _run(args, parser) -> int:
    keep_freed_memory()
    if args.evaluate:
        if args.threads:
            torch.set_num_threads(args.threads)
        overrides = {k: getattr(args, k) for k in ALL_DATA_OPTIONS if getattr(args, k) is not None}
        print(json.dumps(evaluate_checkpoint(args.evaluate, overrides, args.device)))
        return 0
    resume = None
    if args.resume:
        ckpt_path = find_checkpoint(args.resume)
        resume = load_checkpoint(ckpt_path, "--resume")
        cfg = dict(resume["config"])
        for key in ("epochs", "threads"):
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
        if args.device != parser.get_default("device"):
            cfg["device"] = args.device
        if args.ema is not None and args.ema != cfg.get("ema"):
            if cfg.get("ema"):
                parser.error(f"--ema {args.ema:g}: the run already averages its weights with decay "
                             f"{cfg['ema']:g}; resume it without --ema")
            # Training is unchanged; from this epoch on the average is what is evaluated and checkpointed.
            cfg["ema"], cfg["ema_from_epoch"] = args.ema, resume["epoch"] + 1
        if args.weight_decay is not None and args.weight_decay != cfg.get("weight_decay", 0.0):
            if cfg.get("weight_decay"):
                parser.error(f"--weight-decay {args.weight_decay:g}: the run already decays its weights by "
                             f"{cfg['weight_decay']:g}; resume it without --weight-decay")
            cfg["weight_decay"], cfg["weight_decay_from_epoch"] = args.weight_decay, resume["epoch"] + 1
        out = Path(args.out) if args.out else ckpt_path.parent
        if out.resolve() != ckpt_path.parent.resolve():
            try:
                fork_run(ckpt_path.parent, out, resume["epoch"])
            except ValueError as e:
                parser.error(str(e))
            cfg["forked_from"] = {"run": str(ckpt_path.parent), "epoch": resume["epoch"]}
    else:
        cfg = config_from_args(args, parser)
        out = Path(args.out or f"runs/{cfg['task']}_{cfg['model']}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg["device"].startswith("cuda") else "gloo")
    rank = _world()[0]
    try:
        metrics = train(cfg, out, resume=resume, quiet=args.quiet, time_budget=args.time_budget)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 and metrics["best_epoch"] is not None:
        print(f"best test_acc {metrics['best_test_acc']:.4f} at epoch {metrics['best_epoch']} (chosen on the "
              f"{metrics.get('selected_on', 'test')} set); run folder {out}")
    return 0
