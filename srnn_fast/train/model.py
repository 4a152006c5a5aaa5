"""Model and presets: the networks of the method's tasks (``PRESETS``), the network a run's
config.json describes (``build_model``), its data (``_load_data``), and its optimizer and
learning-rate schedule."""
from __future__ import annotations

import torch
from torch import nn

from ..data.mnist import rbf_density_gain

SPIKING = ("adaptive", "lif")
SRNN_MODELS = ("adaptive", "lif", "relu")
BASELINES = ("lstm", "gru", "rnn", "bilstm")
TASKS = ("ecg", "smnist", "psmnist", "shd")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}
# Settings added after runs were trained: the config.json of an older run lacks them, and it ran
# with these values (build_model, make_optimizer and the report's comparisons fill them in).
LATER_SETTINGS = {"train_tau": "all", "dense_sizes": [], "rec_init": "orthogonal", "optimizer": "adam",
                  "lr_linear": None, "weight_decay": 0.0}

# S-MNIST / PS-MNIST follow the method's S-MNIST script: RBF population input as Gaussian
# densities (gain ~31 for 80 fields), b0 0.1, adaptation time constants N(700, 25), an adaptive
# spiking readout whose spike counts are the logits, Adam lr 1e-2 (time constants at 2x), batch
# 200, MultiStepLR halving at epochs 25, 50, 100, 150, 200 epochs. Added here: the gradient
# clipped to norm 1 (layer 1's BPTT gradient can burst by 1e3-1e5 and overflow float32 over 784
# steps; results/journal/mnist.md). As in the method's code the initial membranes are U(0, 1) in
# evaluation too: a PS-MNIST network trained on random starts scored 31 % from u = 0 and 61 %
# from random starts (training accuracy 67 %). The method's second network: 40 fields -> 256 -> 128.
_MNIST = dict(tasks=("smnist", "psmnist"), hidden_sizes=[120, 100], readout="spiking", decode="count",
              batch_size=200, epochs=200, lr=1e-2, lr_tau=2e-2, lr_step=25, lr_milestones=[25, 50, 100, 150],
              lr_gamma=0.5, tau_m_init=[20.0, 5.0], tau_adp_init=[700.0, 25.0], tau_out_init=[20.0, 5.0], b0=0.1,
              grad_clip=1.0, init_state="uniform_always", tbptt=None, dense_sizes=[], rec_init="orthogonal",
              optimizer="adam", lr_linear=None, surrogate="gaussian",
              data={"encoding": "rbf", "population": 80, "gain": rbf_density_gain(80)})
# ECG follows the method's own training script (Adam lr 1e-2, time constants at 3x, StepLR
# halving every 100 epochs, 400 epochs, batch 64); SHD uses lr 1e-2 with time constants at 2x
# and a published-style step decay.
PRESETS = {
    "ecg": dict(tasks=("ecg",), hidden_sizes=[36], readout="integrator", decode="per_step", batch_size=64,
                epochs=400, lr=1e-2, lr_tau=3e-2, lr_step=100, lr_milestones=None, lr_gamma=0.5,
                tau_m_init=[20.0, 5.0], tau_adp_init=[150.0, 10.0], tau_out_init=[20.0, 5.0], b0=0.01,
                grad_clip=None, init_state="uniform", tbptt=None, dense_sizes=[], rec_init="orthogonal",
                optimizer="adam", lr_linear=None, surrogate="gaussian", data={}),
    "smnist": _MNIST,
    "psmnist": _MNIST,
    "shd": dict(tasks=("shd",), hidden_sizes=[128, 128], readout="integrator", decode="mean", batch_size=64,
                epochs=150, lr=1e-2, lr_tau=2e-2, lr_step=20, lr_milestones=None, lr_gamma=0.5,
                tau_m_init=[20.0, 5.0], tau_adp_init=[150.0, 10.0], tau_out_init=[20.0, 5.0], b0=0.01,
                grad_clip=None, init_state="uniform", tbptt=None, dense_sizes=[], rec_init="orthogonal",
                optimizer="adam", lr_linear=None, surrogate="gaussian", data={"frame_ms": 10}),
    "mnist_256_128": dict(_MNIST, hidden_sizes=[256, 128],
                          data={"encoding": "rbf", "population": 40, "gain": rbf_density_gain(40)}),
    # The input, neurons and truncated BPTT of the method's later PS-MNIST script (binarised pixels,
    # a window of 4 moved by one pixel; b0 0.01, adaptation N(200, 25); recurrent 64 -> 256; a step
    # every 100 time steps: over all 784 the BPTT gradient grows to ~1e21 within 3 epochs,
    # results/journal/mnist.md); trained as above otherwise.
    "psmnist_64_256": dict(_MNIST, hidden_sizes=[64, 256], tau_adp_init=[200.0, 25.0], b0=0.01, tbptt=100,
                           data={"encoding": "sliding", "window": 4}),
    # The rest of that script too: a dense adaptive layer of 256 after the recurrent ones, recurrent
    # weights zero at the start, initial membranes U(0, b0) in training and evaluation, the
    # multi-Gaussian surrogate, Adamax at 8e-3 decaying linearly to 0 over 200 epochs, batch 300, no
    # clipping. Its time constants learn at 2x (tau_m) and 3x (tau_adp) the rate; here both at 2.5x.
    "psmnist_64_256_256": dict(_MNIST, hidden_sizes=[64, 256], dense_sizes=[256], tau_adp_init=[200.0, 25.0],
                               b0=0.01, tbptt=100, rec_init="zeros", init_state="uniform_b0", optimizer="adamax",
                               lr=8e-3, lr_tau=2e-2, lr_linear=200, lr_milestones=None, batch_size=300,
                               grad_clip=None, surrogate="multi_gaussian", data={"encoding": "sliding", "window": 4}),
}
# What a preset sets (each also a CLI flag that overrides it); "data" holds its data options.
PRESET_KEYS = ("hidden_sizes", "readout", "decode", "batch_size", "epochs", "lr", "lr_tau", "lr_step", "lr_milestones",
               "lr_gamma", "tau_m_init", "tau_adp_init", "tau_out_init", "b0", "grad_clip", "init_state", "tbptt",
               "dense_sizes", "rec_init", "optimizer", "lr_linear", "surrogate")
