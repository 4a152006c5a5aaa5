"""Results report over run folders: ``python -m srnn_fast.report RUN_DIRS... --out results``.

Reads the run folders written by ``python -m srnn_fast.train`` (config.json, metrics.json,
best.pt) and writes ``OUT/REPORT.md`` with

- the results table of the method (task, method, network, accuracy, Fr, parameters),
- the theoretical energy per sample (:mod:`srnn_fast.energy`, the method's single-Fr
  formula, with the firing rate measured on the test set at the best epoch) and a relative
  table with the adaptive SRNN of each task as unit,
- with ``--measure``: per spiking run, the operations actually triggered on the test set
  next to the formula's estimate,

and figures in ``OUT/figures/``: energy ratio vs error ratio per task (Pareto view),
accuracy vs firing rate across network sizes, tau_m / tau_adp histograms at
initialisation and after training, one learning curve per run.

``python -m srnn_fast.report --ablation RUN_DIRS... [--at-epoch E]`` writes instead
``OUT/ABLATION.md``: the runs grouped by (task, neuron / model, train_tau, hidden sizes),
each group's test accuracy as mean ± sd over its runs (seeds or splits) with min / max, and
the method's ablation figures ``OUT/figures/ablation_neuron.png`` (its Fig. 6a: accuracy per
neuron type), ``ablation_tau.png`` (Fig. 6b: which time constants train) and
``ablation_size.png`` (Fig. 5: accuracy vs Fr, marker size = hidden neurons), every run a
point. A run's accuracy is the test accuracy at its validation-selected epoch; with
``--at-epoch E``, at the best validation epoch among epochs 1..E (metrics.csv), so runs of
different lengths compare at the same training budget.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ._cli import user_errors
from .data.common import DataError
from .energy import EnergyCosts, compare_table, estimate_energy, measure_ops
from .train import LATER_SETTINGS, SRNN_MODELS, evaluation_rng

METHOD_NAMES = {"adaptive": "Adaptive SRNN", "lif": "LIF SRNN", "relu": "RELU SRNN", "lstm": "LSTM",
                "gru": "GRU", "rnn": "Vanilla RNN", "bilstm": "Bi-LSTM"}
SPIKING = ("adaptive", "lif")
TASK_ORDER = ("ecg", "smnist", "psmnist", "shd")
TASK_NAMES = {"ecg": "ECG (QTDB)", "smnist": "S-MNIST", "psmnist": "PS-MNIST", "shd": "SHD"}


@dataclass
class Run:
    """One run folder, with what the report needs from it."""

    path: Path
    name: str
    config: dict
    metrics: dict
    best: Optional[dict] = None          # the metrics entry of the best epoch
    energy_pj: Optional[float] = None    # per sample, method's formula
    energy_layers_pj: Optional[float] = None  # per sample, per-layer rates
    T: int = 1                           # time steps per sample
    notes: list = field(default_factory=list)

    @property
    def compared_energy(self) -> Optional[float]:
        """What the relative table compares: energy per time step for a streaming task
        (decode "per_step", e.g. ECG, whose samples are arbitrary windows of a recording),
        else per sample (one classified sequence)."""
        if self.energy_pj is None:
            return None
        return self.energy_pj / self.T if self.config.get("decode") == "per_step" else self.energy_pj

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def acc(self) -> Optional[float]:
        return self.metrics.get("best_test_acc")

    @property
    def fr(self) -> Optional[float]:
        return None if self.best is None else self.best.get("fr")

    @property
    def network(self) -> str:
        c = self.config
        return f"{c['input_size']}-{_hidden_label(_hidden(c), c.get('dense_sizes') or ())}-{c['num_classes']}"

    @property
    def params(self) -> Optional[int]:
        return self.metrics.get("params", self.config.get("params"))


def find_runs(paths) -> list:
    """Run folders (holding config.json and metrics.json) at or below each of ``paths``."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"run folder {p} does not exist")
        hits = [p] if (p / "config.json").is_file() else sorted(c.parent for c in p.rglob("config.json"))
        hits = [h for h in hits if (h / "metrics.json").is_file()]
        if not hits:
            raise FileNotFoundError(f"{p} holds no run folder (a folder with config.json and metrics.json, "
                                    f"as written by python -m srnn_fast.train)")
        found.extend(hits)
    return list(dict.fromkeys(found))


def load_run(path: Path, costs: EnergyCosts) -> Run:
    config = json.loads((path / "config.json").read_text())
    metrics = json.loads((path / "metrics.json").read_text())
    run = Run(path, path.name, config, metrics)
    epochs = metrics.get("epochs") or []
    if metrics.get("best_epoch") is not None:
        run.best = next((e for e in epochs if e["epoch"] == metrics["best_epoch"]), None)
    if len(epochs) < config.get("epochs", 0):
        run.notes.append(f"trained {len(epochs)} of {config['epochs']} epochs")
    run.T = T = int(config.get("seq_len") or 1)  # srnn_fast.train records the data's sequence length
    if run.model in SPIKING and run.fr is not None:
        run.energy_pj = estimate_energy(config, costs=costs, T=T, fr=run.fr)
        if run.best.get("fr_layers"):
            run.energy_layers_pj = estimate_energy(config, costs=costs, T=T, fr_layers=run.best["fr_layers"])
    elif run.model not in SPIKING:
        run.energy_pj = run.energy_layers_pj = estimate_energy(config, costs=costs, T=T)
    return run


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def _sort_key(r: Run):
    task = TASK_ORDER.index(r.task) if r.task in TASK_ORDER else len(TASK_ORDER)
    return task, list(METHOD_NAMES).index(r.model) if r.model in METHOD_NAMES else 99, r.params or 0, r.name


