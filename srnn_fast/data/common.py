"""Shared pieces of the data loaders: the data folder, the cache folder, errors, datasets."""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Optional

import numpy as np
import torch

ENV_DATA = "SRNN_FAST_DATA"
ENV_CACHE = "SRNN_FAST_CACHE"


class DataError(RuntimeError):
    """A data file is missing, truncated or malformed; the message names the file and the fix."""


def resolve_data_dir(data_dir=None) -> pathlib.Path:
    """The data folder: ``data_dir`` if given, else ``$SRNN_FAST_DATA``.

    It holds ``qtdb/``, ``mnist/`` and ``shd/``. Raises DataError if neither is set or the
    folder does not exist.
    """
    source = "data_dir"
    if data_dir is None or str(data_dir) == "":
        data_dir, source = os.environ.get(ENV_DATA) or None, "$" + ENV_DATA
    if data_dir is None:
        raise DataError(f"no data folder: pass --data-dir / data_dir=... or set ${ENV_DATA} to a folder "
                        "holding qtdb/, mnist/ and shd/ (python -m srnn_fast.data.download {qtdb,mnist,shd} "
                        "--data-dir DIR fetches them)")
    path = pathlib.Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data folder {path} (from {source}) does not exist or is not a folder")
    return path


def cache_dir_path(cache_dir=None) -> pathlib.Path:
    """Where preprocessed arrays are cached: ``cache_dir``, else ``$SRNN_FAST_CACHE``, else
    ``~/.cache/srnn_fast`` (the data folder may be read-only, so the cache never lives there).
    Only the path: nothing is created."""
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_CACHE) or pathlib.Path.home() / ".cache" / "srnn_fast"
    return pathlib.Path(cache_dir).expanduser()


def resolve_cache_dir(cache_dir=None) -> pathlib.Path:
    """``cache_dir_path(cache_dir)``, created if missing."""
    path = cache_dir_path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {path} ({e}); pass cache_dir=... (--cache-dir) or set "
                        f"${ENV_CACHE} to a writable folder") from e
    return path


def atomic_save_npz(path, **arrays) -> None:
    """Write an .npz next to ``path`` under a temporary name, then rename it into place, so a
    crash or a full disk never leaves a half-written file under the final name."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def split_by_group(group: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean hold-out mask over samples: a seeded random ``fraction`` of the groups (at
    least one, at most all but one) is held out, with all of its samples. ECG groups by
    record (a record's windows never straddle the split); MNIST by image (every image its
    own group)."""
    groups = np.unique(group)
    if len(groups) < 2:
        raise DataError(f"need at least 2 groups (records, images) to split; got {len(groups)}")
    n_held = min(max(1, round(fraction * len(groups))), len(groups) - 1)
    held = np.random.default_rng(seed).permutation(groups)[:n_held]
    return np.isin(group, held)


def check_int(name: str, value, minimum: int = 1, optional: bool = False) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}; got {value!r}")
    return int(value)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


class SequenceDataset(torch.utils.data.Dataset):
    """Pre-encoded sequences: item i is ``(x[i], y[i])`` with x float32 [T, F]."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length; got {len(x)} and {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]
