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
from triton.runtime.errors import OutOfResources

from .kernels import scan_bwd_kernel, scan_fwd_kernel

# Each program holds W_rec (forward: W_rec^T) on chip for all T steps as one
# [BLOCK_H, BLOCK_H] dot operand, BLOCK_H the next power of two >= H, staged in shared
# memory. The largest BLOCK_H per state dtype whose kernels fit an sm_80 and an sm_90 block
# without register spills, as compiled by compile_check (table in bench/journal.md): at 256,
# W alone is 256 KB in float32, over any GPU's per-block shared memory (sm_90: 227 KB); in
# float64 at 128 both kernels spill registers whatever the warps.
MAX_H = {torch.float32: 128, torch.float64: 64}
BLOCK_B = 16  # batch rows per program; tl.dot needs tiles of at least 16 on GPUs
# Test hook: fill every output and scratch buffer with NaN (int32: -1) before the kernels
# run, so an element a kernel fails to write shows up.
POISON_OUTPUTS = False

Tensor = torch.Tensor


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_LARGER_LAYERS = "Use backend='cuda' (or 'cpp' on the CPU) for larger layers."


def _block_h(H: int, dtype: torch.dtype) -> int:
    if dtype not in MAX_H:
        raise ValueError(f"the triton backend needs float32 or float64 w_rec; got {dtype}")
    if H > MAX_H[dtype]:
        raise ValueError(f"the triton backend supports H <= {MAX_H[dtype]} for {dtype} w_rec (each program holds "
                         f"W_rec in shared memory and registers); got H = {H}. {_LARGER_LAYERS}")
    # >= 32: the spike bit packing groups 32 neurons per word (and tl.dot needs >= 16).
    return max(32, triton.next_power_of_2(H))


def block_sizes(dtype: torch.dtype) -> list:
    """Every BLOCK_H the launchers can use for this state dtype."""
    return sorted({_block_h(H, dtype) for H in range(1, MAX_H[dtype] + 1)})


def _launch(kernel, grid, H: int, dtype: torch.dtype, *args, **kwargs) -> None:
    """kernel[grid](...), with a GPU that cannot hold the compiled kernel (less shared memory
    per block than sm_80, e.g. sm_86/sm_89 with 99 KB) reported like the H limit: triton
    raises OutOfResources before anything runs."""
    try:
        kernel[grid](*args, **kwargs)
    except OutOfResources as e:
        raise ValueError(f"the triton backend cannot run H = {H} with {dtype} w_rec on this GPU: its kernel needs "
                         f"{e.required} ({e.name}), the GPU allows {e.limit} per block. {_LARGER_LAYERS}") from e


