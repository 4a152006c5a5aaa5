"""What this installation of srnn_fast is and can do, as text for a bug report
(``srnn_fast.show_config()``, ``python -m srnn_fast``), in the manner of
``torch.__config__.show()``. Every line is computed on its own and a failure becomes the
line's text: the report must come out precisely when something is broken."""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import sys

import torch


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _guard(fn) -> str:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (the report shows any failure instead of raising it)
        return f"error: {type(e).__name__}: {e}"


def _torch_line() -> str:
    if torch.version.cuda is None:
        return f"{torch.__version__} (CPU build, no CUDA)"
    return f"{torch.__version__} (CUDA {torch.version.cuda})"


def _gpus() -> str:
    if torch.version.cuda is None:
        return "none (torch is a CPU build)"
    n = torch.cuda.device_count()
    if n == 0:
        return "none found"
    return ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(n))


def _extension() -> str:
    from . import _ops  # loads srnn_fast._C if it was built

    if _ops.EXTENSION_ERROR is not None:
        from .scan import _BUILD_HINT

        return f"not loaded ({_ops.EXTENSION_ERROR}). {_BUILD_HINT}"
    from . import _C
    from .scan import _has_kernel

    kernels = ["CPU"] + (["CUDA"] if _has_kernel("srnn_fast::scan_fwd", "CUDA") else [])
    return f"loaded, {' + '.join(kernels)} kernels ({_C.__file__})"


def _cuda_sim() -> str:
    from . import cuda_sim

    return cuda_sim.describe()


def _cpu_in_use() -> str:
    from . import _ops
    from .scan import cpu_capability

    if _ops.EXTENSION_ERROR is not None:
        return "none (the extension is not loaded)"
    from . import _C

    in_use, forced = cpu_capability(), os.environ.get("SRNN_FAST_CPU_CAPABILITY")
    if forced and forced.strip().lower() == in_use:
        why = f"SRNN_FAST_CPU_CAPABILITY={forced}"
    elif in_use == _C.supported_cpu_capabilities()[0]:
        why = "the best this CPU supports"
    else:  # chosen in this process (tests, benchmarks)
        why = "set by srnn_fast._C.set_cpu_capability"
    return f"{in_use} ({why})"


def _cpu_supported() -> str:
    from . import _ops

    if _ops.EXTENSION_ERROR is not None:
        return "unknown (the extension is not loaded)"
    from . import _C

    return ", ".join(_C.supported_cpu_capabilities())


def _data_folder() -> str:
    from .data.common import ENV_DATA

    value = os.environ.get(ENV_DATA)
    if not value:
        return (f"none (${ENV_DATA} is not set; the data loaders then need data_dir= / --data-dir; "
                "python -m srnn_fast.data.download fetches the data)")
    path = pathlib.Path(value).expanduser()
    if not path.is_dir():
        return f"{path} (from ${ENV_DATA}), does not exist"
    present = [d for d in ("qtdb", "mnist", "shd") if (path / d).is_dir()]
    return f"{path} (from ${ENV_DATA}), exists, holds: {', '.join(present) or 'none of qtdb/, mnist/, shd/'}"


def _cache_folder() -> str:
    from .data.common import ENV_CACHE, cache_dir_path

    value = os.environ.get(ENV_CACHE)
    path = cache_dir_path()  # not resolve_cache_dir: that creates it, and a report changes nothing
    return f"{path} ({'from $' + ENV_CACHE if value else 'default'}{', exists' if path.is_dir() else ''})"


def config_rows() -> list:
    """The report as (label, value) rows."""
    from . import __version__
    from .scan import available_backends

    return [
        ("srnn_fast", f"{__version__} ({pathlib.Path(__file__).parent})"),
        ("Python", f"{platform.python_version()} on {platform.system()} {platform.machine()} ({sys.executable})"),
        ("torch", _guard(_torch_line)),
        ("CUDA GPUs", _guard(_gpus)),
        ("triton", _version("triton")),
        ("numpy", _version("numpy")),
        ("compiled extension", _guard(_extension)),
        ("backends available", _guard(lambda: ", ".join(available_backends()))),
        ("CUDA harness (tests)", _guard(_cuda_sim)),
        ("CPU kernels in use", _guard(_cpu_in_use)),
        ("CPU kernels this CPU runs", _guard(_cpu_supported)),
        ("torch CPU threads", _guard(lambda: str(torch.get_num_threads()))),
        ("data folder", _guard(_data_folder)),
        ("cache folder", _guard(_cache_folder)),
    ]


def show_config(quiet: bool = False) -> str:
    """The versions, backends, CPU kernels and data folder of this installation, one fact a
    line (include it in a bug report). Prints it unless ``quiet``; returns it either way."""
    rows = config_rows()
    width = max(len(label) for label, _ in rows)
    text = "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in rows)
    if not quiet:
        print(text)
    return text
