"""Launchers of the Triton scan kernels, registered as torch custom ops
(``srnn_fast::triton_scan_fwd`` / ``srnn_fast::triton_scan_bwd``) with fake
implementations, so the "triton" backend traces under torch.compile without graph breaks.
The signatures are the fused-kernel contract of srnn_fast/scan.py.
"""
import contextlib
import functools
import math
import os
from typing import Tuple

import torch
import triton

from .kernels import scan_bwd_kernel, scan_fwd_kernel

# Each program holds W_rec (W_rec^T in forward) on chip for all T steps: a [BLOCK_H, BLOCK_H]
# tile, BLOCK_H the next power of two >= H, staged in shared memory and read into registers
# as dot operands every step. Past 256 those operands no longer fit the register file
# (ptxas for sm_90 already spills 150-250 bytes per thread in float32 at 256).
MAX_H = 256
BLOCK_B = 16  # batch rows per program; tl.dot needs tiles of at least 16 on GPUs
# Test hook: fill every output and scratch buffer with NaN (int32: -1) before the kernels
# run, so an element a kernel fails to write shows up.
POISON_OUTPUTS = False

Tensor = torch.Tensor


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_h(H: int) -> int:
    if H > MAX_H:
        raise ValueError(f"the triton backend supports H <= {MAX_H} (W_rec is kept in registers); got H = {H}. "
                         "Use backend='cuda' or 'cpp' for larger layers.")
    # >= 32: the spike bit packing groups 32 neurons per word (and tl.dot needs >= 16).
    return max(32, triton.next_power_of_2(H))


def _device_guard(t: Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if not _interpreted():
        raise ValueError(f"the triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
                         f"before triton is imported; got tensors on {t.device}")
    return contextlib.nullcontext()


COMPILE_OPTIONS = ("num_warps", "enable_fp_fusion")  # the rest of _launch_options are constexprs


def _launch_options(dtype: torch.dtype, block_h: int) -> dict:
    # Warps so that W's dot-operand fragments fit the registers: per ptxas for sm_90, no
    # spills up to H = 128 in float32 (a few hundred bytes at 256, and in float64 backward).
    per_warp = 4 if dtype == torch.float64 else 8  # columns of W per warp
    num_warps = min(16, max(4, block_h // per_warp))
    # No FMA contraction and IEEE fp32 dot products: the kernels round like the reference.
    return dict(num_warps=num_warps, enable_fp_fusion=False, DOT_PRECISION="ieee", BLOCK_B=BLOCK_B,
                BLOCK_H=block_h)


@functools.lru_cache(maxsize=64)
def _params(dtype, device, b0, beta, dt, r_m, sigma=0.5, gamma=0.5) -> Tensor:
    """The scalars and the surrogate's inexact constants in the state dtype, in the order of
    kernels.P_* (Python floats would reach the kernel as float32). Cached: one host-to-device
    copy per configuration, none per call (so none while a CUDA graph is captured)."""
    values = [b0, beta, dt, r_m, sigma, gamma, 1.15, 0.15, 1.0 / math.sqrt(2.0 * math.pi)]
    return torch.tensor(values, dtype=dtype, device=device)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, -1 if dtype == torch.int32 else float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("srnn_fast::triton_scan_fwd", mutates_args=())
def scan_fwd(x_proj: Tensor, w_rec: Tensor, alpha: Tensor, rho: Tensor, u0: Tensor, eta0: Tensor, s0: Tensor,
             binary: bool, b0: float, beta: float, dt: float, r_m: float,
             save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, H = x_proj.shape
    block_h = _block_h(H)
    dtype, dev = w_rec.dtype, x_proj.device
    nw = (H + 31) // 32
    s = _new((T, B, H), dtype, dev)
    u_T, eta_T = _new((B, H), dtype, dev), _new((B, H), dtype, dev)
    u_seq = _new((T, B, H) if save else (0,), dtype, dev)
    spk_bits = _new((T, B, nw) if save and binary else (0,), torch.int32, dev)
    with _device_guard(x_proj):
        scan_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            x_proj, *x_proj.stride(), w_rec.contiguous(), alpha.contiguous(), rho.contiguous(),
            u0.contiguous(), eta0.contiguous(), s0.contiguous(), _params(dtype, dev, b0, beta, dt, r_m),
            s, u_T, eta_T, u_seq, spk_bits, T, B, H, nw,
            BINARY=binary, SAVE=save, **_launch_options(dtype, block_h))
    return s, u_T, eta_T, u_seq, spk_bits


@scan_fwd.register_fake
def _(x_proj, w_rec, alpha, rho, u0, eta0, s0, binary, b0, beta, dt, r_m, save):
    T, B, H = x_proj.shape
    new = lambda *shape, dtype=w_rec.dtype: w_rec.new_empty(shape, dtype=dtype)  # noqa: E731
    return (new(T, B, H), new(B, H), new(B, H), new(T, B, H) if save else new(0),
            new(T, B, (H + 31) // 32, dtype=torch.int32) if save and binary else new(0, dtype=torch.int32))


@torch.library.custom_op("srnn_fast::triton_scan_bwd", mutates_args=())
def scan_bwd(grad_s: Tensor, grad_u_T: Tensor, grad_eta_T: Tensor, w_rec: Tensor, alpha: Tensor, rho: Tensor,
             u0: Tensor, eta0: Tensor, s0: Tensor, u_seq: Tensor, spikes: Tensor, binary: bool, surrogate: int,
             b0: float, beta: float, dt: float, r_m: float, sigma: float,
             gamma: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, H = u_seq.shape
    block_h = _block_h(H)
    dtype, dev = w_rec.dtype, u_seq.device
    programs = triton.cdiv(B, BLOCK_B)
    eta_scratch = _new((T, B, H), dtype, dev)
    grad_x = _new((T, B, H), dtype, dev)
    part_alpha, part_rho = _new((programs, H), dtype, dev), _new((programs, H), dtype, dev)
    grad_u0, grad_eta0, grad_s0 = (_new((B, H), dtype, dev) for _ in range(3))
    with _device_guard(u_seq):
        scan_bwd_kernel[(programs,)](
            grad_s.contiguous(), grad_u_T.contiguous(), grad_eta_T.contiguous(), w_rec.contiguous(),
            alpha.contiguous(), rho.contiguous(), u0.contiguous(), eta0.contiguous(), s0.contiguous(),
            u_seq.contiguous(), spikes.contiguous(), _params(dtype, dev, b0, beta, dt, r_m, sigma, gamma),
            eta_scratch, grad_x, part_alpha, part_rho, grad_u0, grad_eta0, grad_s0, T, B, H, (H + 31) // 32,
            BINARY=binary, SURROGATE=surrogate, **_launch_options(dtype, block_h))
    # Partial sums per program, reduced here: deterministic for any number of programs.
    grad_alpha = part_alpha.sum(0) / (1 - alpha)
    return grad_x, grad_alpha, part_rho.sum(0), grad_u0, grad_eta0, grad_s0


@scan_bwd.register_fake
def _(grad_s, grad_u_T, grad_eta_T, w_rec, alpha, rho, u0, eta0, s0, u_seq, spikes, binary, surrogate,
      b0, beta, dt, r_m, sigma, gamma):
    T, B, H = u_seq.shape
    new = w_rec.new_empty
    return new(T, B, H), new(H), new(H), new(B, H), new(B, H), new(B, H)
