"""Loads the compiled extension (srnn_fast._C), which registers the ``srnn_fast::`` ops
with TORCH_LIBRARY, and gives those ops their fake (meta) implementations for
torch.compile. Importing this never fails: a missing extension is recorded in
EXTENSION_ERROR and reported by the backends that need it."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.srnn_fast.*)
except ImportError as e:  # not built, or built against another torch
    EXTENSION_ERROR = f"{type(e).__name__}: {e}"
else:
    EXTENSION_ERROR = None


@contextlib.contextmanager
def cpu_build(name: Optional[str]):
    """Runs the CPU kernels' ``name`` build (avx512, avx2, default) inside the block and the
    one in use before after it; None leaves the build as it is."""
    if name is None:
        yield name
        return
    from . import _C

    previous = _C.cpu_capability()
    _C.set_cpu_capability(name)
    try:
        yield name
    finally:
        _C.set_cpu_capability(previous)


def _words(H: int) -> int:
    return (H + 31) // 32


def _scan_fwd_fake(x_proj, w_rec, alpha, rho, u0, eta0, s0, binary, b0, beta, dt, r_m, save):
    """Shapes and dtypes of scan_fwd's outputs (the contract in srnn_fast/scan.py)."""
    T, B, H = x_proj.shape
    state = dict(dtype=w_rec.dtype, device=x_proj.device)
    u_seq = x_proj.new_empty((T, B, H) if save else (0,), **state)
    bits = x_proj.new_empty((T, B, _words(H)) if save and binary else (0,), dtype=torch.int32,
                            device=x_proj.device)
    return (x_proj.new_empty((T, B, H), **state), x_proj.new_empty((B, H), **state),
            x_proj.new_empty((B, H), **state), u_seq, bits)


def _scan_bwd_fake(grad_s, grad_u_T, grad_eta_T, w_rec, alpha, rho, u0, eta0, s0, u_seq, spikes, binary,
                   surrogate, b0, beta, dt, r_m, sigma, gamma, need_grad_tau=True):
    T, B, H = grad_s.shape
    tau = (H,) if need_grad_tau else (0,)
    return (grad_s.new_empty((T, B, H), dtype=w_rec.dtype), alpha.new_empty(tau), alpha.new_empty(tau),
            u0.new_empty((B, H)), u0.new_empty((B, H)), u0.new_empty((B, H)))


def _grad_w_rec_fake(grad_x, spk_bits, s0):
    H = s0.shape[1]
    return s0.new_empty((H, H))


def _layer_fwd_fake(x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, binary, b0, beta, dt, r_m, ckpt_every):
    """Shapes and dtypes of layer_fwd's outputs (the contract in srnn_fast/layer.py)."""
    T, B, _ = x.shape
    H = w_rec.shape[0]
    C = -(-T // ckpt_every) if ckpt_every > 0 else 0
    ckpt = (C, B, H) if ckpt_every > 0 else (0,)
    bits = (T, B, _words(H)) if ckpt_every > 0 and binary else (0,)
    return (w_rec.new_empty((T, B, H)), w_rec.new_empty((B, H)), w_rec.new_empty((B, H)), w_rec.new_empty(ckpt),
            w_rec.new_empty(ckpt), w_rec.new_empty(bits, dtype=torch.int32))


def _layer_bwd_fake(grad_s, grad_u_T, grad_eta_T, x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, u_ckpt, eta_ckpt,
                    spikes, binary, surrogate, b0, beta, dt, r_m, sigma, gamma, ckpt_every, need_grad_x,
                    need_grad_tau=True):
    H, B = w_rec.shape[0], u0.shape[0]
    tau = (H,) if need_grad_tau else (0,)
    return (x.new_empty(x.shape if need_grad_x else (0,)), w_in.new_empty(w_in.shape),
            w_rec.new_empty((H,) if bias is not None else (0,)), w_rec.new_empty((H, H)), alpha.new_empty(tau),
            alpha.new_empty(tau), u0.new_empty((B, H)), u0.new_empty((B, H)), u0.new_empty((B, H)))


if EXTENSION_ERROR is None:
    torch.library.register_fake("srnn_fast::scan_fwd")(_scan_fwd_fake)
    torch.library.register_fake("srnn_fast::scan_bwd")(_scan_bwd_fake)
    torch.library.register_fake("srnn_fast::grad_w_rec")(_grad_w_rec_fake)
    torch.library.register_fake("srnn_fast::layer_fwd")(_layer_fwd_fake)
    torch.library.register_fake("srnn_fast::layer_bwd")(_layer_bwd_fake)
