"""Data loaders and encoders for the four tasks: ECG (QTDB), S-MNIST, PS-MNIST, SHD.

    train_ds, test_ds, info = build_datasets("ecg", data_dir, seed=0)

Items are ``(x, y)``: x float32 [T, F] (time-major per sample; a DataLoader batch is
[B, T, F]); y an int64 class for smnist/psmnist/shd, or int64 [T] per-step labels
(-1 = unlabeled) for ecg. ``info`` holds task, input_size, num_classes, seq_len and
class_names (ecg, mnist), plus task-specific entries. Files live under the data folder
(``resolve_data_dir``) as ``qtdb/``, ``mnist/``, ``shd/``; ``synthetic.write_tiny`` writes
tiny stand-ins in the same layout, ``download`` fetches the real ones.
"""
from .common import DataError, resolve_data_dir
from .mnist import build_mnist
from .qtdb import build_ecg
from .shd import build_shd

TASKS = ("ecg", "smnist", "psmnist", "shd")
# Options per task and their defaults (the docstrings of build_ecg / build_mnist / build_shd
# and the module docstrings of qtdb / mnist / shd say what they mean).
OPTIONS = {
    "ecg": dict(seq_len=1301, threshold=0.3, test_fraction=0.2, val_fraction=0.0, context=0, npz=None, stride=None, records=None,
                cache_dir=None, min_labelled=0.5, filter="none", augment=0, test_npz=None),
    "smnist": dict(encoding="rbf", population=80, window=None, limit=None, val_fraction=0.0, gain=1.0),
    "psmnist": dict(encoding="rbf", population=80, window=None, limit=None, permutation_seed=0, val_fraction=0.0,
                    gain=1.0),
    "shd": dict(frame_ms=4, limit=None),
}

__all__ = ["TASKS", "OPTIONS", "DataError", "build_datasets", "resolve_data_dir"]


def build_datasets(task, data_dir=None, *, seed=0, **options):
    """(train_ds, test_ds, info) for ``task`` in TASKS; ``options`` as in OPTIONS.

    ``data_dir`` (else $SRNN_FAST_DATA) is not needed for ecg with ``npz=...``. Unknown
    options or bad values raise ValueError naming them; missing or damaged files raise
    DataError naming the file and what to do.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}; got {task!r}")
    unknown = sorted(set(options) - set(OPTIONS[task]))
    if unknown:
        raise ValueError(f"unknown option(s) for task {task!r}: {', '.join(unknown)}; "
                         f"expected some of {', '.join(OPTIONS[task])}")
    if task == "ecg" and options.get("npz") is not None:
        return build_ecg(None, seed=seed, **options)
    root = resolve_data_dir(data_dir)
    if task == "ecg":
        return build_ecg(root, seed=seed, **options)
    if task == "shd":
        return build_shd(root, seed=seed, **options)
    return build_mnist(root, permuted=task == "psmnist", seed=seed, **options)
