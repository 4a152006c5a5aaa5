"""Streaming ECG wave segmentation of whole WFDB records: ``python -m srnn_fast.segment``.

    python -m srnn_fast.segment RECORD [RECORD ...] --checkpoint RUN --out DIR
    python -m srnn_fast.segment --test-records --data-dir DATA --checkpoint RUN --peer LSTM_RUN \\
        --neurokit --out DIR          # the run's test records, scored against NeuroKit2 and the LSTM

RECORD is a WFDB record path without extension (``.hea`` and its signal file; QTDB's format:
two leads). A run folder (its best.pt) or checkpoint of ``srnn_fast.train --task ecg`` gives
the network and, from its config.json, the preprocessing: the record is resampled to the
training rate (QTDB's 250 Hz) where its own differs, filtered and normalised per lead over
the whole record (``qtdb.normalise``: the record-wide statistics and the zero-phase filter of
training need the whole record, as they did there), level-crossing encoded with the run's
threshold, and the network runs over the whole record in chunks of ``--chunk`` steps,
carrying its state from chunk to chunk (``AdaptiveSRNN.stream``): the labels equal those of
one pass over the whole record, and the network's memory does not grow with its length (the
record itself, its encoding and its labels are held whole: ~6 MB for a 15-minute QTDB record).

Written to DIR, each file to a temporary name first and renamed once all of a record's
outputs are complete (an error leaves none of them behind):

- ``<record>.srnn``: WFDB annotations (``wfdb.wrann``, read back with ``wfdb.rdann(stem,
  "srnn")``) in QTDB's convention for waves: a peak symbol (``p`` P wave, ``N`` QRS complex at
  its R peak, ``t`` T wave) with its onset ``(`` right before and its offset ``)`` right
  after. From the per-sample labels (``labels_to_annotations``): a P run is a P wave from its
  onset to its offset; a QR run then an RS run is a QRS complex (onset, R peak where RS
  begins, offset where RS ends); an ST run ends at the T wave's offset (the labels mark no T
  onset, so none is written). The peak of a P or T wave, which the labels do not mark, is the
  sample of the run farthest from the straight line joining the run's ends, on the first lead.
  Runs shorter than ``--min-run-ms`` (default 20 ms; the network's label flickers at some
  boundaries) first take the label before them, in this file only. Read back through the
  loader's rule (``qtdb.segment_labels``) these annotations give those labels again
  wherever a beat's waves follow in order.
- ``<record>_labels.csv``: sample, time_s, label (0-5: P, PQ, QR, RS, ST, TP), wave name, and the
  expert label (-1: none) where the record has expert annotations (``--ann``, default ``q1c``).
- ``<record>.png``: both leads over ``--plot-start`` .. + ``--plot-seconds`` seconds (by
  default from 1 s before the first expert annotation, else from the start), the predicted
  segments and, where present, the expert annotations and their labels.
- ``<record>.json``: samples, throughput, energy per second of signal, accuracies.

Throughput (printed): samples per second and the factor over real time of the network alone
on ``--threads`` (default 1) threads, for the run's backend and, with ``--compare-reference``,
for the pure-PyTorch reference on the same record. Energy per second of signal: the energy
model (``srnn_fast.energy``) with the firing rates measured over the record, times the rate.

Scoring (where the record has expert annotations): the per-step accuracy of training, over
the samples the expert annotations label (``qtdb.segment_labels``). ``--peer RUN`` scores
another ECG run (e.g. the LSTM baseline) on the same records and samples, and ``--neurokit``
NeuroKit2's rule-based delineator (``neurokit_labels``); ``scores.md`` / ``scores.json`` in
DIR hold the table, per record and over all of them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import uuid
from fractions import Fraction
from typing import Optional

import numpy as np
import torch

from ._cli import user_errors
from .data.common import DataError
from .data.qtdb import (CLASSES, N_LEADS, P, QR, RS, ST, normalise, pick_channels, read_signal,
                        segment_labels)

TRAINING_FS = 250.0  # QTDB's rate: every ECG run of srnn_fast.train was trained on it
DEFAULT_CHUNK = 64 * 256  # steps per chunk (a multiple of modules.INTEGRATE_BLOCK: bit-exact streaming)
PEAK_SYMBOL = {P: "p", ST: "t"}  # P and T waves; a QRS complex is written as "N"


# ---------------------------------------------------------------------------------------
# The network and its preprocessing
# ---------------------------------------------------------------------------------------
def load_run(path, device: str = "cpu"):
    """(model in eval mode, config) of an ECG run folder (its best.pt) or checkpoint file,
    with the weights that were evaluated in training (the weight average where there is one)."""
    from .train import build_model, find_checkpoint, load_checkpoint

    p = find_checkpoint(path, "--checkpoint", "best.pt")
    ckpt = load_checkpoint(p, "--checkpoint")
    cfg = ckpt["config"]
    if cfg.get("task") != "ecg" or cfg.get("decode") != "per_step":
        raise ValueError(f"--checkpoint {p}: not an ECG run of srnn_fast.train (per-step labels); its task is "
                         f"{cfg.get('task')!r}")
    model = build_model(cfg)
    model.load_state_dict(ckpt.get("ema", ckpt["model"]))
    return model.to(device).eval(), cfg


def set_backend(model: torch.nn.Module, backend: str) -> None:
    """Run every spiking layer of ``model`` on ``backend`` (an error if it is unavailable)."""
    from ._checks import check_backend
    from .modules import SRNNLayer

    backend = check_backend(backend)
    for m in model.modules():
        if isinstance(m, SRNNLayer):
            m.backend = backend


def network_signal(signal: np.ndarray, fs: float, filter: str = "none", fs_net: float = TRAINING_FS) -> np.ndarray:
    """A record's raw leads [n, 2] at ``fs`` resampled to ``fs_net``, then filtered and
    normalised as training did (``qtdb.normalise``): float64 [m, 2]."""
    from scipy import signal as sps  # scipy comes with wfdb

    if fs != fs_net:  # (NaNs would spread through the filter: they become the lead's mean first)
        ratio = Fraction(fs_net / fs).limit_denominator(1000)
        signal = np.where(np.isnan(signal), np.nanmean(signal, axis=0), signal)
        signal = sps.resample_poly(signal, ratio.numerator, ratio.denominator, axis=0)
    return normalise(signal, fs_net, filter)


def encode(signal: np.ndarray, fs: float, cfg: dict, fs_net: float = TRAINING_FS, normalised=None) -> np.ndarray:
    """The network's input float32 [m, 4] for a record's raw leads [n, 2] at ``fs``:
    ``network_signal`` (or ``normalised``, its result if already computed) level-crossing
    encoded with the run's threshold, exactly as training encoded its records."""
    from .data.encoders import level_crossing

    data = cfg.get("data", {})
    if normalised is None:
        normalised = network_signal(signal, fs, data.get("filter", "none"), fs_net)
    return level_crossing(normalised, data.get("threshold", 0.3)).numpy()


