"""Tiny synthetic data sets in the real on-disk layouts, for tests and CI smoke runs.

    write_tiny("ecg", folder)     -> folder/qtdb/  4 wfdb records (.hea/.dat/.q1c), 250 Hz, 2 leads
    write_tiny("smnist", folder)  -> folder/mnist/ the four idx .gz files (train 64, test 32 images)
    write_tiny("psmnist", folder) -> the same files as smnist
    write_tiny("shd", folder)     -> folder/shd/   shd_train.h5 (40 samples), shd_test.h5 (20)

Each returns the task's subfolder. ``folder`` is then a valid ``data_dir``. The contents are
seeded, so the same call writes the same files; they have the structure of the real data,
not its statistics.
"""
from __future__ import annotations

import gzip
import pathlib
import struct

import numpy as np

# Sample offsets of the annotations within one synthetic beat, and the beat period (0.8 s
# at 250 Hz): P on, P peak, P off, QRS on, R peak, QRS off, T peak, T off.
BEAT = {"p_on": 10, "p": 22, "p_off": 34, "qrs_on": 50, "r": 58, "qrs_off": 66, "t": 110, "t_off": 140}
BEAT_PERIOD = 200
ECG_FS = 250


def _bump(n, center, width, amp):
    t = np.arange(n)
    return amp * np.exp(-0.5 * ((t - center) / width) ** 2)


def write_ecg_record(folder, name, n_beats=18, lead_in=300, seed=0):
    """One wfdb record of ``n_beats`` annotated beats after ``lead_in`` unannotated samples
    (q1c: '(' p ')' '(' N ')' t ')' per beat). Returns the annotation (samples, symbols)."""
    import wfdb

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = lead_in + (n_beats + 1) * BEAT_PERIOD
    lead = 0.02 * rng.standard_normal(n)
    samples, symbols = [], []
    for k in range(n_beats):
        b = lead_in + k * BEAT_PERIOD
        lead += _bump(n, b + BEAT["p"], 6, 0.15) + _bump(n, b + BEAT["r"], 3, 1.0) + _bump(n, b + BEAT["t"], 12, 0.3)
        for key, sym in (("p_on", "("), ("p", "p"), ("p_off", ")"), ("qrs_on", "("), ("r", "N"),
                         ("qrs_off", ")"), ("t", "t"), ("t_off", ")")):
            samples.append(b + BEAT[key])
            symbols.append(sym)
    signal = np.stack([lead, -0.5 * lead + 0.02 * rng.standard_normal(n)], axis=1)
    wfdb.wrsamp(name, fs=ECG_FS, units=["mV", "mV"], sig_name=["MLII", "V5"], p_signal=signal,
                fmt=["212", "212"], write_dir=str(folder))
    # wfdb.wrann only accepts letters in the extension; the file format does not depend on it.
    wfdb.wrann(name, "qxc", np.array(samples), symbol=symbols, write_dir=str(folder))
    (folder / f"{name}.qxc").replace(folder / f"{name}.q1c")
    return samples, symbols


def _write_idx(path, array: np.ndarray):
    # idx: 2 zero bytes, type code 0x08 (unsigned byte), number of dims, big-endian sizes.
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_tiny(task: str, folder, seed: int = 0) -> pathlib.Path:
    folder = pathlib.Path(folder)
    rng = np.random.default_rng(seed)
    if task == "ecg":
        out = folder / "qtdb"
        for i in range(4):
            write_ecg_record(out, f"syn{i:02d}", seed=seed + i)
    elif task in ("smnist", "psmnist"):
        out = folder / "mnist"
        out.mkdir(parents=True, exist_ok=True)
        for prefix, count in (("train", 64), ("t10k", 32)):
            labels = np.arange(count) % 10
            # Each class lights a different band of rows, so a model can learn it.
            images = (rng.random((count, 28, 28)) * 60).astype(np.uint8)
            for i, c in enumerate(labels):
                images[i, 2 * c + 3:2 * c + 7, 4:24] = 255
            _write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images)
            _write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels)
    elif task == "shd":
        import h5py

        out = folder / "shd"
        out.mkdir(parents=True, exist_ok=True)
        for split, count in (("train", 40), ("test", 20)):
            labels = np.arange(count) % 20
            with h5py.File(out / f"shd_{split}.h5", "w") as f:
                times = f.create_dataset("spikes/times", (count,), dtype=h5py.vlen_dtype(np.float32))
                units = f.create_dataset("spikes/units", (count,), dtype=h5py.vlen_dtype(np.uint16))
                for i, c in enumerate(labels):
                    k = int(rng.integers(50, 200))
                    # Class c fires mostly in channels 35c..35c+34, over up to 1.2 s (past the
                    # 1 s window, which the loader cuts).
                    u = np.where(rng.random(k) < 0.8, 35 * c + rng.integers(0, 35, k), rng.integers(0, 700, k))
                    order = np.argsort(t := rng.random(k) * 1.2)
                    times[i] = t[order].astype(np.float32)
                    units[i] = u[order].astype(np.uint16)
                f.create_dataset("labels", data=labels.astype(np.uint16))
    else:
        raise ValueError(f"task must be one of 'ecg', 'smnist', 'psmnist', 'shd'; got {task!r}")
    return out