def results_table(runs) -> str:
    rows = ["| task | method | network | accuracy (%) | Fr | parameters | epochs | run |",
            "|---|---|---|---:|---:|---:|---:|---|"]
    for r in runs:
        done = len(r.metrics.get("epochs") or [])
        rows.append(f"| {TASK_NAMES.get(r.task, r.task)} | {METHOD_NAMES.get(r.model, r.model)} | {r.network} | "
                    f"{_fmt(None if r.acc is None else 100 * r.acc, '.2f')} | {_fmt(r.fr, '.4f')} | "
                    f"{_fmt(r.params, ',')} | {done} / {r.config.get('epochs', '?')} | {r.name} |")
    return "\n".join(rows)


def reference_run(runs, task: str) -> Optional[Run]:
    """The unit of a task: its adaptive SRNN run of highest accuracy."""
    cands = [r for r in runs if r.task == task and r.model == "adaptive" and r.energy_pj and r.acc is not None]
    return max(cands, key=lambda r: (r.acc, r.name)) if cands else None


def relative_rows(runs) -> list:
    """(run, energy ratio, error ratio) for every run whose task has an adaptive SRNN unit."""
    out = []
    for r in runs:
        ref = reference_run(runs, r.task)
        if ref is None or r.energy_pj is None or r.acc is None:
            out.append((r, None, None))
            continue
        err, ref_err = 1 - r.acc, 1 - ref.acc
        out.append((r, r.compared_energy / ref.compared_energy, err / ref_err if ref_err > 0 else None))
    return out


