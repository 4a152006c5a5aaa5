"""Sequential MNIST (S-MNIST) and permuted sequential MNIST (PS-MNIST) from the idx files.

The 28 x 28 image is read row by row as 784 pixels p_t = pixel / 255 in [0, 1]; PS-MNIST
first reorders them with a fixed permutation (``permutation(seed)``, the same for every
run with the same ``permutation_seed``). Encodings of the pixel sequence:

    "analog"   x[t] = [p_t]                                   T = 784, F = 1
    "rbf"      x[t] = rbf_population(p_t, population)         T = 784, F = population (80)
    "poisson"  x[t] = Bernoulli(rbf_population(p_t, population)), drawn from a numpy
               generator seeded by SeedSequence([seed, split (0 train, 1 test), index]):
               the same spikes for a sample every epoch and run   T = 784, F = population
    "window"   x[s] = [p_{sk}, ..., p_{sk+k-1}] (zero-padded) T = ceil(784 / k), F = k

Items are encoded on access (the encoded train set would not fit in memory).
"""
from __future__ import annotations

import gzip
import pathlib
import zlib
from typing import Optional

import numpy as np
import torch

from .common import DataError, check_choice, check_int
from .encoders import bernoulli, pixel_windows, rbf_population

ENCODINGS = ("rbf", "analog", "poisson", "window")
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
                 split_id: int = 0):
        self.images, self.labels = images, labels
        self.encoding = check_choice("encoding", encoding, ENCODINGS)
        self.population = check_int("population", population, 2)
        if encoding == "window" and window is None:
            raise ValueError("window (pixels per step) must be given for encoding='window'")
        self.window = check_int("window", window, 1, optional=True)
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
        return {"analog": 1, "window": self.window}.get(self.encoding, self.population)

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
        elif self.encoding == "rbf":
            x = torch.from_numpy(self.table[raw])
        else:
            # The same draw as encoders.poisson_population(pixels, population, rng).
            x = bernoulli(self.table[raw], np.random.SeedSequence([self.seed, self.split_id, i]))
        return x, self.labels[i]


def build_mnist(data_dir, *, permuted: bool, seed: int = 0, encoding: str = "rbf", population: int = 80,
                window: Optional[int] = None, limit: Optional[int] = None, permutation_seed: int = 0):
    """Train/test MNISTDatasets for S-MNIST (``permuted=False``) or PS-MNIST, and an info dict."""
    limit = check_int("limit", limit, 1, optional=True)
    mnist_dir = pathlib.Path(data_dir) / "mnist"
    if not mnist_dir.is_dir():
        raise DataError(f"MNIST folder {mnist_dir} does not exist: place the four MNIST idx files there "
                        f"({_FETCH_HINT})")
    order = permutation(permutation_seed) if permuted else None
    datasets = [MNISTDataset(*load_split(mnist_dir, split, limit), encoding=encoding, population=population,
                             window=window, order=order, seed=seed, split_id=k)
                for k, split in enumerate(("train", "test"))]
    info = {"task": "psmnist" if permuted else "smnist", "input_size": datasets[0].input_size,
            "num_classes": 10, "seq_len": datasets[0].seq_len, "class_names": [str(d) for d in range(10)],
            "encoding": encoding}
    if permuted:
        info["permutation_seed"] = permutation_seed
    return datasets[0], datasets[1], info
