"""ECG wave segmentation on the PhysioNet QT Database (QTDB), read with ``wfdb``.

Labels (``CLASSES``: 0 P, 1 PQ, 2 QR, 3 RS, 4 ST, 5 TP; -1 = unlabeled) come from the
manual ``q1c`` annotations. There, each wave is a peak symbol ('p' P wave, 't' T wave, 'u'
U wave, any other symbol such as 'N', 'A', 'V' a QRS complex whose sample is the R peak)
with an optional onset '(' right before it and offset ')' right after it. The rule:

1. Boundaries. A P wave with onset starts P at its onset; with offset, starts PQ at its
   offset. A QRS with onset starts QR at its onset; its peak starts RS; with offset, starts
   ST at its offset. A T wave with offset starts TP at its offset. T onsets and U waves
   give no boundary (a U wave lies inside TP).
2. Segments. Each boundary opens a half-open segment up to the next boundary; it is
   labelled only if that next boundary is the one that must follow in a beat
   (P -> PQ -> QR -> RS -> ST -> TP -> P). So a beat tiles without gaps as
       P [P on, P off)  PQ [P off, QRS on)  QR [QRS on, R peak)  RS [R peak, QRS off)
       ST [QRS off, T off)  TP [T off, next P on)
   and wherever the chain breaks (a missing onset/offset, a beat without an annotated P
   wave) the segment is -1.
3. TP spans at most ``max_tp_s`` (1 s): the annotators often skip beats, and a longer
   "T offset -> next P onset" stretch would label unannotated beats as TP. (On QTDB the
   median TP is 73 samples = 0.29 s; 10 % exceed 0.73 s, nearly all of them skipped beats.)
4. Everything before the first and after the last boundary is -1.

Inputs: per record, each lead is optionally filtered (``filter``: "none", the default, or
"bandpass": the baseline, estimated by a 200 ms then a 600 ms running median, is subtracted
and a zero-phase 4th-order Butterworth low-pass at 40 Hz removes mains and muscle noise;
without it baseline wander inflates a record's standard deviation, so the same threshold
means a different amplitude in each record, and noise fires spurious events), normalised
to zero mean and unit standard deviation over the whole record, then level-crossing
encoded (``encoders.level_crossing``, threshold 0.3 by default) into up/down spikes: 4
channels (lead 0 up, lead 0 down, lead 1 up, lead 1 down). The encoder runs continuously
over the span covered by a record's windows.

Sequences: windows of ``seq_len`` steps (default 1301 = 5.2 s at 250 Hz) from the first
annotation on, every ``stride`` steps (default ``seq_len``: no overlap), plus one window
ending at the last annotation so the end of the annotated region is covered; a window is
kept if at least ``min_labelled`` (half) of its steps are labelled. Train and test are
split by record with a seeded permutation, never within a record. With ``context`` = C > 0
each window is preceded by the C steps of the record before it, labelled -1 (ignored by
loss and accuracy; zeros where the record starts later): sequences of C + ``seq_len``
steps whose labelled steps are exactly those of the windows without context, so the
network enters them running, as it would streaming over a whole record, instead of from rest.

Augmentation (``augment`` = K > 0): each *training* record (never a validation or test
record) is added K more times, each a random distortion of the normalised signal: every
lead scaled by its own gain, log-uniform in [0.6, 1.6] (the same threshold then meets
larger and smaller waves, as in another patient's record); the time axis stretched by a
factor uniform in [0.9, 1.1], labels resampled with it (another heart rate); and Gaussian
noise of standard deviation 0.03 added; then encoded and cut like the record itself. The
copies are drawn from the data seed, so a run is reproducible.

A preprocessed ``.npz`` (``x`` [N, T, 4], ``y`` [N, T] with -1 = unlabeled, optional
``record`` [N] naming each sequence's record for the split) can be written with
``save_npz`` and used instead of the raw records (``build_ecg(npz=...)``). The arrays made
from the raw records are cached in the cache folder (see ``common.resolve_cache_dir``).
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import zipfile
from typing import Optional, Sequence

import numpy as np
import torch

from .common import DataError, SequenceDataset, atomic_save_npz, check_int, resolve_cache_dir, split_by_group
from .encoders import level_crossing

CLASSES = ("P", "PQ", "QR", "RS", "ST", "TP")
P, PQ, QR, RS, ST, TP = range(6)
N_LEADS = 2
FILTERS = ("none", "bandpass")
# Bump when the preprocessing changes, so stale cache files are not reused.
_CACHE_VERSION = 1


def segment_labels(samples: Sequence[int], symbols: Sequence[str], n_samples: int, fs: float,
                   max_tp_s: float = 1.0) -> np.ndarray:
    """Per-sample labels int8 [n_samples] from q1c annotations (rule in the module docstring)."""
    samples = [int(s) for s in samples]
    if len(samples) != len(symbols):
        raise ValueError(f"samples and symbols must have the same length; got {len(samples)} and {len(symbols)}")
    bounds = []  # (sample, label that starts there), in annotation order
    for i, sym in enumerate(symbols):
        if sym in ("(", ")", "u"):
            continue
        onset = samples[i - 1] if i > 0 and symbols[i - 1] == "(" else None
        offset = samples[i + 1] if i + 1 < len(symbols) and symbols[i + 1] == ")" else None
        if sym == "p":
            bounds += [(onset, P), (offset, PQ)]
        elif sym == "t":
            bounds.append((offset, TP))
        else:  # a QRS complex of any beat type; its sample is the R peak
            bounds += [(onset, QR), (samples[i], RS), (offset, ST)]
    bounds = [b for b in bounds if b[0] is not None]
    labels = np.full(n_samples, -1, dtype=np.int8)
    max_tp = max_tp_s * fs
    for (start, label), (end, following) in zip(bounds, bounds[1:]):
        if following != (label + 1) % len(CLASSES) or end <= start:
            continue
        if label == TP and end - start > max_tp:
            continue
        labels[max(start, 0):min(end, n_samples)] = label
    return labels


def record_names(qtdb_dir: pathlib.Path) -> list:
    """The records of a QTDB folder that have q1c annotations, sorted."""
    names = sorted(p.name[:-4] for p in qtdb_dir.glob("*.q1c"))
    if not names:
        raise DataError(f"no QTDB records (*.q1c annotation files) in {qtdb_dir}: place the PhysioNet "
                        "QT Database there (.hea, .dat and .q1c files; see python -m srnn_fast.data.download qtdb)")
    return names


def bandpass(signal: np.ndarray, fs: float) -> np.ndarray:
    """The "bandpass" filter of the module docstring, per column of ``signal`` [n, leads]."""
    from scipy import ndimage, signal as sps  # scipy comes with wfdb

    baseline = signal
    for seconds in (0.2, 0.6):
        baseline = ndimage.median_filter(baseline, size=(int(seconds * fs) | 1, 1), mode="nearest")
    b, a = sps.butter(4, 40.0 / (fs / 2))
    return sps.filtfilt(b, a, signal - baseline, axis=0)


def read_signal(stem, channels=None, what: Optional[str] = None):
    """The physical signal float64 [n, N_LEADS] and sampling rate of the WFDB record at ``stem``
    (its path without extension), read with ``wfdb``; ``channels``: the two channels to use
    (indices or signal names; default: the record's, which must be two). Errors (DataError)
    name the file: a missing header or signal file, an unreadable one, the wrong number of
    leads, a signal file shorter than its header says. ``what`` names the record in them."""
    import wfdb

    stem = pathlib.Path(stem)
    what = what or f"WFDB record {stem}"
    hea = stem.with_name(stem.name + ".hea")
    if not hea.is_file():
        raise DataError(f"{what}: missing file {hea}; place the complete record (.hea and its signal file) there")
    try:
        header = wfdb.rdheader(str(stem))
    except Exception as e:  # wfdb raises many types on damaged files
        raise DataError(f"{what}: cannot read its header {hea} ({type(e).__name__}: {e})") from e
    for f in sorted(set(header.file_name or [])):
        if not (stem.parent / f).is_file():
            raise DataError(f"{what}: missing file {stem.parent / f} (named by {hea}); place the complete "
                            "record there")
    channels = pick_channels(header, channels, f"{what}: {hea}")
    try:
        rec = wfdb.rdrecord(str(stem), channels=channels)
    except Exception as e:
        dat = ", ".join(str(stem.parent / f) for f in sorted(set(header.file_name or [])))
        raise DataError(f"{what}: cannot read {hea} / {dat} ({type(e).__name__}: {e}); the files are probably "
                        "truncated or corrupt: download the record again") from e
    signal = rec.p_signal
    if signal is None or signal.ndim != 2 or signal.shape[1] != N_LEADS:
        shape = None if signal is None else signal.shape
        raise DataError(f"{what}: expected {N_LEADS} leads in {stem}.dat; got signal shape {shape}")
    if len(signal) != rec.sig_len:
        raise DataError(f"{what}: {stem}.dat holds {len(signal)} samples, the header says "
                        f"{rec.sig_len}; the file is truncated: download it again")
    return signal, float(rec.fs)


def pick_channels(header, channels=None, where: str = "the record") -> list:
    """Indices of the N_LEADS signals ``channels`` (indices or names; default: all, which must
    be N_LEADS) in a ``wfdb`` header; DataError naming ``where`` otherwise."""
    names = list(header.sig_name or [])
    if channels is None:
        if header.n_sig != N_LEADS:
            raise DataError(f"{where}: expected {N_LEADS} leads; it has {header.n_sig} ({names}); "
                            f"choose {N_LEADS} of them (channels / --leads)")
        return list(range(N_LEADS))
    picked = [names.index(c) if c in names else c for c in channels]
    bad = [c for c in picked if not (isinstance(c, int) and 0 <= c < header.n_sig)]
    if len(picked) != N_LEADS or bad:
        raise DataError(f"{where}: channels (--leads) must name {N_LEADS} of its signals (an index in "
                        f"0..{header.n_sig - 1} or one of {names}); got {bad or list(channels)}")
    return picked


def normalise(signal: np.ndarray, fs: float, filter: str = "none") -> np.ndarray:
    """A record's leads [n, leads] filtered (``filter``) and normalised as the module docstring
    says, float64; invalid samples (NaN) are excluded from the statistics and set to 0."""
    if filter == "bandpass":  # (NaNs would spread through the filters: they become the lead's mean first)
        signal = bandpass(np.where(np.isnan(signal), np.nanmean(signal, axis=0), signal), fs)
    mean = np.nanmean(signal, axis=0)
    std = np.nanstd(signal, axis=0)
    std[~(std > 0)] = 1.0
    return np.nan_to_num((signal - mean) / std, nan=0.0)


def load_record(qtdb_dir: pathlib.Path, name: str, max_tp_s: float = 1.0, filter: str = "none"):
    """One record: (filtered and normalised signal float64 [n, 2], labels int8 [n], fs)."""
    import wfdb

    stem = qtdb_dir / name
    for ext in ("hea", "dat", "q1c"):
        if not stem.with_suffix("." + ext).is_file():
            raise DataError(f"QTDB record {name}: missing file {stem}.{ext}; place the complete "
                            "record (.hea, .dat, .q1c) there")
    signal, fs = read_signal(stem, what=f"QTDB record {name}")
    try:
        ann = wfdb.rdann(str(stem), "q1c")
    except Exception as e:  # wfdb raises many types on damaged files
        raise DataError(f"QTDB record {name}: cannot read {stem}.q1c ({type(e).__name__}: {e}); "
                        "the file is probably truncated or corrupt: download the record again") from e
    labels = segment_labels(ann.sample, ann.symbol, len(signal), fs, max_tp_s)
    return normalise(signal, fs, filter), labels, fs


def window_starts(labels: np.ndarray, seq_len: int, stride: int, min_labelled: float) -> list:
    """Window starts for one record (the rule in the module docstring)."""
    n = len(labels)
    where = np.flatnonzero(labels >= 0)
    if n < seq_len or where.size == 0:
        return []
    first, last = int(where[0]), int(where[-1]) + 1
    starts = list(range(first, max(last - seq_len, first) + 1, stride))
    starts.append(last - seq_len)
    starts = sorted({min(max(s, 0), n - seq_len) for s in starts})
    return [s for s in starts if (labels[s:s + seq_len] >= 0).mean() >= min_labelled]


def distort(signal: np.ndarray, labels: np.ndarray, rng: np.random.Generator, gain=(0.6, 1.6),
            stretch: float = 0.1, noise: float = 0.03):
    """One random distortion of a normalised record (``augment`` in the module docstring):
    (signal float64 [m, leads], labels int8 [m]), m = the stretched length."""
    n, leads = signal.shape
    signal = signal * np.exp(rng.uniform(np.log(gain[0]), np.log(gain[1]), size=leads))
    factor = rng.uniform(1 - stretch, 1 + stretch)
    source = np.minimum(np.arange(int(round(n * factor))) / factor, n - 1)  # where each new sample comes from
    signal = np.stack([np.interp(source, np.arange(n), signal[:, c]) for c in range(leads)], axis=1)
    labels = labels[np.round(source).astype(np.int64)]
    return signal + noise * rng.standard_normal(signal.shape), labels


def preprocess(qtdb_dir, seq_len: int = 1301, threshold: float = 0.3, stride: Optional[int] = None,
               min_labelled: float = 0.5, records: Optional[Sequence[str]] = None,
               max_tp_s: float = 1.0, context: int = 0, filter: str = "none", augment: int = 0,
               seed: int = 0) -> dict:
    """Encode and cut the raw records: dict of x uint8 [N, C + T, 4], y int8 [N, C + T], record
    str [N] (C = ``context``, see the module docstring). With ``augment`` = K > 0: only the
    K distorted copies of each record (``distort``, drawn from ``seed``), not the records."""
    qtdb_dir = pathlib.Path(qtdb_dir)
    stride = seq_len if stride is None else stride
    names = record_names(qtdb_dir) if records is None else list(records)
    xs, ys, recs = [], [], []
    for name in names:
        signal, labels, _ = load_record(qtdb_dir, name, max_tp_s, filter)
        if augment:  # a generator per (seed, record): a record's copies do not depend on the others
            rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")])
            versions = [distort(signal, labels, rng) for _ in range(augment)]
        else:
            versions = [(signal, labels)]
        for signal, labels in versions:
            starts = window_starts(labels, seq_len, stride, min_labelled)
            if not starts:
                continue
            lo, hi = max(starts[0] - context, 0), starts[-1] + seq_len
            spikes = level_crossing(signal[lo:hi], threshold).numpy().astype(np.uint8)
            for s in starts:
                pad = max(lo - (s - context), 0)  # context steps before the record's encoded span
                x = spikes[s - context + pad - lo:s - lo + seq_len]
                xs.append(np.concatenate([np.zeros((pad, x.shape[1]), np.uint8), x]))
                ys.append(np.concatenate([np.full(context, -1, labels.dtype), labels[s:s + seq_len]]))
                recs.append(name)
    if not xs:
        raise DataError(f"no sequence of {seq_len} steps with >= {min_labelled:.0%} labelled steps in the "
                        f"QTDB records of {qtdb_dir}")
    return {"x": np.stack(xs), "y": np.stack(ys), "record": np.array(recs)}


def save_npz(path, x, y, record=None) -> None:
    """Write a preprocessed ECG set (the format ``load_npz`` reads), atomically."""
    arrays = {"x": np.asarray(x), "y": np.asarray(y)}
    if record is not None:
        arrays["record"] = np.asarray(record).astype(str)
    atomic_save_npz(path, **arrays)


def load_npz(path) -> dict:
    """Read and check a preprocessed ECG set: x [N, T, 4], y [N, T] in -1..5, record [N] optional."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"ECG npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read ECG npz file {path} ({type(e).__name__}: {e}); it is truncated or not an "
                        ".npz: write it again (srnn_fast.data.qtdb.save_npz)") from e
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"ECG npz file {path} has no array {key!r}; it holds {sorted(arrays)} "
                            "(expected x [N, T, 4], y [N, T], optional record [N])")
    x, y = arrays["x"], arrays["y"]
    if x.ndim != 3 or x.shape[2] != 2 * N_LEADS or y.shape != x.shape[:2]:
        raise DataError(f"ECG npz file {path}: expected x [N, T, {2 * N_LEADS}] and y [N, T]; got x "
                        f"{list(x.shape)}, y {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer) or y.size and (y.min() < -1 or y.max() >= len(CLASSES)):
        raise DataError(f"ECG npz file {path}: y must be integers in -1..{len(CLASSES) - 1} "
                        f"(-1 = unlabeled); got dtype {y.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"ECG npz file {path}: x holds non-finite values")
    record = arrays.get("record")
    if record is not None and record.shape != (len(x),):
        raise DataError(f"ECG npz file {path}: record must be [N] = [{len(x)}]; got {list(record.shape)}")
    return {"x": x, "y": y, "record": record}


def _cache_key(qtdb_dir: pathlib.Path, names, settings: dict) -> str:
    files = []
    for name in names:
        for ext in ("hea", "dat", "q1c"):
            p = qtdb_dir / f"{name}.{ext}"
            st = p.stat() if p.is_file() else None
            files.append((p.name, st and st.st_size, st and st.st_mtime_ns))
    blob = json.dumps([_CACHE_VERSION, str(qtdb_dir.resolve()), files, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_preprocess(qtdb_dir: pathlib.Path, names, settings: dict, cache_dir) -> dict:
    """``preprocess(qtdb_dir, records=names, **settings)`` through the cache folder."""
    cache = resolve_cache_dir(cache_dir) / f"qtdb-{_cache_key(qtdb_dir, names, settings)}.npz"
    if cache.is_file():
        try:
            return load_npz(cache)
        except DataError:  # a damaged cache file is rebuilt, never trusted
            cache.unlink()
    arrays = preprocess(qtdb_dir, records=names, **settings)
    save_npz(cache, **arrays)
    return arrays


def build_ecg(data_dir, *, seed: int = 0, seq_len: Optional[int] = None, threshold: float = 0.3,
              test_fraction: float = 0.2, npz=None, stride: Optional[int] = None, records=None,
              cache_dir=None, min_labelled: float = 0.5, val_fraction: float = 0.0, context: int = 0,
              filter: str = "none", augment: int = 0, test_npz=None):
    """Train/test SequenceDatasets of (x float32 [T, 4], y int64 [T]) and an info dict.

    ``test_npz``: a preprocessed ``.npz`` (the ``npz`` format) that is the test set, whole,
    instead of a seeded ``test_fraction`` of the records: every record of ``npz`` (or of the
    raw records) then trains (bring-your-own split). Its record names, where both files have
    them, must not occur among the training records.

    ``augment`` = K > 0 adds K distorted copies of every training record to the training
    set (module docstring); validation and test sets are never augmented.

    ``val_fraction`` > 0 holds out that fraction of the *training* records (by record, seed
    + 1) as a validation set, returned as ``info["val"]`` (a SequenceDataset; the record
    names in ``info["val_records"]``), for choosing the epoch without looking at the test set.

    ``data_dir`` holds ``qtdb/`` (unused when ``npz`` is given). ``records`` restricts to
    the named records (e.g. a few for a smoke test). ``seq_len`` defaults to 1301; with
    ``npz`` it defaults to the file's T and must match it if given, while threshold,
    stride, records, min_labelled, context, filter and augment do not apply (the file is
    already encoded and cut).
    """
    test_fraction, val_fraction = float(test_fraction), float(val_fraction)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    augment = check_int("augment", augment, 0)
    if npz is not None:
        if augment:
            raise ValueError("augment needs the raw QTDB records (it distorts the signal before encoding); "
                             "it does not apply with npz")
        arrays = load_npz(npz)
        named = arrays["record"] is not None  # else the names below are indices, which say nothing
        if arrays["record"] is None:  # no grouping given: every sequence is its own group
            arrays["record"] = np.arange(len(arrays["x"])).astype(str)
        if seq_len is not None and seq_len != arrays["x"].shape[1]:
            raise ValueError(f"seq_len={seq_len} does not match the sequences of {npz} "
                             f"(T = {arrays['x'].shape[1]})")
    else:
        seq_len = check_int("seq_len", 1301 if seq_len is None else seq_len, 2)
        stride = check_int("stride", stride, 1, optional=True)
        context = check_int("context", context, 0)
        if not (isinstance(threshold, (int, float)) and np.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a finite positive number; got {threshold!r}")
        if filter not in FILTERS:
            raise ValueError(f"filter must be one of {', '.join(map(repr, FILTERS))}; got {filter!r}")
        if not 0 < min_labelled <= 1:
            raise ValueError(f"min_labelled must be in (0, 1]; got {min_labelled!r}")
        qtdb_dir = pathlib.Path(data_dir) / "qtdb"
        if not qtdb_dir.is_dir():
            raise DataError(f"QTDB folder {qtdb_dir} does not exist: place the PhysioNet QT Database there "
                            "(see python -m srnn_fast.data.download qtdb)")
        names = record_names(qtdb_dir) if records is None else sorted(records)
        settings = dict(seq_len=seq_len, threshold=float(threshold), stride=stride, min_labelled=min_labelled)
        if context:  # (absent when 0 / "none", so existing cache files keep their keys)
            settings["context"] = context
        if filter != "none":
            settings["filter"] = filter
        arrays = _cached_preprocess(qtdb_dir, names, settings, cache_dir)
        named = True
    x = torch.from_numpy(arrays["x"].astype(np.float32))
    y = torch.from_numpy(arrays["y"].astype(np.int64))
    record = arrays["record"]
    if test_npz is None:
        test = split_by_group(record, test_fraction, seed)
    else:
        held = load_npz(test_npz)
        test = np.zeros(len(record), bool)
        shared = sorted(set(held["record"].tolist()) & set(record.tolist())) if held["record"] is not None else []
        if shared and named:
            raise ValueError(f"test_npz {test_npz} holds sequences of training records ({', '.join(shared[:5])}"
                             f"{', ...' if len(shared) > 5 else ''}); a test set must hold other records")
    val = np.zeros_like(test)
    if val_fraction > 0:
        val[~test] = split_by_group(record[~test], val_fraction, seed + 1)
    train = ~test & ~val
    if augment:
        names = sorted(set(record[train].tolist()))
        extra = _cached_preprocess(qtdb_dir, names, dict(settings, augment=augment, seed=seed), cache_dir)
        x = torch.cat([x, torch.from_numpy(extra["x"].astype(np.float32))])
        y = torch.cat([y, torch.from_numpy(extra["y"].astype(np.int64))])
        record = np.concatenate([record, extra["record"]])
        train = np.concatenate([train, np.ones(len(extra["x"]), bool)])
        test, val = (np.concatenate([m, np.zeros(len(extra["x"]), bool)]) for m in (test, val))
    info = {"task": "ecg", "input_size": x.shape[2], "num_classes": len(CLASSES), "seq_len": x.shape[1],
            "class_names": list(CLASSES),
            "train_records": sorted(set(record[train].tolist())),
            "test_records": sorted(set(record[test].tolist()))}
    if test_npz is not None:
        test_record = held["record"] if held["record"] is not None else np.arange(len(held["x"])).astype(str)
        info["test_records"] = sorted(set(test_record.tolist()))
    if val_fraction > 0:
        info["val_records"] = sorted(set(record[val].tolist()))
        info["val"] = SequenceDataset(x[torch.from_numpy(val)], y[torch.from_numpy(val)])
    train, test = torch.from_numpy(train), torch.from_numpy(test)
    if test_npz is not None:
        test_ds = SequenceDataset(torch.from_numpy(held["x"].astype(np.float32)),
                                  torch.from_numpy(held["y"].astype(np.int64)))
    else:
        test_ds = SequenceDataset(x[test], y[test])
    return SequenceDataset(x[train], y[train]), test_ds, info
