"""Sequential MNIST (S-MNIST) and permuted sequential MNIST (PS-MNIST) from the idx files.

The 28 x 28 image is read row by row as 784 pixels p_t = pixel / 255 in [0, 1]; PS-MNIST
first reorders them with a fixed permutation (``permutation(seed)``, the same for every
run with the same ``permutation_seed``). Encodings of the pixel sequence:

    "analog"   x[t] = [p_t]                                   T = 784, F = 1
    "rbf"      x[t] = rbf_population(p_t, population)         T = 784, F = population (80)
    "poisson"  x[t] = Bernoulli(rbf_population(p_t, population)), drawn from a numpy
               generator seeded by SeedSequence([seed, split (0 train, 1 test, 2 val), index]):
               the same spikes for a sample every epoch and run   T = 784, F = population
    "window"   x[s] = [p_{sk}, ..., p_{sk+k-1}] (zero-padded) T = ceil(784 / k), F = k
    "sliding"  x[t] = [b_t, ..., b_{t+k-1}], b_t = 1 if p_t > 0.1 else 0, the last k pixels
               once the window would run past 784 (the input of the method's PS-MNIST
               script: binarised pixels, a window of 4 moved by one pixel per step)
                                                          T = 784, F = k

``gain`` multiplies every encoding (default 1). The method's S-MNIST code feeds its RBF
population as Gaussian *densities*, 1 / (sqrt(2 pi) sigma) ~ 31 times the peak-1 fields
here (``rbf_density_gain``); its presets set that gain (srnn_fast.train).

Items are encoded on access (the encoded train set would not fit in memory).

Validation (``val_fraction`` > 0, the method's protocol): a seeded random ``val_fraction`` of
the training images (by image, data seed + 1, as ECG holds out records) is held out of
training as ``info["val"]``; it chooses the epoch, so the test images are scored but never
used to choose anything. Without it there is no validation set.
"""
from __future__ import annotations

import gzip
import math
import pathlib
import zlib
from typing import Optional

import numpy as np
import torch

from .common import DataError, check_choice, check_int, split_by_group
from .encoders import bernoulli, pixel_windows, rbf_population, sliding_windows


def rbf_density_gain(population: int) -> float:
    """The gain that turns ``rbf_population(x, population)`` (peak 1, sigma = 1 / (population - 1))
    into Gaussian densities N(x; c_j, sigma), the method's RBF input: 1 / (sqrt(2 pi) sigma)."""
    return (population - 1) / math.sqrt(2 * math.pi)


ENCODINGS = ("rbf", "analog", "poisson", "window", "sliding")
BINARY_THRESHOLD = 0.1  # "sliding": a pixel is 1 where pixel / 255 > this (the method's PS-MNIST script)
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
N_PIXELS = 784
_IDX_UBYTE = 0x08
_FETCH_HINT = "see python -m srnn_fast.data.download mnist"


