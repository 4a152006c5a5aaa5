"""The public scan: one dispatch function, one autograd.Function, the fused-kernel contract.

Every fused backend ("cuda", "triton", "cpp") provides two functions with this contract
(alpha = exp(-dt / tau_m) and rho = exp(-dt / tau_adp) are computed here, by autograd, so
every backend sees bitwise the decay factors of the reference):

    fwd(x_proj [T,B,H], w_rec [H,H], alpha [H], rho [H], u0, eta0, s0 [B,H],
        binary: bool, b0, beta, dt, r_m: float, save: bool)
        -> s [T,B,H], u_T [B,H], eta_T [B,H],
           u_seq [T,B,H] (membrane after each step; shape [0] unless save),
           spk_bits [T,B,ceil(H/32)] int32 (spikes, bit j%32 of word j//32; shape [0]
                                            unless save and binary)
    bwd(grad_s [T,B,H], grad_u_T, grad_eta_T [B,H], w_rec, alpha, rho, u0, eta0, s0,
        u_seq, spikes (spk_bits if binary, else s [T,B,H]), binary: bool,
        surrogate: int (0 gaussian, 1 multi_gaussian), b0, beta, dt, r_m, sigma, gamma,
        need_grad_tau: bool = True)
        -> grad_x [T,B,H] (= dL/dI_t), grad_alpha [H], grad_rho [H] (both [0] unless
           need_grad_tau: frozen time constants, the kernel may skip their sums),
           grad_u0, grad_eta0, grad_s0 [B,H]

x_proj may be float16/bfloat16 with float32 parameters; everything else shares w_rec's
dtype. dW_rec = sum_t dI_t^T s_{t-1} is one GEMM here, after the kernel, or for spiking
neurons the op grad_w_rec(grad_x, spk_bits, s0) -> [H,H] where the backend registers it (it
sums dI rows over the active columns, straight from the bits).
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import torch

from ._checks import SURROGATES, SRNNState, check_backend, check_config, check_scan_args, initial_state
from .reference import srnn_scan_ref


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says how to get it."""


