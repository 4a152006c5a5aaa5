"""How far a fused layer stack can go: its dense products alone, by torch.mm, against the stack.

For each benchmark stack (bench/run.py's shapes, inputs and output gradient) this times, on
the same threads and in the same minutes:

- the fused `cpp` stack, forward and forward + backward (the build that runs, or
  ``--cpu-capability``);
- its dense products alone, each as one batched float32 ``torch.mm`` over all T * B rows: the
  dense input projection (and, in the backward, its recomputation from the checkpoints, which
  the saved-for-backward limit forces), dW_in of a dense input, W_rec^T dI, dL/dx = dI W_in.
  W_rec^T dI runs step by step in any real kernel (each step needs the last), so one batched
  GEMM for it is an optimistic bound. Spike-driven sums are not in the floor.

What the stack takes beyond that floor is the per-neuron work (three passes over every neuron
and step: forward, recomputation, backward, with the surrogate's exps), the sparse sums over
spikes and inputs, and memory traffic. The report sets it against what issue 47's targets
(a fraction of the GEMM rate, bench/flops.py's count of the work) leave for it.

    python bench/floor.py --threads 2 [--shapes ecg,shd,smnist] [--rounds 3] [--cpu-capability avx2]
                          [--out floor.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from flops import gemm_rate, is_dense  # noqa: E402
from measure import median_time  # noqa: E402
from srnn_fast._ops import cpu_build  # noqa: E402

TARGETS = {"smnist": (0.50, 0.60), "shd": (None, 0.40), "ecg": (None, None)}  # issue 47: fwd, fwd+bwd


def dense_products(shape: dict, x: torch.Tensor, model) -> dict:
    """(m, k, n) of every dense product of the stack's forward and backward, as batched GEMMs."""
    T, B = shape["T"], shape["B"]
    N = T * B
    fwd, bwd = [], []
    h = x
    with torch.no_grad():
        for index, layer in enumerate(model.layers):
            I, H = h.shape[-1], layer.hidden_size
            if is_dense(int(torch.count_nonzero(h)), h.numel()):  # a real projection
                fwd.append((N, I, H))
                bwd += [(N, I, H), (I, N, H)]  # its recomputation, dW_in^T = x^T dI
            bwd.append((N, H, H))  # W_rec^T dI
            if index > 0:
                bwd.append((N, H, I))  # dL/dx = dI W_in
            h = layer(h)[0]
    return {"fwd": fwd, "bwd": bwd}


def time_products(products: list, repeats: int) -> float:
    """Seconds for torch.mm over the (m, k, n) products, each the median of ``repeats`` calls."""
    total = 0.0
    g = torch.Generator().manual_seed(0)
    for m, k, n in products:
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        out = torch.empty(m, n)
        total += median_time(lambda: torch.mm(a, b, out=out), torch.device("cpu"), repeats, 1)
    return total


def measure_shape(name: str, repeats: int, quick: bool = False) -> dict:
    shape = dict(run.SHAPES[name], **(run.QUICK if quick else {}))
    model = run.build("cpp", shape["sizes"], torch.device("cpu"))
    x = run.make_input(shape, torch.device("cpu"))
    res = run._measure("cpp", shape, torch.device("cpu"), repeats, 1, False, False, count=True)
    products = dense_products(shape, x, model)  # model: the same parameters (run.build seeds them)
    floor_fwd = time_products(products["fwd"], repeats)
    floor_bwd = time_products(products["bwd"], repeats)
    work = res["flops"]
    return {"fwd_ms": res["fwd_ms"], "fwd_bwd_ms": res["fwd_bwd_ms"], "floor_fwd_ms": 1e3 * floor_fwd,
            "floor_fwd_bwd_ms": 1e3 * (floor_fwd + floor_bwd),
            "dense_gflop_fwd_bwd": sum(2 * m * k * n for m, k, n in products["fwd"] + products["bwd"]) / 1e9,
            "work_gflop": {k: v["total"] / 1e9 for k, v in work.items()}}


def report(rows: dict, rate: float) -> str:
    lines = [f"GEMM rate {rate / 1e9:.0f} GFLOP/s; ms, medians over rounds", "",
             "| stack | pass | fused | dense products by torch.mm | the rest | target (issue 47) | rest the target leaves |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        for i, (label, key, work_key) in enumerate((("fwd", "fwd", "fwd"), ("fwd+bwd", "fwd_bwd", "fwd_bwd"))):
            fraction = TARGETS[name][i]
            fused, floor = r[f"{key}_ms"], r[f"floor_{key}_ms"]
            if fraction is None:
                target = left = "-"
            else:
                t = 1e3 * r["work_gflop"][work_key] * 1e9 / (fraction * rate)
                target, left = f"{t:.0f} ({fraction:.0%})", f"{t - floor:.0f}"
            lines.append(f"| {name} | {label} | {fused:.1f} | {floor:.1f} | {fused - floor:.1f} | {target} | {left} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="ecg,shd,smnist")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-capability", default=None, help="build of the CPU kernels (default: the one that runs)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (T 24, B 4): a check that it runs")
    p.add_argument("--out", default=None, help="write the per-round figures as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in run.SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {sorted(run.SHAPES)}")
    rounds, rates = [], []
    with cpu_build(args.cpu_capability):
        for _ in range(args.rounds):
            rates.append(gemm_rate(torch.device("cpu")))
            rounds.append({name: measure_shape(name, args.repeats, args.quick) for name in names})
    rows = {name: {k: (statistics.median(r[name][k] for r in rounds) if k != "work_gflop" else rounds[0][name][k])
                   for k in rounds[0][name]} for name in names}
    rate = statistics.median(rates)
    print(f"threads {torch.get_num_threads()}, build {args.cpu_capability or 'auto'}")
    print(report(rows, rate))
    if args.out:
        Path(args.out).write_text(json.dumps({"rates": rates, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
