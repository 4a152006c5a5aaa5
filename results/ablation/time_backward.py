"""Backward time of the fused CPU kernels with and without the time-constant gradients.

    OMP_NUM_THREADS=1 python results/ablation/time_backward.py [--repeats 21]

need_grad_tau=False is what the autograd Functions ask for when tau_m and tau_adp are
frozen (train_tau="none"): the kernels skip the per-step dL/dalpha, dL/drho terms and their
sums. Both settings run in the same process, interleaved call by call, so the ratio is
measured under the same machine load (this machine is shared: absolute times are noisy,
ratios less so). Shapes: the ECG layer (T 1301, B 64, 4 -> 36) and an SHD-like one
(T 250, B 64, 700 -> 128), adaptive neurons, float32, sparse spike-like inputs.
"""
import argparse
import statistics
import time

import torch

import srnn_fast  # noqa: F401  (registers the ops)
from srnn_fast import _ops  # noqa: F401
from srnn_fast.layer import CKPT_EVERY

SHAPES = {"ECG 1301x64, 4->36": (1301, 64, 4, 36, 0.05), "SHD-like 250x64, 700->128": (250, 64, 700, 128, 0.02)}
SCALARS = dict(b0=0.01, beta=1.8, dt=1.0, r_m=1.0)


def case(T, B, I, H, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, B, I, generator=g) < density).float()
    w_in = torch.randn(H, I, generator=g) * (2.0 / I ** 0.5)
    bias = torch.full((H,), 0.05)
    w_rec = torch.randn(H, H, generator=g) * (0.6 / H ** 0.5)
    alpha = torch.exp(-1.0 / (5 + 25 * torch.rand(H, generator=g)))
    rho = torch.exp(-1.0 / (40 + 160 * torch.rand(H, generator=g)))
    u0, eta0, s0 = torch.rand(B, H, generator=g), torch.full((B, H), 0.01), torch.zeros(B, H)
    return x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0


def timers(T, B, I, H, density):
    """{(op, need_grad_tau): a function running that backward once}, from one forward each."""
    x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0 = case(T, B, I, H, density)
    sc = SCALARS
    s, _, _, u_ck, e_ck, bits = torch.ops.srnn_fast.layer_fwd(x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, True,
                                                              sc["b0"], sc["beta"], sc["dt"], sc["r_m"], CKPT_EVERY)
    g = torch.Generator().manual_seed(1)
    gs, gu, ge = torch.randn(T, B, H, generator=g), torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)
    x_proj = torch.nn.functional.linear(x, w_in, bias)
    _, _, _, u_seq, sbits = torch.ops.srnn_fast.scan_fwd(x_proj, w_rec, alpha, rho, u0, eta0, s0, True, sc["b0"],
                                                         sc["beta"], sc["dt"], sc["r_m"], True)
    print(f"  firing rate {float(s.mean()):.3f}")

    def layer(need):
        return lambda: torch.ops.srnn_fast.layer_bwd(gs, gu, ge, x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0, u_ck,
                                                     e_ck, bits, True, 1, sc["b0"], sc["beta"], sc["dt"], sc["r_m"],
                                                     0.5, 0.5, CKPT_EVERY, False, need)

    def scan(need):
        return lambda: torch.ops.srnn_fast.scan_bwd(gs, gu, ge, w_rec, alpha, rho, u0, eta0, s0, u_seq, sbits, True, 1,
                                                    sc["b0"], sc["beta"], sc["dt"], sc["r_m"], 0.5, 0.5, need)

    return {(op, need): make(need) for op, make in (("layer_bwd", layer), ("scan_bwd", scan)) for need in (True, False)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}, CPU kernels {srnn_fast.cpu_capability()}, "
          f"median of {args.repeats} (interleaved)")
    rows = []
    for name, shape in SHAPES.items():
        print(name)
        fns = timers(*shape)
        for fn in fns.values():  # warm-up: scratch buffers, page faults
            fn()
        times = {k: [] for k in fns}
        for rep in range(args.repeats):
            for k, fn in (fns.items() if rep % 2 == 0 else reversed(fns.items())):  # no order bias
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        for op in ("layer_bwd", "scan_bwd"):
            full, skip = times[(op, True)], times[(op, False)]
            # Each repeat times both back to back: the median of their ratios follows the
            # machine's swings in speed less than the ratio of the medians does.
            paired = statistics.median(b / a for a, b in zip(full, skip))
            rows.append((name, op, statistics.median(full), statistics.median(skip), paired))
    print()
    print("| shape | op | median, need_grad_tau=True (ms) | median, False (ms) | ratio of medians "
          "| median of paired ratios |")
    print("|---|---|---:|---:|---:|---:|")
    for name, op, a, b, paired in rows:
        print(f"| {name} | {op} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.3f} | {paired:.3f} |")


if __name__ == "__main__":
    main()