def energy_table(runs) -> str:
    rows = ["| task | method | network | T | energy / sample (nJ) | per-layer Fr (nJ) | energy / step (pJ) "
            "| relative energy | error (%) | relative error | run |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r, e_rel, err_rel in relative_rows(runs):
        unit = " (unit)" if r is reference_run(runs, r.task) else ""
        rows.append(f"| {TASK_NAMES.get(r.task, r.task)} | {METHOD_NAMES.get(r.model, r.model)}{unit} | {r.network} | "
                    f"{r.T} | {_fmt(None if r.energy_pj is None else r.energy_pj / 1e3, '.2f')} | "
                    f"{_fmt(None if r.energy_layers_pj is None else r.energy_layers_pj / 1e3, '.2f')} | "
                    f"{_fmt(None if r.energy_pj is None else r.energy_pj / r.T, '.1f')} | "
                    f"{_fmt(e_rel, '.2f')} | {_fmt(None if r.acc is None else 100 * (1 - r.acc), '.2f')} | "
                    f"{_fmt(err_rel, '.2f')} | {r.name} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# Models of a run: at initialisation and after training
# ---------------------------------------------------------------------------------------
def _rebuild(config: dict):
    from .train import build_model

    cfg = dict(config, backend="auto")  # the run's backend may be a GPU one; "auto" runs anywhere
    torch.manual_seed(cfg.get("seed", 0))  # as srnn_fast.train does right before build_model
    return build_model(cfg)


def initial_and_trained(run: Run):
    """(model at initialisation, trained model from best.pt or None) of an SRNN run."""
    init = _rebuild(run.config)
    ckpt = run.path / "best.pt"
    if not ckpt.is_file():
        return init, None
    trained = _rebuild(run.config)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    trained.load_state_dict(state.get("ema", state["model"]))  # the weights that were evaluated (--ema)
    return init, trained


def _taus(model, name: str) -> torch.Tensor:
    return torch.cat([getattr(l, name).detach().float().flatten() for l in model.layers])


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    """Lays out, writes (PNG, 100 dpi) and closes a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _ema_from_epoch(run: Run) -> Optional[int]:
    """The first epoch evaluated on the weight average (--ema; ``--resume --ema`` switches it on
    later in a run), or None for a run evaluated on its trained weights."""
    return run.config.get("ema_from_epoch", 1) if run.config.get("ema") else None


def plot_learning_curve(run: Run, path: Path) -> None:
    """Loss and accuracy per epoch (train, test, validation where the run has one; the chosen
    epoch; Fr on a second axis), and for runs of 10 epochs or more a third panel with the
    accuracies of the later epochs, where the differences that choose an epoch are too small
    to see on the full scale. Legends sit below the panels, off the curves."""
    plt = _plt()
    ep = run.metrics["epochs"]
    x = [e["epoch"] for e in ep]
    val = [e for e in ep if e.get("val_acc") is not None]  # runs with a validation split
    zoom = len(ep) >= 10
    fig, axes = plt.subplots(1, 3 if zoom else 2, figsize=(13 if zoom else 9, 3.8))
    a, b = axes[0], axes[1]
    a.plot(x, [e["loss"] for e in ep], label="train")
    a.plot(x, [e["test_loss"] for e in ep], label="test")
    if val:
        a.plot([e["epoch"] for e in val], [e["val_loss"] for e in val], label="validation")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7)
    a.legend(ncol=3, **below)
    curves = [("train", ep, "train_acc"), ("test", ep, "test_acc")] + ([("validation", val, "val_acc")] if val else [])
    for label, rows, key in curves:
        b.plot([e["epoch"] for e in rows], [100 * e[key] for e in rows], label=label)
    best = run.metrics.get("best_epoch")
    chosen = f"chosen ({run.metrics.get('selected_on', 'test')}): epoch {best}"
    if best is not None:  # the epoch whose test accuracy the tables report
        b.axvline(best, color="tab:gray", ls=":", lw=1, label=chosen)
    since = _ema_from_epoch(run)
    averaged = f"weight average from epoch {since}"
    if since is not None and since > 1:  # evaluation switched from the trained weights to their average
        b.axvline(since - 0.5, color="tab:purple", ls="-.", lw=1, label=averaged)
    b.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    handles, labels = b.get_legend_handles_labels()
    if any(e.get("fr") is not None for e in ep):
        c = b.twinx()
        c.plot(x, [e.get("fr") for e in ep], color="tab:gray", ls="--", label="Fr (test)")
        c.set_ylabel("firing rate")
        h, l_ = c.get_legend_handles_labels()
        handles, labels = handles + h, labels + l_
    b.legend(handles, labels, ncol=3, **below)
    if zoom:  # the later epochs: from 40 % of the run on
        z = axes[2]
        first = x[int(0.4 * len(x))]
        for label, rows, key in curves:
            late = [e for e in rows if e["epoch"] >= first]
            z.plot([e["epoch"] for e in late], [100 * e[key] for e in late], marker=".", ms=3, label=label)
        if best is not None and best >= first:
            z.axvline(best, color="tab:gray", ls=":", lw=1, label=chosen)
        if since is not None and since > first:
            z.axvline(since - 0.5, color="tab:purple", ls="-.", lw=1, label=averaged)
        z.set(xlabel="epoch", ylabel="accuracy (%)", title=f"accuracy, epochs {first}-{x[-1]}")
        z.grid(alpha=0.3)
        z.legend(ncol=2, **below)
    fig.suptitle(f"{run.name}: {METHOD_NAMES.get(run.model, run.model)} {run.network} on "
                 f"{TASK_NAMES.get(run.task, run.task)}")
    _save(plt, fig, path)


def plot_taus(run: Run, init, trained, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, name, label in zip(axes, ("tau_m", "tau_adp"), ("tau_m (membrane)", "tau_adp (adaptation)")):
        sets = [("initialisation", _taus(init, name))]
        if trained is not None:
            sets.append(("after training (best.pt)", _taus(trained, name)))
        values = torch.cat([v for _, v in sets])
        lo, hi = values.min().item(), values.max().item()
        bins = torch.linspace(lo, hi if hi > lo else lo + 1, 31).tolist()  # shared bins: the two are comparable
        for label_, v in sets:
            ax.hist(v.numpy(), bins=bins, histtype="step", lw=1.5, label=label_)
        ax.set(xlabel=f"{label} (steps)", ylabel="neurons", title=label)
        ax.legend()
    fig.suptitle(f"{run.name}: time constants of the hidden layers")
    _save(plt, fig, path)


def plot_pareto(runs, path: Path) -> bool:
    """Energy ratio vs error ratio, one panel per task that has an adaptive SRNN unit."""
    rows = [(r, e, q) for r, e, q in relative_rows(runs) if e is not None and q is not None]
    tasks = [t for t in dict.fromkeys(r.task for r, _, _ in rows)]
    if not tasks:
        return False
    plt = _plt()
    colors = {m: f"C{i}" for i, m in enumerate(METHOD_NAMES)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        pts = [(r, e, q) for r, e, q in rows if r.task == task]
        for model in dict.fromkeys(r.model for r, _, _ in pts):
            sel = [(q, e) for r, e, q in pts if r.model == model]
            ax.scatter(*zip(*sel), s=40, color=colors.get(model), label=METHOD_NAMES.get(model, model))
        for r, e, q in pts:
            # run names label the points; kept out of the layout so long names cannot squeeze the axes
            ax.annotate(r.name, (q, e), fontsize=6, xytext=(4, 2), textcoords="offset points").set_in_layout(False)
        energies = [e for _, e, _ in pts]
        if max(energies) / min(energies) > 10:  # baselines can cost ~50x: log scale only where it helps
            ax.set_yscale("log")
        ax.set(xlabel="error / error of adaptive SRNN", ylabel="energy / energy of adaptive SRNN",
               title=TASK_NAMES.get(task, task))
        ax.axhline(1, color="gray", lw=0.5)
        ax.axvline(1, color="gray", lw=0.5)
        ax.margins(0.15)
        ax.legend(fontsize=7, loc="best")
    _save(plt, fig, path)
    return True


def plot_acc_vs_fr(runs, path: Path) -> bool:
    pts = [r for r in runs if r.model in SPIKING and r.fr is not None and r.acc is not None]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in dict.fromkeys(r.task for r in pts):
        for model, marker in (("adaptive", "o"), ("lif", "s")):
            sel = sorted((r for r in pts if r.task == task and r.model == model), key=lambda r: r.params or 0)
            if not sel:
                continue
            ax.plot([r.fr for r in sel], [100 * r.acc for r in sel], marker=marker, ls="none",
                    label=f"{TASK_NAMES.get(task, task)}, {METHOD_NAMES[model]}")
            for r in sel:
                ax.annotate(r.network, (r.fr, 100 * r.acc), fontsize=7, xytext=(3, 3),
                            textcoords="offset points").set_in_layout(False)
    ax.set(xlabel="firing rate (spikes / neuron / step, test set)", ylabel="test accuracy (%)",
           title="accuracy vs firing rate across network sizes")
    ax.legend(fontsize=7)
    _save(plt, fig, path)
    return True


# ---------------------------------------------------------------------------------------
# Measured operation counts on the test set
# ---------------------------------------------------------------------------------------
def measure_run(run: Run, trained, data_dir: Optional[str], limit: int, batch_size: int, costs: EnergyCosts) -> str:
    from .data import build_datasets

    cfg = run.config
    _, test_ds, _ = build_datasets(cfg["task"], data_dir or cfg.get("data_dir"), seed=cfg.get("data_seed", 0),
                                   **cfg.get("data", {}))
    n = min(limit, len(test_ds))
    subset = torch.utils.data.Subset(test_ds, range(n))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size)
    dtype = next(trained.parameters()).dtype
    with evaluation_rng(cfg.get("seed", 0)):  # random initial states drawn as the trainer evaluates
        counts = measure_ops(trained, ((x.to(dtype),) for x, _ in loader))
    head = (f"**{run.name}** ({METHOD_NAMES.get(run.model, run.model)} {run.network}, "
            f"{TASK_NAMES.get(run.task, run.task)}; first {n} test samples; pJ per sample per time step):\n\n")
    return head + compare_table(counts, cfg, fr=run.fr, costs=costs)


# ---------------------------------------------------------------------------------------
# Ablations (the method's Fig. 5 and 6): groups of runs that differ in one setting
# ---------------------------------------------------------------------------------------
TRAIN_TAU_ORDER = ("all", "m", "adp", "none")
TRAIN_TAU_NAMES = {"all": "all (tau_m, tau_adp)", "m": "tau_m only", "adp": "tau_adp only", "none": "none"}


def epoch_rows(run: Run) -> list:
    """The run's per-epoch table, metrics.csv, as dicts of floats (None for an empty cell;
    fr_layers stays text). Raises FileNotFoundError without it."""
    path = run.path / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run.path} has no metrics.csv (written by python -m srnn_fast.train every epoch)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (v if k == "fr_layers" else float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in rows]


@dataclass
class Selected:
    """One run's result in an ablation: the test accuracy and Fr at its chosen epoch."""

    run: Run
    epoch: int
    acc: float
    fr: Optional[float]
    val_acc: Optional[float]

    @property
    def key(self) -> tuple:
        """(task, model, train_tau, recurrent sizes, dense sizes): what the ablations vary.
        train_tau is None for the baselines (no time constants); runs from before the option
        trained all."""
        c = self.run.config
        tau = c.get("train_tau", LATER_SETTINGS["train_tau"]) if self.run.model in SRNN_MODELS else None
        return self.run.task, self.run.model, tau, tuple(_hidden(c)), tuple(c.get("dense_sizes") or ())


def _hidden(config: dict) -> list:
    h = config["hidden_sizes"]
    return h if isinstance(h, list) else [h]


def select_epoch(run: Run, at_epoch: Optional[int] = None) -> Selected:
    """The run's test accuracy and Fr at the epoch it selected (metrics.json best_epoch,
    chosen on validation where it has one), or with ``at_epoch`` at the best validation epoch
    among epochs 1..at_epoch of metrics.csv (the earliest of equal ones, as training picks).
    Raises ValueError naming the run when it cannot."""
    if at_epoch is None:
        if run.best is None or run.acc is None:
            raise ValueError(f"run {run.path} has no selected epoch (metrics.json best_epoch); did it train?")
        return Selected(run, int(run.best["epoch"]), run.acc, run.best.get("fr"), run.best.get("val_acc"))
    rows = epoch_rows(run)
    if len(rows) < at_epoch:
        raise ValueError(f"--at-epoch {at_epoch}: run {run.path} has only {len(rows)} epochs in metrics.csv")
    rows = [r for r in rows if r["epoch"] <= at_epoch]
    if any(r.get("val_acc") is None for r in rows):
        raise ValueError(f"--at-epoch selects on validation accuracy, and run {run.path} has no val_acc in "
                         f"metrics.csv (train with --val-fraction)")
    best = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    return Selected(run, int(best["epoch"]), best["test_acc"], best.get("fr"), best["val_acc"])


def _mean_sd(values) -> tuple:
    """(mean, sample standard deviation or None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, sd


def group_runs(selected) -> dict:
    """{key: [Selected, ...]} in report order: task, model, train_tau, network size."""
    groups = {}
    for s in selected:
        groups.setdefault(s.key, []).append(s)

    def order(key):
        task, model, tau, hidden, dense = key
        return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task,
                list(METHOD_NAMES).index(model) if model in METHOD_NAMES else 99,
                TRAIN_TAU_ORDER.index(tau) if tau in TRAIN_TAU_ORDER else -1, sum(hidden) + sum(dense), hidden, dense)
    return {k: sorted(groups[k], key=lambda s: s.run.name) for k in sorted(groups, key=order)}


# Config entries that may differ between the runs of one group without making them different
# experiments: what the spread is over (seeds, splits) and bookkeeping.
_REPLICATE_KEYS = {"seed", "data_seed", "data_dir", "threads", "device", "data_info", "n_train", "n_val", "n_test",
                   "world_size", "backend", "out"}


def varying_settings(selected) -> list:
    """The other config settings (data options as data.NAME) whose values differ between
    these runs: a group is meant to vary only in seed or split, so these are worth saying."""
    def flat(c):
        items = dict(LATER_SETTINGS)  # runs from before a setting existed had its value
        items.update({k: v for k, v in c.items() if k not in _REPLICATE_KEYS and k != "data"})
        items.update({f"data.{k}": v for k, v in (c.get("data") or {}).items()})
        return items
    configs = [flat(s.run.config) for s in selected]
    keys = sorted(set().union(*configs))
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def _pct_mean_sd(values) -> str:
    mean, sd = _mean_sd([100 * v for v in values])
    return f"{mean:.2f}" + ("" if sd is None else f" ± {sd:.2f}")


def ablation_table(groups: dict) -> str:
    rows = ["| task | model | train_tau | hidden | n | accuracy (%) mean ± sd | min | max | Fr mean ± sd | epochs "
            "| runs |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for (task, model, tau, hidden, dense), sel in groups.items():
        accs = [s.acc for s in sel]
        frs = [s.fr for s in sel if s.fr is not None]
        fr = "–"
        if frs:
            mean, sd = _mean_sd(frs)
            fr = f"{mean:.4f}" + ("" if sd is None else f" ± {sd:.4f}")
        rows.append(f"| {TASK_NAMES.get(task, task)} | {METHOD_NAMES.get(model, model)} | {tau or '–'} | "
                    f"{_hidden_label(hidden, dense)} | {len(sel)} | {_pct_mean_sd(accs)} | {100 * min(accs):.2f} | "
                    f"{100 * max(accs):.2f} | {fr} | {', '.join(str(s.epoch) for s in sel)} | "
                    f"{', '.join(s.run.name for s in sel)} |")
    return "\n".join(rows)


def _panels(plt, n: int, width: float = 5.0):
    fig, axes = plt.subplots(1, n, figsize=(width * n, 4.2), squeeze=False)
    return fig, axes[0]


def _strip(ax, x: float, values, color) -> None:
    """Every run as a point (spread a little sideways), and the mean with a ±sd bar."""
    n = len(values)
    offsets = [0.0] if n == 1 else [-0.12 + 0.24 * i / (n - 1) for i in range(n)]
    ax.scatter([x + o for o in offsets], values, s=18, color=color, alpha=0.6, zorder=3)
    mean, sd = _mean_sd(values)
    ax.errorbar([x + 0.25], [mean], yerr=[[sd or 0.0], [sd or 0.0]], fmt="D", color=color, ms=6, capsize=4, zorder=4)


def _hidden_label(hidden, dense=()) -> str:
    """Hidden widths, e.g. 64-256-256d: d marks a feed-forward (dense) layer."""
    return "-".join([*map(str, hidden), *(f"{n}d" for n in dense)])


def _all_trained(groups: dict) -> dict:
    """The SRNN groups with every time constant trained (what Fig. 6a and Fig. 5 compare)."""
    return {k: v for k, v in groups.items() if k[1] in SRNN_MODELS and k[2] == "all"}


def _tasks_varying(sel: dict, field) -> list:
    """The tasks (in order) whose groups in ``sel`` take two or more values of key[field] (an
    index or a slice)."""
    return [t for t in dict.fromkeys(k[0] for k in sel) if len({k[field] for k in sel if k[0] == t}) > 1]


def plot_ablation_neuron(groups: dict, path: Path) -> Optional[str]:
    """Fig. 6a: accuracy per SRNN neuron type per task (time constants all trained). Returns
    None when drawn, else why not."""
    sel = _all_trained(groups)
    tasks = _tasks_varying(sel, 1)
    if not tasks:
        return "no task has runs of two or more neuron types (adaptive / lif / relu) with all time constants trained"
    plt = _plt()
    fig, axes = _panels(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        keys = [k for k in sel if k[0] == task]
        several_sizes = len({k[3:] for k in keys}) > 1
        for x, key in enumerate(keys):
            _strip(ax, x, [100 * s.acc for s in sel[key]], f"C{SRNN_MODELS.index(key[1])}")
        ax.set_xticks(range(len(keys)),
                      [METHOD_NAMES[k[1]] + (f"\n{_hidden_label(*k[3:])}" if several_sizes else "") for k in keys],
                      fontsize=8)
        ax.set(ylabel="test accuracy (%)", title=TASK_NAMES.get(task, task))
        ax.margins(x=0.15)
    fig.suptitle("Neuron type: runs (points), mean ± sd (diamonds)", fontsize=10)
    _save(plt, fig, path)
    return None


def plot_ablation_tau(groups: dict, path: Path) -> Optional[str]:
    """Fig. 6b: accuracy per train_tau setting (all / m / adp / none), per task, one series
    per (neuron type, size)."""
    # Only the (task, model, size) series run with two or more settings: the others compare nothing.
    settings = {}
    for task, model, tau, *sizes in (k for k in groups if k[2] is not None):
        settings.setdefault((task, model, *sizes), set()).add(tau)
    sel = {k: v for k, v in groups.items() if len(settings.get((k[0], k[1], *k[3:]), ())) > 1}
    tasks = list(dict.fromkeys(k[0] for k in sel))
    if not tasks:
        return "no task has SRNN runs of one model and size with two or more train_tau settings (--train-tau)"
    plt = _plt()
    fig, axes = _panels(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        series = list(dict.fromkeys((k[1], k[3], k[4]) for k in sel if k[0] == task))
        width = 0.8 / len(series)
        for i, (model, hidden, dense) in enumerate(series):
            color = f"C{i}"
            for x, tau in enumerate(TRAIN_TAU_ORDER):
                runs = sel.get((task, model, tau, hidden, dense))
                if runs:
                    _strip(ax, x - 0.4 + width * (i + 0.5) - 0.125, [100 * s.acc for s in runs], color)
            ax.plot([], [], "D", color=color, label=f"{METHOD_NAMES[model]} {_hidden_label(hidden, dense)}")
        ax.set_xticks(range(len(TRAIN_TAU_ORDER)), [TRAIN_TAU_NAMES[t] for t in TRAIN_TAU_ORDER], fontsize=8)
        ax.set(xlabel="time constants trained", ylabel="test accuracy (%)", title=TASK_NAMES.get(task, task))
        ax.legend(fontsize=7)
    fig.suptitle("Time constants trained: runs (points), mean ± sd (diamonds)", fontsize=10)
    _save(plt, fig, path)
    return None


def plot_ablation_size(groups: dict, path: Path) -> Optional[str]:
    """Fig. 5: accuracy vs Fr of every run (time constants all trained), colour = neuron
    type, marker area = hidden neurons, per task."""
    sel = {k: [s for s in v if s.fr is not None] for k, v in _all_trained(groups).items()}
    sel = {k: v for k, v in sel.items() if v}
    tasks = _tasks_varying(sel, slice(3, None))
    if not tasks:
        return "no task has SRNN runs (with a recorded Fr, all time constants trained) of two or more network sizes"
    plt = _plt()
    fig, axes = _panels(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        keys = [k for k in sel if k[0] == task]
        biggest = max(sum(k[3]) + sum(k[4]) for k in keys)
        for key in keys:
            size = 20 + 280 * (sum(key[3]) + sum(key[4])) / biggest
            color = f"C{SRNN_MODELS.index(key[1])}"
            ax.scatter([s.fr for s in sel[key]], [100 * s.acc for s in sel[key]], s=size, color=color, alpha=0.6,
                       edgecolors="k", linewidths=0.5, label=f"{METHOD_NAMES[key[1]]} {_hidden_label(key[3], key[4])}")
        ax.set(xlabel="firing rate Fr (test set, selected epoch)", ylabel="test accuracy (%)",
               title=TASK_NAMES.get(task, task))
        ax.legend(fontsize=7, markerscale=0.6)
    fig.suptitle("Accuracy vs Fr (marker area: hidden neurons)", fontsize=10)
    _save(plt, fig, path)
    return None


ABLATION_FIGURES = (("ablation_neuron.png", "Neuron type (the method's Fig. 6a)", plot_ablation_neuron),
                    ("ablation_tau.png", "Trained vs frozen time constants (Fig. 6b)", plot_ablation_tau),
                    ("ablation_size.png", "Accuracy vs Fr across network sizes (Fig. 5)", plot_ablation_size))


def write_ablation(paths, out: Path, *, at_epoch: Optional[int] = None, command: Optional[str] = None) -> Path:
    """Write OUT/ABLATION.md and OUT/figures/ablation_*.png for the runs at or below ``paths``."""
    if at_epoch is not None and (isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or at_epoch < 1):
        raise ValueError(f"at_epoch must be a positive int; got {at_epoch!r}")
    runs = [load_run(p, EnergyCosts()) for p in find_runs(paths)]
    groups = group_runs([select_epoch(r, at_epoch) for r in runs])
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    rule = (f"the test accuracy at the best validation epoch among epochs 1-{at_epoch} (metrics.csv `val_acc`)"
            if at_epoch is not None else
            "the test accuracy at the epoch each run selected (metrics.json `best_epoch`: on the validation set "
            "where the run has one, `selected_on`)")
    md = ["# Ablations", "",
          f"{len(runs)} run folder(s) in {len(groups)} group(s) of equal task, model, train_tau (which time "
          f"constants train; – for the baselines) and hidden layer sizes. Accuracy: {rule}; Fr: the test-set firing "
          "rate (spikes per neuron per step over the hidden layers) at that epoch. mean ± sd: over the group's "
          "runs (sample sd; none for a single run); the runs differ in seed or data split. Epochs: the selected "
          "epoch of each run, in the order of the run names.", "",
          *([f"Generated with `{command}`.", ""] if command else []),
          "## Groups", "", ablation_table(groups), ""]
    mixed = [(k, v) for k, v in ((k, varying_settings(sel)) for k, sel in groups.items()) if v]
    if mixed:
        md += ["Groups whose runs differ in more than seed and split (compare with care):", "",
               *[f"- {TASK_NAMES.get(k[0], k[0])}, {METHOD_NAMES.get(k[1], k[1])}, train_tau {k[2] or '–'}, "
                 f"{_hidden_label(*k[3:])}: {', '.join(v)}" for k, v in mixed], ""]
    md += ["## Figures", ""]
    for name, title, plot in ABLATION_FIGURES:
        skipped = plot(groups, figs / name)
        md += [f"### {title}", "", f"Skipped: {skipped}." if skipped else f"![{title}](figures/{name})", ""]
    path = out / "ABLATION.md"
    path.write_text("\n".join(md))
    return path


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------
def write_report(paths, out: Path, *, costs: EnergyCosts = EnergyCosts(), measure: bool = False,
                 data_dir: Optional[str] = None, measure_limit: int = 256, batch_size: int = 64,
                 title: str = "Results", command: Optional[str] = None) -> Path:
    """Write OUT/REPORT.md and OUT/figures/*.png for the runs at or below ``paths``."""
    runs = sorted((load_run(p, costs) for p in find_runs(paths)), key=_sort_key)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "",
          f"{len(runs)} run folder(s). Accuracy: the test accuracy of the best epoch, chosen on the "
          "validation records where a run has them (metrics.json `selected_on`), else the highest over the epochs "
          "(for ECG: per labelled time step); Fr: spikes per neuron per time step over all hidden layers "
          "(recurrent and dense) on the test set, at the best epoch. Parameters: trainable parameters, including time constants.", "",
          *([f"Generated with `{command}`.", ""] if command else []),
          "## Results", "", results_table(runs), ""]
    incomplete = [f"{r.name} ({'; '.join(r.notes)})" for r in runs if r.notes]
    if incomplete:
        md += ["Runs that did not finish their configured epochs: " + ", ".join(incomplete) + ".", ""]
    averaged = []
    for r in runs:
        since = _ema_from_epoch(r)
        if since is not None:
            later = f", from epoch {since}; the epochs before on the trained weights" if since > 1 else ""
            averaged.append(f"{r.name} (decay {r.config['ema']:g}{later})")
    if averaged:
        md += ["Runs evaluated (validation, test, Fr) on an exponential moving average of their weights (`--ema`; "
               "training loss and accuracy are those of the trained weights): " + ", ".join(averaged) + ".", ""]
    decayed = [f"{r.name} ({r.config['weight_decay']:g}"
               + (f", from epoch {r.config['weight_decay_from_epoch']}" if r.config.get("weight_decay_from_epoch") else "")
               + ")" for r in runs if r.config.get("weight_decay")]
    if decayed:
        md += ["Runs trained with decoupled weight decay of their weight matrices (`--weight-decay`): "
               + ", ".join(decayed) + ".", ""]
    forked = [f"{r.name} from {Path(r.config['forked_from']['run']).name} at epoch {r.config['forked_from']['epoch']}"
              for r in runs if r.config.get("forked_from")]
    if forked:
        md += ["Runs forked from another (`--resume RUN --out NEW`; they share its epochs up to the fork): "
               + ", ".join(forked) + ".", ""]
    md += ["## Theoretical energy", "",
           f"Per sample over its T time steps (T = config `seq_len`), E_MAC = {costs.e_mac:g} pJ, "
           f"E_AC = {costs.e_ac:g} pJ (45 nm, 32-bit float, Horowitz 2014). Formulas in `srnn_fast/energy.py`: "
           "spiking layers (mn + nn) E_AC Fr, adaptive + 2n E_AC Fr + 2n E_MAC; vanilla RNN (mn + nn) E_MAC; "
           "RELU SRNN (mn + nn + 4n) E_MAC; LSTM (4mn + 4nn + 3n) E_MAC; Bi-LSTM twice; GRU (3mn + 3nn + 3n) "
           "E_MAC (not in the method). Analog inputs (MNIST RBF / analog encodings) cost MACs without Fr. The "
           "readout is counted too (integrator: synapses + n MAC decay; linear readout of the baselines: mn MAC, "
           "once per sequence when it decodes only the last step). 'energy / sample' uses the method's single "
           "overall Fr; 'per-layer Fr' uses each presynaptic layer's own rate. Relative columns: the task's "
           "adaptive SRNN (highest accuracy) is the unit; relative energy compares energy per time step for "
           "streaming tasks (per-step decoding: ECG, whose samples are windows of a recording) and per sample "
           "otherwise; relative error = (1 - acc) / (1 - acc of the unit).", "",
           energy_table(runs), ""]
    fig_lines = []
    if plot_pareto(runs, figs / "pareto.png"):
        fig_lines.append("![energy ratio vs error ratio](figures/pareto.png)")
    if plot_acc_vs_fr(runs, figs / "acc_vs_fr.png"):
        fig_lines.append("![accuracy vs firing rate](figures/acc_vs_fr.png)")
    md += ["## Figures", "", *[f"{l}\n" for l in fig_lines]]
    measured = []
    for r in runs:
        if r.metrics.get("epochs"):
            name = f"curve_{_slug(r.name)}.png"
            plot_learning_curve(r, figs / name)
            md.append(f"Learning curve, {r.name}:\n\n![learning curve {r.name}](figures/{name})\n")
        if r.model in ("adaptive", "lif", "relu"):
            init, trained = initial_and_trained(r)
            name = f"tau_{_slug(r.name)}.png"
            plot_taus(r, init, trained, figs / name)
            md.append(f"Time constants, {r.name}:\n\n![tau histograms {r.name}](figures/{name})\n")
            if measure and trained is not None and r.model in SPIKING and r.fr is not None:
                try:
                    measured.append(measure_run(r, trained, data_dir, measure_limit, batch_size, costs))
                except (OSError, ValueError, DataError) as e:  # the data are missing here: say so in the report
                    measured.append(f"**{r.name}**: not measured ({type(e).__name__}: {e})")
    if measure:
        md += ["## Measured operations vs the formula", "",
               "The trained model (best.pt) runs on test samples; every nonzero presynaptic value triggers one "
               "accumulate per postsynaptic neuron (AC for a spike, MAC for an analog value), plus the neuron "
               "state updates of the formula. A zero analog input (e.g. an RBF channel far from the pixel value) "
               "triggers nothing here, while the formula counts every analog synapse at every step. 'input rate': "
               "nonzero inputs per input channel per step. 'method (single Fr)': the formula with the run's overall "
               "test Fr; 'per-layer Fr': the formula with the rates measured here.", "", "\n\n".join(measured), ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(md))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m srnn_fast.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIRS", help="run folders, or folders holding run folders")
    p.add_argument("--out", default="results", help="writes OUT/REPORT.md and OUT/figures/*.png")
    p.add_argument("--ablation", action="store_true",
                   help="instead of the report: OUT/ABLATION.md (runs grouped by task, model, train_tau and hidden "
                        "sizes; mean ± sd over each group) and OUT/figures/ablation_{neuron,tau,size}.png")
    p.add_argument("--at-epoch", type=int, metavar="E",
                   help="with --ablation: each run's test accuracy at its best validation epoch among epochs 1..E "
                        "(default: the epoch the run selected)")
    p.add_argument("--title", default="Results")
    p.add_argument("--e-mac", type=float, default=EnergyCosts.e_mac, help="energy of a MAC in pJ")
    p.add_argument("--e-ac", type=float, default=EnergyCosts.e_ac, help="energy of an AC in pJ")
    p.add_argument("--measure", action="store_true", help="count the operations of the trained spiking models on "
                   "test data (needs the data: --data-dir or the runs' own)")
    p.add_argument("--data-dir", help="folder with qtdb/, mnist/, shd/ (default: the run's, else $SRNN_FAST_DATA)")
    p.add_argument("--measure-limit", type=int, default=256, help="test samples per run for --measure")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "srnn_fast.report", *(sys.argv[1:] if argv is None else argv)])
    if args.at_epoch is not None and not args.ablation:
        p.error("--at-epoch applies to --ablation")
    if args.at_epoch is not None and args.at_epoch < 1:
        p.error(f"--at-epoch must be a positive epoch number; got {args.at_epoch}")
    # a run folder missing or incomplete, an epoch it does not have: one line, not a traceback
    with user_errors(p, FileNotFoundError, ValueError, KeyError, DataError):
        if args.ablation:
            path = write_ablation(args.runs, Path(args.out), at_epoch=args.at_epoch, command=command)
        else:
            path = write_report(args.runs, Path(args.out), costs=EnergyCosts(args.e_mac, args.e_ac),
                                measure=args.measure, data_dir=args.data_dir, measure_limit=args.measure_limit,
                                batch_size=args.batch_size, title=args.title, command=command)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