# Data options a task accepts (passed to srnn_fast.data.build_datasets), with their CLI flags.
DATA_OPTIONS = {"ecg": ("seq_len", "threshold", "test_fraction", "val_fraction", "npz", "stride", "cache_dir",
                        "context", "filter", "augment", "test_npz"),
                "smnist": ("encoding", "population", "window", "limit", "val_fraction", "gain"),
                "psmnist": ("encoding", "population", "window", "limit", "val_fraction", "gain"),
                "shd": ("frame_ms", "limit")}
ALL_DATA_OPTIONS = tuple(dict.fromkeys(k for keys in DATA_OPTIONS.values() for k in keys))  # their union


def build_model(config: dict) -> nn.Module:
    """The network described by a run's config.json (parameters freshly initialised)."""
    model = config["model"]
    dtype = getattr(torch, config.get("dtype", "float32"))
    if model in BASELINES:
        from ..baselines import RNNBaseline

        decode = "per_step" if config["decode"] == "per_step" else "last"
        net = RNNBaseline(model, config["input_size"], config["hidden_sizes"], config["num_classes"], decode=decode)
        return net.to(dtype)
    if model not in SRNN_MODELS:
        raise ValueError(f"model must be one of {', '.join(SRNN_MODELS + BASELINES)}; got {model!r}")
    from ..modules import AdaptiveSRNN

    config = {**LATER_SETTINGS, **config}
    return AdaptiveSRNN(config["input_size"], config["hidden_sizes"], config["num_classes"], neuron=model,
                        readout=config["readout"], decode=config["decode"], batch_first=True,
                        backend=config["backend"], tau_out_init=tuple(config["tau_out_init"]),
                        tau_m_init=tuple(config["tau_m_init"]), tau_adp_init=tuple(config["tau_adp_init"]),
                        b0=config["b0"], surrogate=config["surrogate"], init_state=config["init_state"],
                        train_tau=config["train_tau"], dense_sizes=config["dense_sizes"],
                        rec_init=config["rec_init"], dtype=dtype)


def hidden_widths(config: dict) -> list:
    """Widths of a run's hidden layers: the recurrent ones (hidden_sizes), then the dense ones."""
    h = config["hidden_sizes"]
    return ([h] if isinstance(h, int) else list(h)) + list(config.get("dense_sizes") or [])


def _is_time_constant(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("tau")


@torch.no_grad()
def clamp_time_constants(model: nn.Module) -> None:
    """Project every time constant back to >= dt after an optimizer step. An Adam step of
    size ~lr_tau can carry a small tau below zero (it did on ECG at lr_tau 3e-2), where
    exp(-dt / tau) is meaningless and the scan rejects it; the floor dt keeps alpha = exp(-1)."""
    floor = getattr(model, "dt", 1.0)
    for name, p in model.named_parameters():
        if _is_time_constant(name):
            p.clamp_(min=floor)


def make_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """Adam or Adamax (``optimizer``) over param_groups at ``lr`` / ``lr_tau``."""
    name = cfg.get("optimizer", LATER_SETTINGS["optimizer"])
    return OPTIMIZERS[name](param_groups(model, cfg["lr"], cfg["lr_tau"]))


def make_scheduler(opt: torch.optim.Optimizer, cfg: dict):
    """The per-epoch learning-rate decay: a linear decay to 0 over ``lr_linear`` epochs when a run
    has it (the method's PS-MNIST script: 1 - epoch / 200), MultiStepLR at ``lr_milestones`` (the
    method's S-MNIST schedule), else StepLR every ``lr_step`` epochs; the last two by ``lr_gamma``."""
    if cfg.get("lr_linear"):
        n = cfg["lr_linear"]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: max(0.0, 1.0 - epoch / n))
    if cfg.get("lr_milestones"):
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg["lr_milestones"], gamma=cfg["lr_gamma"])
    return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg["lr_step"], gamma=cfg["lr_gamma"])


def param_groups(model: nn.Module, lr: float, lr_tau: float) -> list:
    """Time constants (tau_m, tau_adp, tau_out) learn at lr_tau, everything else at lr."""
    tau, rest = [], []
    for name, p in model.named_parameters():
        (tau if _is_time_constant(name) else rest).append(p)
    groups = [{"params": rest, "lr": lr, "name": "weights"}]
    if tau:
        groups.append({"params": tau, "lr": lr_tau, "name": "tau"})
    return groups


def _load_data(cfg: dict):
    from .. import data as data_mod

    train_ds, test_ds, info = data_mod.build_datasets(cfg["task"], cfg["data_dir"], seed=cfg["data_seed"],
                                                      **cfg["data"])
    return train_ds, test_ds, info