def _device_guard(t: Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if not _interpreted():
        raise ValueError(f"the triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
                         f"before triton is imported; got tensors on {t.device}")
    return contextlib.nullcontext()


COMPILE_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")  # the rest of _launch_options are constexprs
# Warps by kernel, state dtype and BLOCK_H: every variant spill-free on sm_80 and sm_90
# with triton 3.8 and 3.9 (compile_check). More warps share each step's dot product, fewer
# leave each thread more registers: the backward spills at 16 warps in float64 (BLOCK_H 64,
# the multi-Gaussian surrogate) and with triton 3.9 in float32 (BLOCK_H 128).
NUM_WARPS = {
    ("scan_fwd_kernel", torch.float32): {32: 4, 64: 8, 128: 16},
    ("scan_fwd_kernel", torch.float64): {32: 8, 64: 16},
    ("scan_bwd_kernel", torch.float32): {32: 4, 64: 8, 128: 8},
    ("scan_bwd_kernel", torch.float64): {32: 4, 64: 8},
}


def _launch_options(kernel: str, dtype: torch.dtype, block_h: int) -> dict:
    # num_stages=1, no software pipelining: each step's dot waits on the previous step's, and
    # the prefetch buffers of the per-step loads cost shared memory (float64 backward at
    # BLOCK_H 128: 96 KB more, over the sm_90 limit) and registers (spills in the backward).
    # No FMA contraction and IEEE fp32 dot products: the kernels round like the reference.
    return dict(num_warps=NUM_WARPS[kernel, dtype][block_h], num_stages=1, enable_fp_fusion=False,
                DOT_PRECISION="ieee", BLOCK_B=BLOCK_B, BLOCK_H=block_h)


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
    dtype, dev = w_rec.dtype, x_proj.device
    block_h = _block_h(H, dtype)
    nw = (H + 31) // 32
    s = _new((T, B, H), dtype, dev)
    u_T, eta_T = _new((B, H), dtype, dev), _new((B, H), dtype, dev)
    u_seq = _new((T, B, H) if save else (0,), dtype, dev)
    spk_bits = _new((T, B, nw) if save and binary else (0,), torch.int32, dev)
    with _device_guard(x_proj):
        _launch(scan_fwd_kernel, (triton.cdiv(B, BLOCK_B),), H, dtype,
                x_proj, *x_proj.stride(), w_rec.contiguous(), alpha.contiguous(), rho.contiguous(),
                u0.contiguous(), eta0.contiguous(), s0.contiguous(), _params(dtype, dev, b0, beta, dt, r_m),
                s, u_T, eta_T, u_seq, spk_bits, T, B, H, nw,
                BINARY=binary, SAVE=save, **_launch_options("scan_fwd_kernel", dtype, block_h))
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
             b0: float, beta: float, dt: float, r_m: float, sigma: float, gamma: float,
             need_grad_tau: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, B, H = u_seq.shape
    dtype, dev = w_rec.dtype, u_seq.device
    block_h = _block_h(H, dtype)
    programs = triton.cdiv(B, BLOCK_B)
    eta_scratch = _new((T, B, H), dtype, dev)
    grad_x = _new((T, B, H), dtype, dev)
    part_alpha, part_rho = _new((programs, H), dtype, dev), _new((programs, H), dtype, dev)
    grad_u0, grad_eta0, grad_s0 = (_new((B, H), dtype, dev) for _ in range(3))
    with _device_guard(u_seq):
        _launch(scan_bwd_kernel, (programs,), H, dtype,
                grad_s.contiguous(), grad_u_T.contiguous(), grad_eta_T.contiguous(), w_rec.contiguous(),
                alpha.contiguous(), rho.contiguous(), u0.contiguous(), eta0.contiguous(), s0.contiguous(),
                u_seq.contiguous(), spikes.contiguous(), _params(dtype, dev, b0, beta, dt, r_m, sigma, gamma),
                eta_scratch, grad_x, part_alpha, part_rho, grad_u0, grad_eta0, grad_s0, T, B, H, (H + 31) // 32,
                BINARY=binary, SURROGATE=surrogate, **_launch_options("scan_bwd_kernel", dtype, block_h))
    if not need_grad_tau:  # frozen time constants: the kernel's partial sums are dropped ([0], the contract)
        return grad_x, alpha.new_empty(0), alpha.new_empty(0), grad_u0, grad_eta0, grad_s0
    # Partial sums per program, reduced here: deterministic for any number of programs.
    grad_alpha = part_alpha.sum(0) / (1 - alpha)
    return grad_x, grad_alpha, part_rho.sum(0), grad_u0, grad_eta0, grad_s0


@scan_bwd.register_fake
def _(grad_s, grad_u_T, grad_eta_T, w_rec, alpha, rho, u0, eta0, s0, u_seq, spikes, binary, surrogate,
      b0, beta, dt, r_m, sigma, gamma, need_grad_tau=True):
    T, B, H = u_seq.shape
    new = w_rec.new_empty
    tau = H if need_grad_tau else 0
    return new(T, B, H), new(tau), new(tau), new(B, H), new(B, H), new(B, H)