# ---------------------------------------------------------------------------------------
# Spike bit packing (the format fused forwards save for backward)
# ---------------------------------------------------------------------------------------
def pack_spikes(s: torch.Tensor) -> torch.Tensor:
    """[..., H] binary spikes -> [..., ceil(H/32)] int32, neuron j in bit j % 32 of word j // 32."""
    H = s.shape[-1]
    W = (H + 31) // 32
    bits = torch.zeros(*s.shape[:-1], W * 32, dtype=torch.int64, device=s.device)
    bits[..., :H] = (s != 0).to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=s.device) << torch.arange(32, device=s.device)
    words = (bits.view(*s.shape[:-1], W, 32) * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_spikes(bits: torch.Tensor, H: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of pack_spikes: [..., W] int32 -> [..., H] of 0/1 in ``dtype``."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    flat = (bits.unsqueeze(-1) >> shifts) & 1
    return flat.reshape(*bits.shape[:-1], bits.shape[-1] * 32)[..., :H].to(dtype)


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------
_BUILD_HINT = "Build it with: pip install -e . --no-build-isolation"
_CUDA_HINT = ("Rebuild with CUDA (needs nvcc and a CUDA build of torch): "
              "SRNN_FAST_BUILD_CUDA=1 pip install -e . --no-build-isolation")


class Kernels(NamedTuple):
    fwd: Callable
    bwd: Callable


@torch.compiler.assume_constant_result  # registrations are fixed once loaded; no graph break
def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
    except RuntimeError:  # no such op: an extension built from an older version of the sources
        return False


def _extension_kernels(dispatch_key: str, hint: str) -> Kernels:
    from . import _ops  # loads srnn_fast._C if it was built

    if _ops.EXTENSION_ERROR is not None:
        raise BackendUnavailableError(f"the compiled extension srnn_fast._C is not built "
                                      f"({_ops.EXTENSION_ERROR}). {hint}")
    if not _has_kernel("srnn_fast::scan_fwd", dispatch_key):
        raise BackendUnavailableError(f"srnn_fast._C was built without {dispatch_key} kernels. {hint}")
    return Kernels(torch.ops.srnn_fast.scan_fwd, torch.ops.srnn_fast.scan_bwd)


def _load_cpp() -> Kernels:
    return _extension_kernels("CPU", _BUILD_HINT)


def _load_cuda() -> Kernels:
    if not torch.cuda.is_available():
        raise BackendUnavailableError("backend 'cuda' needs a CUDA GPU and a CUDA build of torch; "
                                      "none is available here")
    return _extension_kernels("CUDA", _CUDA_HINT)


def _load_triton() -> Kernels:
    try:
        from . import triton_kernels as module  # an import statement: torch.compile traces it
    except ImportError as e:
        raise BackendUnavailableError(f"backend 'triton' is not available ({e}). Install triton "
                                      "(pip install triton; it comes with CUDA builds of torch)") from e
    return Kernels(module.scan_fwd, module.scan_bwd)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_fits(w_rec: torch.Tensor) -> bool:
    from .triton_kernels.ops import MAX_H  # only asked once the backend loaded

    return w_rec.shape[0] <= MAX_H.get(w_rec.dtype, 0)


class Backend(NamedTuple):
    name: str
    device_types: Callable[[], tuple]  # where it can run, evaluated lazily
    load: Callable[[], Kernels]
    # Whether its kernels take a layer of this w_rec (size, dtype): "auto" passes over a
    # backend that would refuse it, an explicit request gets that backend's clear error.
    fits: Callable[[torch.Tensor], bool] = lambda w_rec: True


def _load_cuda_sim() -> Kernels:
    from . import cuda_sim

    return Kernels(*cuda_sim.load_kernels())


# Fastest first: the order "auto" tries them in.
BACKEND_TABLE = (
    Backend("cuda", lambda: ("cuda",), _load_cuda),
    Backend("triton", lambda: ("cuda", "cpu") if _triton_interpreted() else ("cuda",), _load_triton, _triton_fits),
    Backend("cpp", lambda: ("cpu",), _load_cpp),
)
# Only when asked for by name, never by "auto", and not in available_backends(): the CUDA
# path executed by a CPU harness (srnn_fast/cuda_sim.py), for the tests.
TEST_BACKENDS = (Backend("cuda_sim", lambda: ("cpu",), _load_cuda_sim),)
_AUTO_SKIPS_ON_CPU = ("triton",)  # the interpreter is for testing, never picked by "auto"


def _usable(b: Backend, device_type: str) -> bool:
    if device_type not in b.device_types():
        return False
    try:
        b.load()
    except BackendUnavailableError:
        return False
    return True


def available_backends() -> list:
    """Names of the backends usable on this machine, fastest first."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = [b.name for b in BACKEND_TABLE if any(_usable(b, d) for d in devices)]
    return names + ["reference"]


def cpu_capability() -> str:
    """The instruction set of the CPU kernels that run: "avx512", "avx2" or "default" (the
    portable build). The best this CPU supports unless SRNN_FAST_CPU_CAPABILITY (read once,
    at first use) forces a lower one; a value this CPU cannot run raises RuntimeError naming
    what it can. Raises BackendUnavailableError when the extension is not built."""
    _load_cpp()
    from . import _C

    return _C.cpu_capability()


def resolve_backend(backend: str, device: torch.device, w_rec: Optional[torch.Tensor] = None) -> str:
    """The one place that decides which implementation runs a scan. With ``w_rec`` given,
    "auto" only picks a backend whose kernels take a layer of its size and dtype."""
    backend = check_backend(backend)
    if backend == "reference":
        return backend
    if backend == "auto":
        for b in BACKEND_TABLE:
            if device.type == "cpu" and b.name in _AUTO_SKIPS_ON_CPU:
                continue
            if _usable(b, device.type) and (w_rec is None or b.fits(w_rec)):
                return b.name
        return "reference"
    entry = next(b for b in BACKEND_TABLE + TEST_BACKENDS if b.name == backend)
    if device.type not in entry.device_types():
        extra = " (or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)" if backend == "triton" else ""
        raise ValueError(f"backend {backend!r} runs on {' / '.join(entry.device_types())} tensors{extra}; "
                         f"the inputs are on {device}")
    entry.load()  # raises BackendUnavailableError with the fix
    return backend


def kernels_for(name: str) -> Kernels:
    return next(b for b in BACKEND_TABLE + TEST_BACKENDS if b.name == name).load()


# ---------------------------------------------------------------------------------------
# The one autograd.Function for every fused backend
# ---------------------------------------------------------------------------------------
class SRNNScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_proj, w_rec, alpha, rho, u0, eta0, s0, backend: str, binary: bool, surrogate: int,
                b0: float, beta: float, dt: float, r_m: float, sigma: float, gamma: float):
        kernels = kernels_for(backend)
        s, u_T, eta_T, u_seq, spk_bits = kernels.fwd(x_proj, w_rec, alpha, rho, u0, eta0, s0, binary,
                                                     b0, beta, dt, r_m, True)
        # Saved: membranes and spike bits (binary) or activations (relu); the rest is recomputed.
        ctx.save_for_backward(w_rec, alpha, rho, u0, eta0, s0, u_seq, spk_bits if binary else s)
        ctx.config = (backend, binary, surrogate, b0, beta, dt, r_m, sigma, gamma)
        ctx.x_dtype = x_proj.dtype
        return s, u_T, eta_T

    @staticmethod
    def backward(ctx, grad_s, grad_u_T, grad_eta_T):
        w_rec, alpha, rho, u0, eta0, s0, u_seq, spikes = ctx.saved_tensors
        backend, binary, surrogate, b0, beta, dt, r_m, sigma, gamma = ctx.config
        T, B, H = u_seq.shape
        grad_s = torch.zeros_like(u_seq) if grad_s is None else grad_s.contiguous()
        grad_u_T = torch.zeros_like(u0) if grad_u_T is None else grad_u_T.contiguous()
        grad_eta_T = torch.zeros_like(u0) if grad_eta_T is None else grad_eta_T.contiguous()
        # Frozen tau_m and tau_adp (buffers: alpha, rho need no gradient): the kernel skips
        # the dL/dalpha, dL/drho sums. One of them trainable: both are computed.
        need_tau = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        grad_x, grad_alpha, grad_rho, grad_u0, grad_eta0, grad_s0 = kernels_for(backend).bwd(
            grad_s, grad_u_T, grad_eta_T, w_rec, alpha, rho, u0, eta0, s0, u_seq, spikes, binary,
            surrogate, b0, beta, dt, r_m, sigma, gamma, need_tau)
        # dW_rec[i, j] = sum_{t, b} dI_t[b, i] * s_{t-1}[b, j]: one op over all steps.
        # cuda_sim computes what a GPU would: CUDA has no grad_w_rec kernel.
        device_key = "CUDA" if backend == "cuda_sim" else u_seq.device.type.upper()
        if binary and _has_kernel("srnn_fast::grad_w_rec", device_key):
            # The same sum straight from the bits, over active columns only (no unpacked copy).
            grad_w = torch.ops.srnn_fast.grad_w_rec(grad_x, spikes, s0)
        else:
            s_all = unpack_spikes(spikes, H, w_rec.dtype) if binary else spikes
            s_prev = torch.cat([s0.unsqueeze(0), s_all[:-1]])
            grad_w = grad_x.reshape(T * B, H).t() @ s_prev.reshape(T * B, H)
        if not need_tau:
            grad_alpha = grad_rho = None
        return (grad_x.to(ctx.x_dtype), grad_w, grad_alpha, grad_rho, grad_u0, grad_eta0, grad_s0,
                None, None, None, None, None, None, None, None, None)


def srnn_scan(x_proj, w_rec, tau_m, tau_adp, state=None, *, neuron="adaptive", b0=0.01, beta=None, dt=1.0,
              r_m=1.0, surrogate="gaussian", sigma=0.5, gamma=0.5, backend="auto"):
    """Run one recurrent SRNN layer over a whole sequence; see ``srnn_fast.reference`` for
    the equations and shapes. ``backend`` is "auto" (fastest available for the tensors'
    device), "cuda", "triton", "cpp", "reference" or, for tests, "cuda_sim" (the CUDA code
    run on CPU tensors by a harness, srnn_fast/cuda_sim.py); an explicitly requested backend that
    cannot run raises BackendUnavailableError saying how to get it.

    Returns s [T, B, H] and SRNNState(u_T, eta_T, s_T).
    """
    state = check_scan_args(x_proj, w_rec, tau_m, tau_adp, state)
    cfg = check_config(neuron, b0, beta, dt, r_m, surrogate, sigma, gamma)
    name = resolve_backend(backend, x_proj.device, w_rec)
    if name == "reference":
        return srnn_scan_ref(x_proj, w_rec, tau_m, tau_adp, state, neuron=neuron, b0=b0, beta=beta, dt=dt,
                             r_m=r_m, surrogate=surrogate, sigma=sigma, gamma=gamma)
    T, B, H = x_proj.shape
    u0, eta0, s0 = state if state is not None else initial_state(B, H, cfg.b0, w_rec)
    alpha = torch.exp(-cfg.dt / tau_m)
    rho = torch.exp(-cfg.dt / tau_adp)
    tensors = (x_proj, w_rec, alpha, rho, u0, eta0, s0)
    scalars = (cfg.b0, cfg.beta, cfg.dt, cfg.r_m)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        s, u_T, eta_T = SRNNScanFunction.apply(*tensors, name, cfg.binary, SURROGATES.index(cfg.surrogate),
                                               *scalars, cfg.sigma, cfg.gamma)
    else:  # inference: the kernel saves nothing for backward
        s, u_T, eta_T, _, _ = kernels_for(name).fwd(*tensors, cfg.binary, *scalars, False)
    return s, SRNNState(u_T, eta_T, s[-1])
