"""Fetch the public data sets into the data folder, with checksums.

    python -m srnn_fast.data.download {qtdb,mnist,shd,all} [--data-dir DIR] [--verify]

Sources and checks:
- qtdb:  PhysioNet QT Database 1.0.0, https://physionet.org/files/qtdb/1.0.0/ (ODC-By):
         <record>.hea/.dat/.q1c of the 105 records, each checked against its SHA-256.
- mnist: https://ossci-datasets.s3.amazonaws.com/mnist/ (the mirror torchvision uses;
         the original is http://yann.lecun.com/exdb/mnist/): the four idx .gz files, checked
         by the SHA-256 of their decompressed content.
- shd:   Spiking Heidelberg Digits, https://zenkelab.org/datasets/ (Cramer et al. 2020,
         CC-BY 4.0): shd_train.h5.gz / shd_test.h5.gz, decompressed to .h5. No checksum is
         known to us, so the result is checked by reading its full HDF5 structure.

Every file is written under a temporary name in the target folder and renamed into place
only after it verified, so an interrupted or failed download leaves nothing half-written.
Offline, the error lists which files to place where. ``--verify`` checks files already there.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import pathlib
import shutil
import sys
import tempfile
import urllib.error
import urllib.request

from .._cli import user_errors
from ._checksums import MNIST_CONTENT_SHA256, QTDB_SHA256
from .common import DataError, resolve_data_dir

QTDB_URL = "https://physionet.org/files/qtdb/1.0.0/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
SHD_URL = "https://zenkelab.org/datasets/"
SHD_FILES = ("shd_test.h5", "shd_train.h5")
TASK_FOLDERS = {"qtdb": "qtdb", "mnist": "mnist", "shd": "shd"}
_TIMEOUT_S = 60


def sha256(path, decompress: bool = False) -> str:
    h = hashlib.sha256()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_qtdb_file(path: pathlib.Path, name: str = None) -> None:
    """Raise DataError unless ``path`` (the file ``name``, default its own) has its SHA-256."""
    expected = QTDB_SHA256.get(name or path.name)
    if expected is not None and sha256(path) != expected:
        raise DataError(f"QTDB file {path} does not match its SHA-256 checksum; delete it and download it again")


def check_mnist_file(path: pathlib.Path, name: str = None) -> None:
    name = name or path.name
    stem = name[:-3] if name.endswith(".gz") else name
    try:
        digest = sha256(path, decompress=name.endswith(".gz"))
    except (OSError, EOFError) as e:
        raise DataError(f"MNIST file {path} is truncated or not gzip ({e}); delete it and download it again") from e
    if digest != MNIST_CONTENT_SHA256[stem]:
        raise DataError(f"MNIST file {path} does not match the SHA-256 of {stem}; delete it and download it again")


def check_shd_file(path: pathlib.Path, name: str = None) -> None:
    """Reads the whole file: DataError if it is not HDF5, is cut short, lacks a key, or holds
    ragged or out-of-range entries (shd.load_split). Sample counts are not checked: sources
    disagree on them (8156/2264 vs 8332/2088 train/test)."""
    from .shd import load_split

    _, _, labels = load_split(path)
    if len(labels) == 0:
        raise DataError(f"SHD file {path} holds no samples; delete it and download it again")


def plan(task: str):
    """[(url, file name in the task folder, check, gunzip)] for one task."""
    if task == "qtdb":
        return [(QTDB_URL + name, name, check_qtdb_file, False) for name in sorted(QTDB_SHA256)]
    if task == "mnist":
        return [(MNIST_URL + stem + ".gz", stem + ".gz", check_mnist_file, False)
                for stem in sorted(MNIST_CONTENT_SHA256)]
    if task == "shd":
        return [(SHD_URL + name + ".gz", name, check_shd_file, True) for name in SHD_FILES]
    raise ValueError(f"task must be one of 'qtdb', 'mnist', 'shd'; got {task!r}")


def manual_instructions(task: str, folder: pathlib.Path) -> str:
    if task == "qtdb":
        return (f"place the .hea, .dat and .q1c files of the {len(QTDB_SHA256) // 3} QTDB records (sel100 ... "
                f"sele0704) from {QTDB_URL} in {folder} (e.g. wget -r -np -nd -P {folder} {QTDB_URL})")
    names = ", ".join(name for _, name, _, _ in plan(task))
    how = " (download the .gz files and gunzip them)" if task == "shd" else ""
    return f"place {names} from {plan(task)[0][0].rsplit('/', 1)[0]}/ in {folder}{how}"


def _fetch(url: str, dest: pathlib.Path, check, gunzip: bool) -> None:
    """Download ``url`` to a temporary file beside ``dest``, check it, then rename it."""
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = pathlib.Path(tmp)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            source = gzip.GzipFile(fileobj=response) if gunzip else response
            shutil.copyfileobj(source, out, 1 << 20)
        try:
            check(tmp, dest.name)
        except DataError as e:
            raise DataError(f"the download of {url} failed its check: {e}") from None
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(task: str, data_dir=None, verify_only: bool = False) -> pathlib.Path:
    """Fetch (or with ``verify_only`` just check) the files of ``task`` into data_dir/<task>/;
    files already there are checked, not fetched again. Returns the task folder."""
    root = resolve_data_dir(data_dir)
    folder = root / TASK_FOLDERS[task]
    items = plan(task)
    missing = []
    for url, name, check, gunzip in items:  # check what is there before fetching anything
        dest = folder / name
        if dest.is_file():
            check(dest)
        else:
            missing.append((url, dest, check, gunzip))
    if missing and verify_only:
        raise DataError(f"{len(missing)} file(s) missing, e.g. {missing[0][1]}: {manual_instructions(task, folder)}")
    for url, dest, check, gunzip in missing:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            _fetch(url, dest, check, gunzip)
        except (urllib.error.URLError, OSError, EOFError) as e:  # offline, refused, cut short
            raise DataError(f"cannot download {url} ({type(e).__name__}: {e}). If this machine is offline, "
                            f"{manual_instructions(task, folder)}") from e
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m srnn_fast.data.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("qtdb", "mnist", "shd", "all"))
    parser.add_argument("--data-dir", default=None, help="data folder (default: $SRNN_FAST_DATA)")
    parser.add_argument("--verify", action="store_true", help="only check the files already there")
    args = parser.parse_args(argv)
    tasks = ("qtdb", "mnist", "shd") if args.task == "all" else (args.task,)
    with user_errors(parser, DataError):
        for task in tasks:
            folder = download(task, args.data_dir, verify_only=args.verify)
            print(f"{task}: {len(plan(task))} files OK in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