@torch.no_grad()
def stream_chunks(model: torch.nn.Module, x: np.ndarray, chunk: int = DEFAULT_CHUNK):
    """Run ``model`` over x [T, F] in chunks of ``chunk`` steps, carrying its state; yields
    (start, logits [t, C], spikes) per chunk, spikes the list of [t, 1, H] spike tensors of
    every spiking layer (empty for a baseline)."""
    from .modules import INTEGRATE_BLOCK, AdaptiveSRNN

    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or chunk % INTEGRATE_BLOCK:
        raise ValueError(f"chunk must be a positive multiple of {INTEGRATE_BLOCK} steps; got {chunk!r}")
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    state = None
    for start in range(0, len(x), chunk):
        xc = torch.as_tensor(x[start:start + chunk], dtype=dtype, device=device).unsqueeze(0)  # [1, t, F]
        if isinstance(model, AdaptiveSRNN):
            o, state, spikes = model.stream(xc, state, return_spikes=True)
        else:
            (o, state), spikes = model.stream(xc, state), []
        yield start, o[0], spikes


def run_network(model, x: np.ndarray, chunk: int = DEFAULT_CHUNK, progress: bool = False) -> dict:
    """Labels int8 [T] (the argmax at every step), the network's wall time, and the spike
    rates (per spiking layer; the input's) of ``model`` streamed over x [T, F]."""
    from tqdm.auto import tqdm

    labels = np.empty(len(x), np.int8)
    spikes, slots = None, None
    bar = tqdm(total=len(x), unit="step", unit_scale=True, disable=not progress, leave=False)
    t0 = time.perf_counter()
    for start, logits, s in stream_chunks(model, x, chunk):
        labels[start:start + len(logits)] = logits.argmax(-1).cpu().numpy()
        counts = [float(t.sum()) for t in s]
        spikes = counts if spikes is None else [a + b for a, b in zip(spikes, counts)]
        slots = [t.numel() for t in s] if slots is None else [a + t.numel() for a, t in zip(slots, s)]
        bar.update(len(logits))
    seconds = time.perf_counter() - t0
    bar.close()
    rates = [a / b for a, b in zip(spikes or [], slots or [])]
    return {"labels": labels, "seconds": seconds, "rates": rates,
            "input_rate": float((x != 0).mean()) if len(x) else 0.0}


