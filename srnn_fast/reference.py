r"""Pure-PyTorch reference of the SRNN scan: the specification every fused backend matches.

Per layer with H neurons, per batch row, for t = 1..T (``dt`` and ``r_m`` scalars)::

    alpha   = exp(-dt / tau_m)          rho = exp(-dt / tau_adp)         [H], trainable
    I_t     = x_proj[t] + W_rec @ s_{t-1}                                 [B, H]
    eta_t   = rho * eta_{t-1} + (1 - rho) * s_{t-1}
    theta_t = b0 + beta * eta_t
    u_t     = alpha * u_{t-1} + (1 - alpha) * r_m * I_t - theta_t * s_{t-1} * dt
    s_t     = H(u_t - theta_t)          spiking neurons ("adaptive": beta = 1.8, "lif": beta = 0)
    s_t     = relu(u_t - theta_t)       neuron = "relu" (non-spiking)

H(x) is 1 for x > 0, else 0; its derivative is replaced by a surrogate (``surrogate``,
x-scale ``sigma``, gain ``gamma``). The reset uses the previous spike and the current
threshold. Nothing is detached: gradients reach x_proj, w_rec, tau_m, tau_adp and the
initial state (u_0, eta_0, s_0).
"""
from __future__ import annotations

import math

import torch

from ._checks import SRNNState, check_config, check_scan_args, initial_state

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_pdf(x: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    return torch.exp(-((x - mu) ** 2) / (2.0 * sigma * sigma)) * (_INV_SQRT_2PI / sigma)


def surrogate_grad(x: torch.Tensor, surrogate: str, sigma: float, gamma: float) -> torch.Tensor:
    """The surrogate for dH/dx at x = u - theta."""
    if surrogate == "gaussian":
        return gamma * normal_pdf(x, 0.0, sigma)
    # "multi_gaussian": a narrow positive bump with two wide negative side lobes.
    return gamma * (1.15 * normal_pdf(x, 0.0, sigma) - 0.15 * normal_pdf(x, sigma, 6.0 * sigma)
                    - 0.15 * normal_pdf(x, -sigma, 6.0 * sigma))


class SpikeFunction(torch.autograd.Function):
    """s = H(x) forward, surrogate derivative backward."""

    @staticmethod
    def forward(ctx, x, surrogate: str, sigma: float, gamma: float):
        ctx.save_for_backward(x)
        ctx.params = (surrogate, sigma, gamma)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x, *ctx.params), None, None, None


def srnn_scan_ref(x_proj, w_rec, tau_m, tau_adp, state=None, *, neuron="adaptive", b0=0.01, beta=None,
                  dt=1.0, r_m=1.0, surrogate="gaussian", sigma=0.5, gamma=0.5):
    """Run one recurrent SRNN layer over a whole sequence with an explicit time loop.

    Args:
        x_proj: [T, B, H] input current W_in x_t + b for every step.
        w_rec: [H, H] recurrent weights; I_t uses ``w_rec @ s`` (i.e. ``s @ w_rec.T``).
        tau_m, tau_adp: [H] membrane and adaptation time constants (> 0).
        state: SRNNState(u, eta, s), each [B, H]; None means u = 0, eta = b0, s = 0.
        neuron: "adaptive", "lif" or "relu". beta=None means 1.8 for "adaptive", else 0.
        surrogate: "gaussian" or "multi_gaussian", with x-scale sigma and gain gamma.

    Returns:
        s: [T, B, H] spikes (or relu activations), dtype of w_rec.
        SRNNState(u_T, eta_T, s_T), each [B, H].
    """
    state = check_scan_args(x_proj, w_rec, tau_m, tau_adp, state)
    cfg = check_config(neuron, b0, beta, dt, r_m, surrogate, sigma, gamma)
    T, B, H = x_proj.shape
    u, eta, s = state if state is not None else initial_state(B, H, cfg.b0, w_rec)
    alpha = torch.exp(-cfg.dt / tau_m)
    rho = torch.exp(-cfg.dt / tau_adp)
    w_t = w_rec.t()
    out = []
    # unbind, not x_proj[t]: indexing makes autograd's backward quadratic in T.
    for x_t in x_proj.unbind(0):
        u, eta, s = reference_step(x_t, u, eta, s, w_t, alpha, rho, cfg)
        out.append(s)
    return torch.stack(out), SRNNState(u, eta, s)


def reference_step(x_t, u, eta, s, w_t, alpha, rho, cfg):
    """One step of the reference loop (w_t = w_rec.T, cfg a ScanConfig): (u, eta, s) at t."""
    eta = rho * eta + (1 - rho) * s
    theta = cfg.b0 + cfg.beta * eta
    current = x_t.to(s.dtype) + s @ w_t
    u = alpha * u + (1 - alpha) * cfg.r_m * current - theta * s * cfg.dt
    if cfg.binary:
        s = SpikeFunction.apply(u - theta, cfg.surrogate, cfg.sigma, cfg.gamma)
    else:
        s = torch.relu(u - theta)
    return u, eta, s
