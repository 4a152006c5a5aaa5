"""Spiking Heidelberg Digits (SHD) from its HDF5 files.

Files: ``data_dir/shd/shd_train.h5`` and ``shd_test.h5`` (the published files are gzipped:
gunzip them first). Each holds ``spikes/times`` (per sample, spike times in seconds),
``spikes/units`` (per sample, the channel 0..699 of each spike) and ``labels`` (0..19).
A sample becomes binary frames of ``frame_ms`` (4 or 10) over [0 s, 1 s): T = 250 or 100,
700 channels, 1 where the channel spiked at least once in the frame (encoders.bin_spikes);
spikes after 1 s are cut, shorter samples are zero-padded.
"""
from __future__ import annotations

import pathlib
from typing import Optional

import numpy as np
import torch

from .common import DataError, check_choice, check_int
from .encoders import bin_spikes

N_CHANNELS = 700
N_CLASSES = 20
WINDOW_MS = 1000
FRAME_MS = (4, 10)
_FETCH_HINT = "see python -m srnn_fast.data.download shd"


def load_split(path, limit: Optional[int] = None):
    """(times list of float arrays, units list of int arrays, labels int64 [N]) of one file."""
    import h5py

    path = pathlib.Path(path)
    if not path.is_file():
        gz = path.with_name(path.name + ".gz")
        if gz.is_file():
            raise DataError(f"SHD file {path} does not exist but {gz.name} does: decompress it first "
                            f"(gunzip -k {gz})")
        raise DataError(f"SHD file {path} does not exist: place shd_train.h5 and shd_test.h5 in {path.parent} "
                        f"({_FETCH_HINT})")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("spikes/times", "spikes/units", "labels") if k not in f]
            if missing:
                raise DataError(f"SHD file {path} lacks {', '.join(missing)} (it holds {sorted(f.keys())}); "
                                f"expected spikes/times, spikes/units and labels ({_FETCH_HINT})")
            labels = f["labels"]
            n = len(labels) if limit is None else min(limit, len(labels))
            times, units = f["spikes/times"][:n], f["spikes/units"][:n]
            labels = labels[:n].astype(np.int64)
    except DataError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read SHD file {path} ({type(e).__name__}: {e}); it is truncated or corrupt: "
                        f"download it again ({_FETCH_HINT})") from e
    if not (len(times) == len(units) == len(labels)):
        raise DataError(f"SHD file {path}: spikes/times, spikes/units and labels differ in length "
                        f"({len(times)}, {len(units)}, {len(labels)})")
    for i, (t, u) in enumerate(zip(times, units)):
        if np.shape(t) != np.shape(u):
            raise DataError(f"SHD file {path}: sample {i} has {np.size(t)} spike times but {np.size(u)} units")
    if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise DataError(f"SHD file {path}: labels must be 0..{N_CLASSES - 1}; found {labels.min()}..{labels.max()}")
    return list(times), list(units), torch.from_numpy(labels)


class SHDDataset(torch.utils.data.Dataset):
    """Item i: (x float32 [1000 / frame_ms, 700] binary frames, y int64 scalar)."""

    def __init__(self, times, units, labels: torch.Tensor, frame_ms: int = 4):
        self.times, self.units, self.labels = times, units, labels
        self.frame_ms = int(check_choice("frame_ms", frame_ms, FRAME_MS))
        self.seq_len = WINDOW_MS // self.frame_ms

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = bin_spikes(self.times[i], self.units[i], N_CHANNELS, self.frame_ms, self.seq_len)
        return x, self.labels[i]


def build_shd(data_dir, *, seed: int = 0, frame_ms: int = 4, limit: Optional[int] = None):
    """Train/test SHDDatasets and an info dict. ``seed`` is unused: SHD has a fixed split and
    a deterministic encoding; it is accepted so every task takes the same arguments."""
    limit = check_int("limit", limit, 1, optional=True)
    check_choice("frame_ms", frame_ms, FRAME_MS)
    shd_dir = pathlib.Path(data_dir) / "shd"
    train, test = (SHDDataset(*load_split(shd_dir / f"shd_{split}.h5", limit), frame_ms=frame_ms)
                   for split in ("train", "test"))
    info = {"task": "shd", "input_size": N_CHANNELS, "num_classes": N_CLASSES, "seq_len": train.seq_len,
            "frame_ms": frame_ms}
    return train, test, info
