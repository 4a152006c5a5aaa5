"""Backend "cuda_sim": the CUDA code path run on the CPU, for tests.

srnn_fast._cuda_sim compiles the CUDA scan's host code (csrc/scan_cuda_host.h: checks,
launch planning, launches) and its kernels (csrc/scan_cuda_kernels.cuh) with the host
compiler against an execution harness (csrc/sim/harness.h): every CUDA thread of a block is
a fiber, blocks run one after another, ``__syncthreads`` is a block barrier and
``__ballot_sync`` a barrier over the lanes of its mask. Each op runs under every thread
schedule of :func:`schedules` (default: ascending and reversed thread order between barriers)
and fails unless they all give the same bits. It shows what the kernels compute, which
launches the planner makes for a device with the limits of :func:`emulated_device`, and any
missing barrier, unwritten output, shared memory read before it is written, or thread that
leaves a barrier behind; it cannot show timing, coalescing, the machine code ptxas emits, or
anything that relies on the lanes of a warp running in lockstep. Never picked by "auto" and
not in ``available_backends()``.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from .cuda_resources import SM_COUNTS, SMEM_OPTIN_LIMIT

try:
    from . import _cuda_sim
except ImportError as e:  # not built (not Linux, SRNN_FAST_BUILD_SIM=0) or built against another torch
    _cuda_sim = None
    SIM_ERROR = f"{type(e).__name__}: {e}"
else:
    SIM_ERROR = None

# What the emulated device reports: multiprocessors, cudaDevAttrMaxSharedMemoryPerBlockOptin,
# static shared memory of a kernel; the figures the resource checks plan with.
SM90, SM80 = (dict(sms=SM_COUNTS[cc], smem_optin=SMEM_OPTIN_LIMIT[cc], static_smem=0) for cc in (90, 80))

_HINT = ("Build it with: pip install -e . --no-build-isolation (on Linux; SRNN_FAST_BUILD_SIM=1 forces it, "
         "SRNN_FAST_BUILD_SIM=0 leaves it out)")


class Launch(NamedTuple):
    kernel: str  # e.g. "fwd_persistent_kernel<double, double>"
    grid: tuple
    block: tuple
    smem: int  # dynamic shared memory, bytes
    count: int  # launches with this configuration


class Plan(NamedTuple):
    rows: int  # batch rows per block of the persistent kernel; 0: the stepwise path
    grid: int
    block_x: int
    smem: int


def _module():
    if _cuda_sim is None:
        from .scan import BackendUnavailableError

        raise BackendUnavailableError(f"backend 'cuda_sim' is not built ({SIM_ERROR}). {_HINT}")
    return _cuda_sim


_fakes_registered = False


def load_kernels():
    """(scan_fwd, scan_bwd) of the harness's copy of the CUDA path (srnn_fast_sim:: ops)."""
    global _fakes_registered
    _module()
    if not _fakes_registered:  # the same shapes as srnn_fast::, for opcheck and torch.compile
        from . import _ops

        torch.library.register_fake("srnn_fast_sim::scan_fwd")(_ops._scan_fwd_fake)
        torch.library.register_fake("srnn_fast_sim::scan_bwd")(_ops._scan_bwd_fake)
        _fakes_registered = True
    return torch.ops.srnn_fast_sim.scan_fwd, torch.ops.srnn_fast_sim.scan_bwd


@contextlib.contextmanager
def emulated_device(sms: int = None, smem_optin: int = None, static_smem: int = None):
    """Inside the block the harness's device reports these limits (the others unchanged);
    the launch planner reads them as it would a GPU's."""
    m = _module()
    before = m.get_device()
    new = [v if v is not None else old for v, old in zip((sms, smem_optin, static_smem), before)]
    m.set_device(*new)
    try:
        yield
    finally:
        m.set_device(*before)


def device() -> dict:
    return dict(zip(("sms", "smem_optin", "static_smem"), _module().get_device()))


@contextlib.contextmanager
def schedules(*names: str):
    """Every op inside the block runs under each of these thread schedules ("ascending",
    "reversed", "shuffled:SEED") and fails unless all give the same bits."""
    m = _module()
    before = m.get_schedules()
    m.set_schedules(list(names))
    try:
        yield
    finally:
        m.set_schedules(before)


def launches() -> list:
    """The launches since the last :func:`clear_launches`, one per configuration."""
    return [Launch(*r) for r in _module().launch_log()]


def clear_launches() -> None:
    _module().clear_launch_log()


def plan(B: int, H: int, dtype: torch.dtype, forward: bool) -> Plan:
    """What the CUDA launch planner (csrc/cuda_plan.h) decides for B rows of H neurons on the
    emulated device."""
    return Plan(*_module().plan(B, H, dtype == torch.float64, forward))


def describe() -> str:
    """One line for show_config()."""
    if _cuda_sim is None:
        return f"not built ({SIM_ERROR})"
    d = device()
    return (f"built (backend 'cuda_sim', tests only: the CUDA kernels run thread by thread on the CPU; "
            f"emulated device: {d['sms']} SMs, {d['smem_optin']} B shared memory per block; "
            f"schedules {', '.join(_module().get_schedules())})")