def energy_per_second(cfg: dict, rates: list, input_rate: float, fs_net: float = TRAINING_FS) -> float:
    """Energy in microjoules per second of signal (= average power in microwatts) of the
    network of ``cfg`` by the energy model, with the firing rates measured on the record."""
    from .energy import SPIKING, estimate_ops, network_layers

    layers = network_layers(cfg)
    kw = {}
    if cfg["model"] in SPIKING:
        hidden = len(layers) - 1
        kw = dict(fr_layers=rates[:hidden], fr_input=input_rate,
                  fr_readout=rates[hidden] if len(rates) > hidden else None)
    return sum(o.energy() for o in estimate_ops(layers, **kw)) * fs_net * 1e-6


# ---------------------------------------------------------------------------------------
# Labels <-> WFDB wave annotations
# ---------------------------------------------------------------------------------------
def label_runs(labels: np.ndarray) -> list:
    """Maximal runs of equal labels: [(start, end, label)], end exclusive."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(labels) != 0) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, labels.size]
    return [(int(a), int(b), int(labels[a])) for a, b in zip(starts, ends)]


def absorb_short_runs(labels: np.ndarray, min_len: int) -> np.ndarray:
    """``labels`` with every run shorter than ``min_len`` steps (after the first run) given the
    label before it: a causal rule, so a stream can apply it ``min_len`` steps late."""
    labels = np.array(labels, copy=True)
    for a, b, _ in label_runs(labels):
        if b - a < min_len and a > 0:
            labels[a:b] = labels[a - 1]
    return labels


def _wave_peak(lead: np.ndarray, a: int, b: int) -> int:
    """The sample of lead[a:b] farthest from the straight line joining its ends."""
    seg = lead[a:b]
    line = np.linspace(seg[0], seg[-1], len(seg))
    return a + int(np.argmax(np.abs(seg - line)))


def labels_to_annotations(labels: np.ndarray, lead: np.ndarray):
    """(samples int64, symbols) of the waves in per-sample labels [n], in QTDB's convention
    (module docstring); ``lead`` [n] places the P and T peaks. A wave cut by the record's
    start or end gets no onset or offset there."""
    n = len(labels)
    runs = label_runs(labels)
    out = []

    def add(sample, symbol):
        if 0 < sample < n or (symbol not in "()" and 0 <= sample < n):
            out.append((sample, symbol))

    i = 0
    while i < len(runs):
        a, b, lab = runs[i]
        if lab in PEAK_SYMBOL:  # P wave: ( p );  ST run: the T wave up to its offset: t )
            if lab == P:
                add(a, "(")
            add(_wave_peak(lead, a, b), PEAK_SYMBOL[lab])
            add(b, ")")
        elif lab in (QR, RS):  # a QRS complex: ( at QR's start, N where RS starts, ) where RS ends
            onset = a if lab == QR else None
            if lab == QR and i + 1 < len(runs) and runs[i + 1][2] == RS:
                i += 1
                r, offset = runs[i][0], runs[i][1]
            elif lab == QR:
                r, offset = b, None
            else:
                r, offset = a, b
            if r < n:
                if onset is not None:
                    add(onset, "(")
                add(r, "N")
                if offset is not None:
                    add(offset, ")")
        i += 1
    return np.array([s for s, _ in out], dtype=np.int64), [sym for _, sym in out]


def neurokit_labels(lead: np.ndarray, fs: float, max_tp_s: float = 1.0) -> np.ndarray:
    """Per-sample labels int8 [n] of NeuroKit2's delineator on one lead [n] at ``fs``.

    ``nk.ecg_clean`` then ``nk.ecg_peaks`` (R peaks) then ``nk.ecg_delineate(method="dwt")``.
    Its per-beat points become QTDB-style annotations, in beat order: P wave ``(`` ECG_P_Onsets,
    ``p`` ECG_P_Peaks, ``)`` ECG_P_Offsets; QRS ``(`` ECG_R_Onsets, ``N`` the R peak,
    ``)`` ECG_R_Offsets; T wave ``(`` ECG_T_Onsets, ``t`` ECG_T_Peaks, ``)`` ECG_T_Offsets
    (a wave whose peak was not found is left out, an onset or offset not found is omitted);
    then the loader's boundary rule (``qtdb.segment_labels``) gives the six labels: P from P
    onset to P offset, PQ to QRS onset, QR to the R peak, RS to QRS offset, ST to T offset, TP
    (at most ``max_tp_s``) to the next P onset, and -1 wherever that chain breaks.
    """
    try:
        import neurokit2 as nk
    except ImportError as e:
        raise ImportError("--neurokit needs NeuroKit2: pip install 'srnn_fast[delineate]' (or neurokit2)") from e
    lead = np.nan_to_num(np.asarray(lead, dtype=np.float64), nan=float(np.nanmean(lead)))
    cleaned = nk.ecg_clean(lead, sampling_rate=int(round(fs)))
    _, info = nk.ecg_peaks(cleaned, sampling_rate=int(round(fs)))
    rpeaks = np.asarray(info["ECG_R_Peaks"], dtype=np.int64)
    if len(rpeaks) < 2:
        return np.full(len(lead), -1, np.int8)
    _, waves = nk.ecg_delineate(cleaned, rpeaks, sampling_rate=int(round(fs)), method="dwt")
    columns = {k: np.asarray(v, dtype=np.float64) for k, v in waves.items()}
    waves_of_beat = (("ECG_P_Onsets", "ECG_P_Peaks", "ECG_P_Offsets", "p"),
                     ("ECG_R_Onsets", None, "ECG_R_Offsets", "N"),
                     ("ECG_T_Onsets", "ECG_T_Peaks", "ECG_T_Offsets", "t"))
    samples, symbols = [], []
    for k, r in enumerate(rpeaks):
        for on, peak, off, sym in waves_of_beat:
            at = float(r) if peak is None else columns[peak][k]
            if not math.isfinite(at):
                continue
            for key, s in ((on, "("), (None, sym), (off, ")")):
                v = at if key is None else columns[key][k]
                if math.isfinite(v):
                    samples.append(int(v))
                    symbols.append(s)
    return segment_labels(samples, symbols, len(lead), fs, max_tp_s)


# ---------------------------------------------------------------------------------------
# One record
# ---------------------------------------------------------------------------------------
def record_stem(record) -> pathlib.Path:
    """A record path without extension (a trailing .hea / .dat is dropped)."""
    p = pathlib.Path(record)
    return p.with_suffix("") if p.suffix in (".hea", ".dat") else p


def read_expert(stem: pathlib.Path, ann: Optional[str], n: int, fs: float, required: bool):
    """(samples, symbols, labels int8 [n]) of the expert annotations ``stem.ann``, or None when
    there are none (an error if ``required``)."""
    import wfdb

    if not ann:
        return None
    path = stem.with_name(f"{stem.name}.{ann}")
    if not path.is_file():
        if required:
            raise DataError(f"--ann {ann}: no annotation file {path}")
        return None
    try:
        a = wfdb.rdann(str(stem), ann)
    except Exception as e:  # wfdb raises many types on damaged files
        raise DataError(f"cannot read the annotations {path} ({type(e).__name__}: {e})") from e
    return a.sample, list(a.symbol), segment_labels(a.sample, a.symbol, n, fs)


def accuracy(pred: np.ndarray, expert: np.ndarray):
    """(correct, counted, unlabelled) over the samples the expert labels: predictions equal to
    the expert label, those samples, and those the prediction leaves without a label (-1)."""
    mask = expert >= 0
    return int((pred[mask] == expert[mask]).sum()), int(mask.sum()), int((pred[mask] < 0).sum())


class _Outputs:
    """Files written under temporary names and renamed into place together by ``commit``;
    ``discard`` (on any error) removes them, so no output is left half-written."""

    def __init__(self, folder: pathlib.Path):
        self.folder, self.pending = folder, []

    def path(self, name: str) -> pathlib.Path:
        tmp = self.folder / f".{name}.{uuid.uuid4().hex[:12]}.part"  # (not mkstemp: its files are private, 0600)
        self.pending.append((tmp, self.folder / name))
        return tmp

    def commit(self) -> list:
        for tmp, final in self.pending:
            os.replace(tmp, final)
        done, self.pending = [final for _, final in self.pending], []
        return done

    def discard(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []


def _write_annotations(path: pathlib.Path, name: str, samples, symbols, fs: float) -> None:
    import wfdb

    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        wfdb.wrann(name, "srnn", np.asarray(samples, dtype=np.int64), symbol=list(symbols), fs=fs, write_dir=d)
        os.replace(pathlib.Path(d) / f"{name}.srnn", path)


def _write_csv(path: pathlib.Path, labels: np.ndarray, fs: float, expert: Optional[np.ndarray]) -> None:
    names = np.array(list(CLASSES) + ["none"])  # index -1 -> "none"
    t = np.arange(len(labels)) / fs
    with open(path, "w") as f:
        f.write("sample,time_s,label,wave" + (",expert" if expert is not None else "") + "\n")
        for start in range(0, len(labels), 65536):  # in blocks: a 15-minute record is 225 000 rows
            sl = slice(start, start + 65536)
            cols = [np.arange(len(labels))[sl].astype(str), np.char.mod("%.3f", t[sl]), labels[sl].astype(str),
                    names[labels[sl]]]
            if expert is not None:
                cols.append(expert[sl].astype(str))
            f.write("\n".join(",".join(row) for row in zip(*cols)) + "\n")


def _write_plot(path: pathlib.Path, name: str, signal: np.ndarray, units, sig_names, fs: float,
                labels: np.ndarray, expert, start_s: float, seconds: float) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the plot needs matplotlib: pip install 'srnn_fast[plot]' (or pass --no-plot)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = len(labels)
    a = min(max(int(round(start_s * fs)), 0), max(n - 1, 0))
    b = min(a + max(int(round(seconds * fs)), 1), n)
    t = np.arange(a, b) / fs
    colors = ["#4c72b0", "#dd8452", "#c44e52", "#8172b3", "#55a868", "#cccccc"]
    cmap = ListedColormap(["white"] + colors)  # label -1 -> white
    fig, axes = plt.subplots(3, 1, figsize=(12, 6), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1]})
    for c in range(N_LEADS):
        ax = axes[c]
        for ra, rb, lab in label_runs(labels[a:b]):
            ax.axvspan((a + ra) / fs, (a + rb) / fs, color=colors[lab] if lab >= 0 else "white", alpha=0.25, lw=0)
        ax.plot(t, signal[a:b, c], color="black", lw=0.8)
        ax.set_ylabel(f"{sig_names[c]} ({units[c]})")
        if expert is not None and c == 0:
            for s, sym in zip(*expert[:2]):
                if a <= s < b:
                    ax.axvline(s / fs, color="black", lw=0.5, ls=":")
                    ax.annotate(sym, (s / fs, 1.0), xycoords=("data", "axes fraction"), ha="center",
                                va="bottom", fontsize=7)
    rows = [labels[a:b]] + ([expert[2][a:b]] if expert is not None else [])
    axes[2].imshow(np.stack(rows).astype(np.int64) + 1, aspect="auto", cmap=cmap, vmin=0, vmax=len(CLASSES),
                   interpolation="nearest", extent=(a / fs, b / fs, len(rows) - 0.5, -0.5))
    axes[2].set_yticks(range(len(rows)), ["network"] + (["expert"] if expert is not None else []))
    axes[2].set_xlabel("time (s)")
    fig.legend(handles=[Patch(color=c, label=k) for c, k in zip(colors, CLASSES)], loc="lower center", ncol=6,
               fontsize=8)
    fig.subplots_adjust(bottom=0.14)
    fig.suptitle(f"{name}: predicted segments (shaded, 'network')"
                 + (" and expert annotations (dotted, 'expert')" if expert is not None else ""), fontsize=10)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def segment_record(record, model, cfg: dict, out: pathlib.Path, *, chunk: int = DEFAULT_CHUNK,
                   leads=None, ann: Optional[str] = "q1c", ann_required: bool = False, plot: bool = True,
                   plot_start: Optional[float] = None, plot_seconds: float = 10.0, min_run_ms: float = 20.0,
                   compare_reference: bool = False,
                   peers=(), neurokit: bool = False, progress: bool = False) -> dict:
    """Segment one record and write its outputs (module docstring) to ``out``; returns the
    summary written to ``<record>.json``."""
    import wfdb

    stem = record_stem(record)
    raw, fs = read_signal(stem, leads)
    header = wfdb.rdheader(str(stem))
    channels = pick_channels(header, leads)
    units = [header.units[c] for c in channels]
    sig_names = [header.sig_name[c] for c in channels]
    expert = read_expert(stem, ann, len(raw), fs, ann_required)
    n = len(raw)
    if n == 0:
        raise DataError(f"WFDB record {stem}: the signal holds no samples")

    normalised = {}  # per filter: the filters cost seconds on a long record, so each runs once

    def inputs(c):
        f = c.get("data", {}).get("filter", "none")
        if f not in normalised:
            normalised[f] = network_signal(raw, fs, f)
        return encode(raw, fs, c, normalised=normalised[f])

    t0 = time.perf_counter()
    x = inputs(cfg)
    preprocess_s = time.perf_counter() - t0
    # where each of the record's samples sits in the network's steps
    index = np.minimum(np.round(np.arange(n) * (TRAINING_FS / fs)).astype(np.int64), len(x) - 1)

    def on_record(net_labels):
        return net_labels[index]

    result = run_network(model, x, chunk, progress)
    labels = on_record(result["labels"])
    backend = _backend_of(model)
    summary = {"record": stem.name, "path": str(stem), "fs": fs, "samples": n, "duration_s": n / fs,
               "network_steps": len(x), "checkpoint_model": cfg["model"], "preprocess_s": preprocess_s,
               "threads": torch.get_num_threads(), "throughput": {}, "accuracy": {}}
    summary["throughput"][backend] = _throughput(result["seconds"], len(x), n / fs)
    summary["energy_uj_per_s"] = energy_per_second(cfg, result["rates"], result["input_rate"])
    summary["firing_rates"] = result["rates"]
    if compare_reference and backend != "reference":
        set_backend(model, "reference")
        try:
            ref = run_network(model, x, chunk, progress)
        finally:
            set_backend(model, cfg.get("backend", "auto"))
        summary["throughput"]["reference"] = _throughput(ref["seconds"], len(x), n / fs)
        summary["reference_agreement"] = float((ref["labels"] == result["labels"]).mean())
    filt = cfg.get("data", {}).get("filter", "none")
    lead0 = (normalised[filt] if fs == TRAINING_FS else normalise(raw, fs, filt))[:, 0]
    min_run = int(round(min_run_ms * 1e-3 * fs))
    samples, symbols = labels_to_annotations(absorb_short_runs(labels, min_run), lead0)
    if plot_start is None:
        plot_start = max(expert[0][0] / fs - 1.0, 0.0) if expert is not None and len(expert[0]) else 0.0
    if expert is not None:
        summary["accuracy"]["srnn" if cfg["model"] not in _BASELINES else cfg["model"]] = list(
            accuracy(labels, expert[2]))
        for peer_name, (peer_model, peer_cfg) in peers:
            peer_labels = on_record(run_network(peer_model, inputs(peer_cfg), chunk, progress)["labels"])
            summary["accuracy"][peer_name] = list(accuracy(peer_labels, expert[2]))
        if neurokit:
            summary["accuracy"]["neurokit2"] = list(accuracy(neurokit_labels(raw[:, 0], fs), expert[2]))

    out.mkdir(parents=True, exist_ok=True)
    files = _Outputs(out)
    try:
        _write_annotations(files.path(f"{stem.name}.srnn"), stem.name, samples, symbols, fs)
        _write_csv(files.path(f"{stem.name}_labels.csv"), labels, fs, None if expert is None else expert[2])
        if plot:
            _write_plot(files.path(f"{stem.name}.png"), stem.name, raw, units, sig_names, fs, labels, expert,
                        plot_start, plot_seconds)
        files.path(f"{stem.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["files"] = [str(p) for p in files.commit()]
    finally:
        files.discard()
    return summary


_BASELINES = ("lstm", "gru", "rnn", "bilstm")


def _backend_of(model) -> str:
    from .modules import SRNNLayer
    from .scan import resolve_backend

    layers = [m for m in model.modules() if isinstance(m, SRNNLayer)]
    if not layers:
        return "torch"  # a baseline: torch's own RNN kernels
    return resolve_backend(layers[0].backend, layers[0].w_rec.device, layers[0].w_rec)


def _throughput(seconds: float, steps: int, duration_s: float) -> dict:
    return {"seconds": seconds, "samples_per_s": steps / seconds, "x_real_time": duration_s / seconds}


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m srnn_fast.segment", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("records", nargs="*", metavar="RECORD", help="WFDB record paths without extension")
    p.add_argument("--checkpoint", required=True, help="ECG run folder (its best.pt) or checkpoint file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--test-records", action="store_true",
                   help="also segment the test records of the checkpoint's split, from --data-dir/qtdb")
    p.add_argument("--data-dir", help="folder holding qtdb/ (with --test-records; default $SRNN_FAST_DATA)")
    p.add_argument("--leads", help="the two signals to use, by name or index (e.g. MLII,V5); default: the "
                   "record's, which must be two")
    p.add_argument("--ann", default="q1c", help="annotator extension of the expert annotations (scored and "
                   "plotted where the file exists); '' for none")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="steps per chunk (a multiple of 64)")
    p.add_argument("--plot-start", type=float, help="start of the plotted interval, seconds (default: 1 s before "
                   "the first expert annotation, else 0)")
    p.add_argument("--plot-seconds", type=float, default=10.0, help="length of the plotted interval, seconds")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--min-run-ms", type=float, default=20.0,
                   help="in the annotation file, runs of one label shorter than this take the label before them")
    p.add_argument("--compare-reference", action="store_true",
                   help="also time the pure-PyTorch reference backend on each record")
    p.add_argument("--peer", action="append", default=[], metavar="RUN",
                   help="another ECG run (e.g. the LSTM baseline) scored on the same records and samples")
    p.add_argument("--neurokit", action="store_true",
                   help="score NeuroKit2's ecg_delineate (dwt) on the first lead as well (extra 'delineate')")
    p.add_argument("--threads", type=int, default=1, help="torch threads (throughput is per this many cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _table(summaries: list, columns: list) -> str:
    """Markdown: accuracy per record and column, and over every scored sample."""
    rows = ["| record | labelled samples | " + " | ".join(columns) + " |",
            "|---|---:|" + "---:|" * len(columns)]
    def cell(correct, counted, unlabelled=0, bold=False):
        if not counted:
            return "-"
        text = f"**{100 * correct / counted:.1f}**" if bold else f"{100 * correct / counted:.1f}"
        share = 100 * unlabelled / counted
        return text + (f" ({share:.0f} % unlabelled)" if share >= 1 else " (<1 % unlabelled)" if unlabelled else "")

    totals = {c: [0, 0, 0] for c in columns}
    for s in summaries:
        acc = s["accuracy"]
        cells = []
        for c in columns:
            counts = acc.get(c, (0, 0, 0))
            totals[c] = [a + b for a, b in zip(totals[c], counts)]
            cells.append(cell(*counts))
        rows.append(f"| {s['record']} | {next(iter(acc.values()))[1]} | " + " | ".join(cells) + " |")
    n_all = max((t[1] for t in totals.values()), default=0)
    rows.append(f"| **all** | {n_all} | " + " | ".join(cell(*t, bold=True) for t in totals.values()) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    with user_errors(parser, DataError, FileNotFoundError, ValueError, ImportError):
        return _run(args, parser)


def _run(args, parser) -> int:
    from .data.common import resolve_data_dir

    if args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.plot_seconds <= 0 or (args.plot_start is not None and args.plot_start < 0) or args.min_run_ms < 0:
        parser.error("--plot-start and --min-run-ms must be >= 0, --plot-seconds > 0")
    if args.chunk < 1 or args.chunk % 64:
        parser.error(f"--chunk must be a positive multiple of 64 steps; got {args.chunk}")
    model, cfg = load_run(args.checkpoint)
    records = list(args.records)
    if args.test_records:
        qtdb = resolve_data_dir(args.data_dir) / "qtdb"
        records += [str(qtdb / r) for r in cfg.get("data_info", {}).get("test_records", [])]
    if not records:
        parser.error("give RECORD paths or --test-records")
    leads = None
    if args.leads:
        leads = [int(v) if v.strip().isdigit() else v.strip() for v in args.leads.split(",")]
    peers = []
    for run in args.peer:
        peer_model, peer_cfg = load_run(run)
        peers.append((peer_cfg["model"] if peer_cfg["model"] in _BASELINES else "srnn " + pathlib.Path(run).name,
                      (peer_model, peer_cfg)))
    if args.neurokit and importlib.util.find_spec("neurokit2") is None:  # fail before the first record
        parser.exit(1, f"{parser.prog}: error: --neurokit needs NeuroKit2: pip install 'srnn_fast[delineate]'\n")
    out = pathlib.Path(args.out)
    summaries = []
    for record in records:
        s = segment_record(record, model, cfg, out, chunk=args.chunk, leads=leads, ann=args.ann or None,
                           ann_required=bool(args.ann) and args.ann != "q1c", plot=not args.no_plot,
                           plot_start=args.plot_start, plot_seconds=args.plot_seconds, min_run_ms=args.min_run_ms,
                           compare_reference=args.compare_reference, peers=peers, neurokit=args.neurokit,
                           progress=not args.quiet and sys.stderr.isatty())
        summaries.append(s)
        speed = "; ".join(f"{b} {v['samples_per_s']:,.0f} samples/s = {v['x_real_time']:,.0f}x real time"
                          for b, v in s["throughput"].items())
        acc = "; ".join(f"{k} {100 * c / m:.1f} %" for k, (c, m, _) in s["accuracy"].items() if m)
        print(f"{s['record']}: {s['samples']} samples ({s['duration_s']:.0f} s at {s['fs']:g} Hz), "
              f"network on {s['threads']} thread(s): {speed}; energy {s['energy_uj_per_s']:.3g} uJ per s of "
              f"signal" + (f"; accuracy vs {args.ann}: {acc}" if acc else ""), flush=True)
    scored = [s for s in summaries if s["accuracy"]]
    if scored:
        columns = list(dict.fromkeys(k for s in scored for k in s["accuracy"]))
        table = _table(scored, columns)
        files = _Outputs(out)
        try:
            files.path("scores.md").write_text(
                f"Per-step accuracy (%) against the expert annotations ({args.ann}) over their labelled samples; "
                f"checkpoint {args.checkpoint}\n\n{table}\n")
            files.path("scores.json").write_text(json.dumps(summaries, indent=2) + "\n")
            files.commit()
        finally:
            files.discard()
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
