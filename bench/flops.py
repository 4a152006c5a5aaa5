"""The work of a benchmarked layer stack, counted, and the machine's GEMM rate to hold it against.

Floating-point operations of the forward and of forward+backward, per layer of N = T * B rows,
input width I, H neurons, spikes s (output) from the run itself. An FMA counts 2, an add 1;
products with a binary operand (0/1 spikes) are adds, and only nonzero operands count: that
is the work a kernel that skips zeros must do, and what the reference's dense ops do beyond it
is not counted. Recomputation (the fused backward replays the forward from checkpoints) is
not counted either: the figures are the arithmetic of the math, the same for every contender.

    dense (by formula from the shapes):
        fwd   W_in x_t + b over a dense input (no zeros)      2 N I H + N H
        bwd   W_rec^T dI_t, the recurrent dL/ds_{t-1}           2 N H H
              dW_in = dI^T x and db over a dense input          2 N I H + N H
              dL/dx = dI W_in (layers after the first)          2 N H I
    spike-driven (nonzeros counted in the run):
        fwd   W_in x_t + b over a sparse input                 nnz(x) H c(x) + N H
              W_rec s_{t-1}                                     nnz(s_{t-1}) H c(s)
        bwd   dW_in, db over a sparse input                     nnz(x) H c(x) + N H
              dW_rec = sum_t dI_t^T s_{t-1}                     nnz(s_{t-1}) H c(s)
    neuron (per neuron and step, by formula):                   NEURON_FWD N H, NEURON_BWD N H

c(v) is 1 for a binary v, else 2. An input counts as dense when at least half of it is nonzero. nn.LSTM / GRU /
RNN count their products only: 2 N G H (I + H) forward (G gates), three times that forward +
backward (dL/dx, dL/dh and the weight gradients).
"""
from __future__ import annotations

import time

import torch

from measure import sync

# Operations per neuron and step of srnn_fast/reference.py (csrc/srnn_neuron.h), counted from
# the expressions: forward I = x_proj + rec (1), eta (3), theta (2), u (6), v = u - theta and
# the threshold compare (2); backward the surrogate at v (theta, v: 3; Gaussian pdf with its
# exp counted as one: 5; gain 1), then backward_step_sg (23), the incoming dL/ds sum (1) and
# the two tau-gradient sums (2).
NEURON_FWD = 14
NEURON_BWD = 35
RNN_GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def _nnz_and_cost(v: torch.Tensor):
    """Nonzeros of v and the operations per nonzero and neuron: 1 (add) for 0/1 values, else 2."""
    nnz = int(torch.count_nonzero(v))
    binary = bool(((v == 0) | (v == 1)).all())
    return nnz, 1 if binary else 2


def is_dense(nnz: int, numel: int) -> bool:
    """Whether an input of numel values with nnz nonzeros counts as dense (a full projection)."""
    return 2 * nnz >= numel


def srnn_stack_flops(layers, x: torch.Tensor) -> dict:
    """Counts for SRNN layers (srnn_fast.SRNNLayer, time-major, zero initial spikes) on input
    x [T, B, I]; runs the forward once, under no_grad, for the spikes. Returns
    {"fwd": {dense, spike, neuron, total}, "fwd_bwd": {...}} in floating-point operations."""
    fwd = dict(dense=0, spike=0, neuron=0)
    bwd = dict(dense=0, spike=0, neuron=0)
    h = x
    with torch.no_grad():
        for index, layer in enumerate(layers):
            T, B, I = h.shape
            N, H = T * B, layer.hidden_size
            s, _ = layer(h)
            nnz_x, c_x = _nnz_and_cost(h)
            kind = "dense" if is_dense(nnz_x, h.numel()) else "spike"
            proj = (2 * N * I if kind == "dense" else nnz_x * c_x) * H + N * H  # the products (or adds), the bias
            fwd[kind] += proj
            bwd[kind] += proj  # dW_in and db: the same terms
            nnz_s, c_s = _nnz_and_cost(s[:-1])  # s_{t-1} for t >= 1 (s_0 = 0 here)
            fwd["spike"] += nnz_s * H * c_s
            bwd["spike"] += nnz_s * H * c_s  # dW_rec
            bwd["dense"] += 2 * N * H * H  # W_rec^T dI
            if index > 0:
                bwd["dense"] += 2 * N * H * I  # dL/dx into the layer below
            fwd["neuron"] += NEURON_FWD * N * H
            bwd["neuron"] += NEURON_BWD * N * H
            h = s
    both = {k: fwd[k] + bwd[k] for k in fwd}
    return {"fwd": dict(fwd, total=sum(fwd.values())), "fwd_bwd": dict(both, total=sum(both.values()))}


def rnn_stack_flops(kind: str, sizes, T: int, B: int) -> dict:
    """The matrix products of nn.LSTM / GRU / RNN layers of ``sizes`` (elementwise gates not counted)."""
    g, N = RNN_GATES[kind], T * B
    fwd = sum(2 * N * g * h * (i + h) for i, h in zip(sizes[:-1], sizes[1:]))
    return {"fwd": dict(dense=fwd, total=fwd), "fwd_bwd": dict(dense=3 * fwd, total=3 * fwd)}


def gemm_rate(device: torch.device, sizes=(1024, 2048), repeats: int = 5) -> float:
    """The machine's float32 GEMM rate on ``device`` (the current torch threads on the CPU), in
    FLOP/s: the best over ``sizes`` of n x n torch.mm, each the median of ``repeats`` calls
    after a warm-up."""
    best = 0.0
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
        out = torch.empty(n, n, device=device)
        torch.mm(a, b, out=out)
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            sync(device)
            times.append(time.perf_counter() - t0)
        best = max(best, 2.0 * n ** 3 / sorted(times)[len(times) // 2])
    return best