def read_idx(path) -> np.ndarray:
    """An idx file (gzip-compressed or raw, told by its first bytes) as a uint8 array.

    Checks the magic number (two zero bytes, type 0x08 = unsigned byte, number of dims) and
    that the data length matches the sizes in the header.
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"MNIST file {path} does not exist ({_FETCH_HINT})") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read MNIST file {path} ({type(e).__name__}: {e}); it is truncated or corrupt: "
                        f"delete it and download it again ({_FETCH_HINT})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or not 1 <= raw[3] <= 3:
        raise DataError(f"MNIST file {path} is not an unsigned-byte idx file: magic bytes {raw[:4].hex()}, "
                        "expected 0000 08 0d with d = 1..3 dimensions")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"MNIST file {path} is truncated inside its header ({_FETCH_HINT})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"MNIST file {path} holds {len(raw)} bytes (uncompressed), its header {list(shape)} "
                        f"needs {expected}; it is truncated or corrupt: download it again ({_FETCH_HINT})")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_file(mnist_dir: pathlib.Path, stem: str) -> pathlib.Path:
    """``stem.gz`` or ``stem`` in ``mnist_dir``, whichever exists (gz first)."""
    for name in (stem + ".gz", stem):
        if (mnist_dir / name).is_file():
            return mnist_dir / name
    raise DataError(f"MNIST file {mnist_dir / stem}.gz (or uncompressed {stem}) does not exist: place the "
                    f"four MNIST idx files in {mnist_dir} ({_FETCH_HINT})")


def load_split(mnist_dir, split: str, limit: Optional[int] = None):
    """(images uint8 [N, 784], labels int64 [N]) of "train" or "test", the first ``limit``."""
    mnist_dir = pathlib.Path(mnist_dir)
    img_path, lab_path = (find_file(mnist_dir, stem) for stem in FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"MNIST file {img_path}: expected images [N, 28, 28]; got {list(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise DataError(f"MNIST file {lab_path}: expected {len(images)} labels (as many as images in "
                        f"{img_path.name}); got shape {list(labels.shape)}")
    if labels.size and labels.max() > 9:
        raise DataError(f"MNIST file {lab_path}: labels must be 0..9; found {labels.max()}")
    n = len(images) if limit is None else min(limit, len(images))
    return (torch.from_numpy(images[:n].reshape(n, N_PIXELS).copy()),
            torch.from_numpy(labels[:n].astype(np.int64)))


def permutation(seed: int = 0) -> torch.Tensor:
    """The PS-MNIST pixel order: a fixed function of ``seed``."""
    return torch.randperm(N_PIXELS, generator=torch.Generator().manual_seed(seed))


class MNISTDataset(torch.utils.data.Dataset):
    """Item i: (x float32 [T, F], y int64 scalar); see the module docstring for T, F."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, encoding: str = "rbf", population: int = 80,
                 window: Optional[int] = None, order: Optional[torch.Tensor] = None, seed: int = 0,
                 split_id: int = 0, gain: float = 1.0):
        self.images, self.labels = images, labels
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not (math.isfinite(gain) and gain > 0):
            raise ValueError(f"gain must be a finite positive number; got {gain!r}")
        self.gain = float(gain)
        self.encoding = check_choice("encoding", encoding, ENCODINGS)
        self.population = check_int("population", population, 2)
        if encoding in ("window", "sliding") and window is None:
            raise ValueError(f"window (pixels per step) must be given for encoding={encoding!r}")
        self.window = check_int("window", window, 1, optional=True)
        if self.window is not None and self.window > N_PIXELS:
            raise ValueError(f"window must be at most {N_PIXELS} pixels; got {window}")
        self.order, self.seed, self.split_id = order, seed, split_id
        # Pixels take only 256 values, so the population code is a lookup table [256, F]:
        # a gather per item instead of 784 x F exponentials. Items are built with numpy,
        # single-threaded: torch's intra-op threads slow such small ops down on a busy machine.
        self.table = rbf_population(torch.arange(256) / 255.0, self.population).numpy()
        self.order_np = None if order is None else np.asarray(order)

    @property
    def seq_len(self) -> int:
        return -(-N_PIXELS // self.window) if self.encoding == "window" else N_PIXELS

    @property
    def input_size(self) -> int:
        return {"analog": 1, "window": self.window, "sliding": self.window}.get(self.encoding, self.population)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        i = range(len(self))[i]  # also checks the range
        raw = self.images[i].numpy()
        if self.order_np is not None:
            raw = raw[self.order_np]
        if self.encoding == "analog":
            x = torch.from_numpy(raw.astype(np.float32) / 255.0).unsqueeze(-1)
        elif self.encoding == "window":
            x = pixel_windows(torch.from_numpy(raw.astype(np.float32) / 255.0), self.window)
        elif self.encoding == "sliding":
            x = sliding_windows(torch.from_numpy((raw / 255.0 > BINARY_THRESHOLD).astype(np.float32)), self.window)
        elif self.encoding == "rbf":
            x = torch.from_numpy(self.table[raw])
        else:
            # The same draw as encoders.poisson_population(pixels, population, rng).
            x = bernoulli(self.table[raw], np.random.SeedSequence([self.seed, self.split_id, i]))
        return (x if self.gain == 1 else x * self.gain), self.labels[i]


def build_mnist(data_dir, *, permuted: bool, seed: int = 0, encoding: str = "rbf", population: int = 80,
                window: Optional[int] = None, limit: Optional[int] = None, permutation_seed: int = 0,
                val_fraction: float = 0.0, gain: float = 1.0):
    """Train/test MNISTDatasets for S-MNIST (``permuted=False``) or PS-MNIST, and an info dict;
    with ``val_fraction`` > 0 the held-out training images are ``info["val"]`` (module docstring)."""
    limit = check_int("limit", limit, 1, optional=True)
    val_fraction = float(val_fraction)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    mnist_dir = pathlib.Path(data_dir) / "mnist"
    if not mnist_dir.is_dir():
        raise DataError(f"MNIST folder {mnist_dir} does not exist: place the four MNIST idx files there "
                        f"({_FETCH_HINT})")
    order = permutation(permutation_seed) if permuted else None
    splits = {name: load_split(mnist_dir, name, limit) for name in ("train", "test")}
    if val_fraction > 0:
        images, labels = splits.pop("train")
        held = torch.from_numpy(split_by_group(np.arange(len(images)), val_fraction, seed + 1))
        splits = {"train": (images[~held], labels[~held]), "test": splits["test"], "val": (images[held], labels[held])}
    # split_id keys the Poisson draws: 0 train, 1 test, 2 validation
    datasets = {name: MNISTDataset(*splits[name], encoding=encoding, population=population, window=window,
                                   order=order, seed=seed, split_id=k, gain=gain)
                for k, name in enumerate(("train", "test", "val")) if name in splits}
    train = datasets["train"]
    info = {"task": "psmnist" if permuted else "smnist", "input_size": train.input_size,
            "num_classes": 10, "seq_len": train.seq_len, "class_names": [str(d) for d in range(10)],
            "encoding": encoding}
    if permuted:
        info["permutation_seed"] = permutation_seed
    if "val" in datasets:
        info["val"] = datasets["val"]
    return train, datasets["test"], info
