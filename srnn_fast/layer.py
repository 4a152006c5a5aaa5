"""The fused layer: input projection and recurrence of one SRNN layer in one op per direction.

``srnn_layer(x, w_in, bias, w_rec, ...)`` computes ``srnn_scan(x @ w_in.T + bias, w_rec, ...)``.
Where the backend has fused layer kernels (today "cpp": ``srnn_fast::layer_fwd`` /
``layer_bwd`` on CPU tensors), the projection runs inside the kernel, over the nonzero inputs
only (spikes) or over all of them in register tiles while the rows are in cache (dense
inputs), and forward saves for backward just the spike bits plus the state (u, eta) every
``CKPT_EVERY`` steps; backward recomputes each segment from its checkpoint (bit for bit) and
sums dW_in, db and dW_rec and forms dL/dx inside the kernel. Elsewhere it is the projection GEMM plus the
backend's scan. The backend is chosen by ``scan.resolve_backend`` like any scan.

Kernel contract (alpha = exp(-dt / tau_m), rho = exp(-dt / tau_adp), computed here):

    layer_fwd(x [T,B,I], w_in [H,I], bias [H] or None, w_rec [H,H], alpha, rho [H],
              u0, eta0, s0 [B,H], binary, b0, beta, dt, r_m, ckpt_every: int)
        -> s [T,B,H], u_T, eta_T [B,H],
           u_ckpt, eta_ckpt [ceil(T/K),B,H] (state after c*K steps; [0] if ckpt_every = 0),
           spk_bits [T,B,ceil(H/32)] int32 ([0] unless binary and ckpt_every > 0)
    layer_bwd(grad_s, grad_u_T, grad_eta_T, x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0,
              u_ckpt, eta_ckpt, spikes (bits, or s for relu), binary, surrogate, b0, beta,
              dt, r_m, sigma, gamma, ckpt_every, need_grad_x, need_grad_tau = True)
        -> grad_x [T,B,I] ([0] unless need_grad_x), grad_w_in [H,I], grad_bias [H] ([0]
           without bias), grad_w_rec [H,H], grad_alpha, grad_rho [H] ([0] unless
           need_grad_tau; their per-step sums are skipped), grad_u0, grad_eta0, grad_s0 [B,H]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import SURROGATES, SRNNState, check_config, check_layer_args, describe, initial_state
from .scan import _has_kernel, resolve_backend, srnn_scan

# Steps per checkpoint segment. What forward saves per neuron and step: 2 * 4 B / 32 for the
# u and eta checkpoints plus 1/8 B of spike bits (float32), about 0.4 B against the ~24 B the
# reference's autograd graph keeps. Backward holds one segment per row block in cache.
CKPT_EVERY = 32


def has_fused_layer(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` (already resolved) has fused layer kernels for ``device``."""
    if backend != "cpp" or device.type != "cpu":
        return False
    from . import _ops  # noqa: F401  (loads the extension, which registers the ops)

    return _has_kernel("srnn_fast::layer_fwd", "CPU")


class SRNNLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, binary: bool, surrogate: int, b0: float,
                beta: float, dt: float, r_m: float, sigma: float, gamma: float):
        s, u_T, eta_T, u_ckpt, eta_ckpt, bits = torch.ops.srnn_fast.layer_fwd(
            x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, binary, b0, beta, dt, r_m, CKPT_EVERY)
        # Saved: the checkpoints and the spike bits (relu: the activations, which are the
        # output); x and the parameters are the caller's tensors, kept alive anyway.
        ctx.save_for_backward(x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, u_ckpt, eta_ckpt,
                              bits if binary else s)
        ctx.config = (binary, surrogate, b0, beta, dt, r_m, sigma, gamma)
        return s, u_T, eta_T

    @staticmethod
    def backward(ctx, grad_s, grad_u_T, grad_eta_T):
        x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, u_ckpt, eta_ckpt, spikes = ctx.saved_tensors
        binary, surrogate, b0, beta, dt, r_m, sigma, gamma = ctx.config
        T, B, H = x.shape[0], x.shape[1], w_rec.shape[0]
        grad_s = x.new_zeros(T, B, H) if grad_s is None else grad_s.contiguous()
        grad_u_T = torch.zeros_like(u0) if grad_u_T is None else grad_u_T.contiguous()
        grad_eta_T = torch.zeros_like(u0) if grad_eta_T is None else grad_eta_T.contiguous()
        need_x = ctx.needs_input_grad[0]
        need_tau = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]  # alpha, rho: frozen taus need none
        gx, gw_in, gb, gw_rec, ga, gr, gu0, geta0, gs0 = torch.ops.srnn_fast.layer_bwd(
            grad_s, grad_u_T, grad_eta_T, x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, u_ckpt, eta_ckpt,
            spikes, binary, surrogate, b0, beta, dt, r_m, sigma, gamma, CKPT_EVERY, need_x, need_tau)
        if not need_tau:
            ga = gr = None
        return (gx if need_x else None, gw_in, gb if bias is not None else None, gw_rec, ga, gr, gu0, geta0, gs0,
                None, None, None, None, None, None, None, None)


def srnn_layer(x, w_in, bias, w_rec, tau_m, tau_adp, state=None, *, neuron="adaptive", b0=0.01, beta=None,
               dt=1.0, r_m=1.0, surrogate="gaussian", sigma=0.5, gamma=0.5, backend="auto"):
    """``srnn_scan(F.linear(x, w_in, bias), w_rec, tau_m, tau_adp, state, ...)`` with the
    projection fused into the kernel where the backend has it. x [T, B, I], w_in [H, I],
    bias [H] or None; the rest as ``srnn_scan``. Returns s [T, B, H] and the final state."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be [T, B, I]; got {describe(x) if isinstance(x, torch.Tensor) else type(x).__name__}")
    name = resolve_backend(backend, x.device, w_rec)
    fused = (has_fused_layer(name, x.device) and x.dtype == w_rec.dtype == w_in.dtype
             and (bias is None or bias.dtype == w_rec.dtype))
    if not fused:  # the projection GEMM, then the backend's scan (which checks everything)
        return srnn_scan(F.linear(x, w_in, bias), w_rec, tau_m, tau_adp, state, neuron=neuron, b0=b0, beta=beta,
                         dt=dt, r_m=r_m, surrogate=surrogate, sigma=sigma, gamma=gamma, backend=name)
    state = check_layer_args(x, w_in, bias, w_rec, tau_m, tau_adp, state)
    cfg = check_config(neuron, b0, beta, dt, r_m, surrogate, sigma, gamma)
    u0, eta0, s0 = state if state is not None else initial_state(x.shape[1], w_rec.shape[0], cfg.b0, w_rec)
    alpha = torch.exp(-cfg.dt / tau_m)
    rho = torch.exp(-cfg.dt / tau_adp)
    tensors = (x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0)
    scalars = (cfg.b0, cfg.beta, cfg.dt, cfg.r_m)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        s, u_T, eta_T = SRNNLayerFunction.apply(*tensors, cfg.binary, SURROGATES.index(cfg.surrogate), *scalars,
                                                cfg.sigma, cfg.gamma)
    else:  # inference: the kernel saves nothing
        s, u_T, eta_T, _, _, _ = torch.ops.srnn_fast.layer_fwd(*tensors, cfg.binary, *scalars, 0)
    return s, SRNNState(u_T, eta_T, s[-1])
