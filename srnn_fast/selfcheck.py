"""``srnn_fast.check()`` / ``python -m srnn_fast check``: every backend this machine has,
against the reference, on a few small scan and layer cases, forward and backward, in
float64 and float32. One row per backend (each build of the CPU kernels separately), device
and dtype, with the largest error, its tolerance and the verdict; seconds, not minutes.
The first thing to run after installing on a new machine (a GPU above all: the CUDA kernels
are only ever tested there, and by the CPU harness "cuda_sim", which this runs too).

The tolerances are the test suite's (tests/scan_cases.py takes them from here): float64
spikes equal the reference's and every other output and gradient is within 1e-9 of it
(relative to the output's largest magnitude); float32 is held against float64.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch

# float32 backend vs the float64 reference. Near-threshold ties make exact spike equality
# impossible over long sequences, so these bound the rate of spike mismatches and the
# relative (norm-wise) error of the final state and the gradients. Calibration (cpp
# backend, the tests' make_case inputs, T 97..1301, H 36..128, all neurons, seeds 0-2): no
# spike flips; largest state error 2.2e-6 (u, adaptive); largest gradient error 2.7e-5
# (grad_eta0, lif over T = 1301, where the eta path decays as rho^T), 6.3e-6 for every
# other gradient. The bounds below sit 4-5x above those maxima. A case with a flip (a tie
# within float32 rounding) exceeds them for every float32 computation, the reference's own
# included: the cases held to them are ones without.
FLOAT32_TOL = {
    "spike_mismatch_rate": 2e-3,
    "state_rel_err": 1e-5,
    "grad_rel_err": 1e-4,
}
FLOAT64_RTOL = 1e-9

INPUTS = ("x", "w_rec", "tau_m", "tau_adp", "u0", "eta0", "s0")


class Case(NamedTuple):
    T: int
    B: int
    I: Optional[int]  # input size of a layer case (srnn_layer); None: the scan alone
    H: int
    neuron: str
    surrogate: str


# Small enough for seconds on any backend (the Triton interpreter included), covering
# T = 1, H not a multiple of 32, every neuron and surrogate, a relu layer, and an H that
# takes the CUDA kernels' stepwise path (W_rec too large for shared memory).
CASES = (
    Case(13, 3, None, 37, "adaptive", "gaussian"),
    Case(1, 2, None, 5, "lif", "multi_gaussian"),
    Case(9, 2, None, 33, "relu", "gaussian"),
    Case(11, 3, 6, 40, "adaptive", "multi_gaussian"),
    Case(7, 2, 4, 24, "relu", "gaussian"),
    Case(5, 2, None, 200, "adaptive", "gaussian"),
)


class Row(NamedTuple):
    backend: str  # "cpp (avx2)" for a build of the CPU kernels
    device: str
    dtype: str
    cases: int  # cases the backend takes (Triton: H within its limit)
    error: float  # the largest error as a fraction of its tolerance, shown as error / tolerance
    worst: str  # "1.2e-15 (grad_w_rec)"
    tolerance: str
    passed: bool


def _inputs(case: Case, seed: int) -> dict:
    """Random inputs at a moderate firing rate, and upstream gradients, float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    T, B, H = case.T, case.B, case.H
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    width = case.I if case.I is not None else H
    d = dict(x=n(T, B, width) * 1.5 + 0.4, w_rec=n(H, H) * (0.6 / H ** 0.5), tau_m=5 + 25 * u(H),
             tau_adp=40 + 160 * u(H), u0=u(B, H), eta0=0.2 * u(B, H), s0=(u(B, H) < 0.3).double())
    if case.I is not None:
        d.update(w_in=n(H, case.I) * (1.0 / case.I ** 0.5), bias=0.1 * n(H))
    upstream = dict(s=n(T, B, H), u=n(B, H), eta=n(B, H))
    return d, upstream


def _run(case: Case, inputs: dict, upstream: dict, backend: str, device: str, dtype: torch.dtype) -> dict:
    """Spikes, final state and every input's gradient of one forward + backward."""
    from .layer import srnn_layer
    from .scan import srnn_scan

    leaves = {k: v.to(device=device, dtype=dtype).requires_grad_(True) for k, v in inputs.items()}
    state = (leaves["u0"], leaves["eta0"], leaves["s0"])
    kw = dict(neuron=case.neuron, surrogate=case.surrogate, backend=backend)
    if case.I is None:
        s, (u, eta, _) = srnn_scan(leaves["x"], leaves["w_rec"], leaves["tau_m"], leaves["tau_adp"], state, **kw)
    else:
        s, (u, eta, _) = srnn_layer(leaves["x"], leaves["w_in"], leaves["bias"], leaves["w_rec"], leaves["tau_m"],
                                    leaves["tau_adp"], state, **kw)
    loss = sum((a * upstream[k].to(device=device, dtype=dtype)).sum() for k, a in (("s", s), ("u", u), ("eta", eta)))
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    out = {"s": s, "u": u, "eta": eta}
    out.update({f"grad_{k}": g for k, g in zip(names, grads)})
    return {k: v.detach().double().cpu() for k, v in out.items()}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error of ``got`` against ``ref`` (the float32 measure; the tests' too)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def _errors(got: dict, ref: dict, dtype: torch.dtype) -> list:
    """(error, tolerance, name) of every output against the float64 reference."""
    binary = bool(((ref["s"] == 0) | (ref["s"] == 1)).all())
    mismatch = float(((got["s"] != 0) != (ref["s"] != 0)).double().mean())
    out = []
    if dtype == torch.float64:
        out.append((mismatch, 0.0, "spikes"))  # exactly the reference's
        for k, r in ref.items():
            if k == "s" and binary:
                continue
            scale = float(r.abs().max().clamp_min(1e-30))
            err = float(((got[k] - r).abs() / (r.abs() + scale)).max()) if got[k].shape == r.shape else float("inf")
            out.append((err if err == err else float("inf"), FLOAT64_RTOL, k))
        return out
    out.append((mismatch, FLOAT32_TOL["spike_mismatch_rate"], "spike mismatch rate"))
    for k, r in ref.items():
        if k == "s" and binary:
            continue
        err = rel_err(got[k], r) if got[k].shape == r.shape else float("inf")
        tol = FLOAT32_TOL["grad_rel_err"] if k.startswith("grad_") else FLOAT32_TOL["state_rel_err"]
        out.append((err if err == err else float("inf"), tol, k))
    return out


def _targets() -> list:
    """(label, backend, device, context) for every backend and device this machine has; the
    CPU kernels once per build this CPU runs."""
    from .scan import BACKEND_TABLE, TEST_BACKENDS, _usable

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for b in BACKEND_TABLE + TEST_BACKENDS:
        for device in devices:
            if not _usable(b, device):
                continue
            if b.name == "cpp":
                from . import _C

                for isa in _C.supported_cpu_capabilities():
                    out.append((f"cpp ({isa})", b.name, device, isa))
            else:
                out.append((b.name, b.name, device, None))
    return out


def check_rows(cases=CASES) -> list:
    """The rows of :func:`check`, computed without printing."""
    from ._ops import cpu_build
    from .scan import BACKEND_TABLE, TEST_BACKENDS

    refs = []
    for i, case in enumerate(cases):
        inputs, upstream = _inputs(case, seed=i)
        refs.append((case, inputs, upstream, _run(case, inputs, upstream, "reference", "cpu", torch.float64)))
    fits = {b.name: b.fits for b in BACKEND_TABLE + TEST_BACKENDS}
    rows = []
    for label, backend, device, isa in _targets():
        for dtype in (torch.float64, torch.float32):
            worst, n, error = (0.0, 1.0, "-"), 0, None
            with cpu_build(isa):
                for case, inputs, upstream, ref in refs:
                    if not fits[backend](torch.empty(case.H, case.H, dtype=dtype)):
                        continue
                    n += 1
                    try:
                        got = _run(case, inputs, upstream, backend, device, dtype)
                    except Exception as e:  # noqa: BLE001 (a failing backend is a row, not a crash)
                        error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        break
                    for err, tol, name in _errors(got, ref, dtype):
                        if _ratio(err, tol) > _ratio(*worst[:2]):
                            worst = (err, tol, name)
            err, tol, name = worst
            passed = error is None and err <= tol
            text = error if error is not None else f"{err:.1e} ({name})" if name != "-" else "0"
            rows.append(Row(label, device, str(dtype).replace("torch.", ""), n, _ratio(err, tol), text,
                            f"{tol:.0e}" if error is None else "-", passed))
    return rows


def _ratio(err: float, tol: float) -> float:
    if err == 0:
        return 0.0
    return float("inf") if tol == 0 else err / tol


def check(cases=CASES, file=None) -> bool:
    """Runs every backend available here against the reference (see the module docstring),
    prints one row per backend, device and dtype, and returns whether all passed."""
    import sys

    out = file or sys.stdout
    t0 = time.perf_counter()
    rows = check_rows(cases)
    print(f"srnn_fast check: {len(cases)} small scan and layer cases, forward + backward, against the reference "
          f"(float64: spikes exact, the rest within {FLOAT64_RTOL:g}; float32: against float64)", file=out)
    print("| backend | device | dtype | cases | largest error (output) | tolerance | result |", file=out)
    print("| --- | --- | --- | ---: | --- | ---: | --- |", file=out)
    for r in rows:
        print(f"| {r.backend} | {r.device} | {r.dtype} | {r.cases} | {r.worst} | {r.tolerance} | "
              f"{'pass' if r.passed else 'FAIL'} |", file=out)
    ok = all(r.passed for r in rows)
    failed = sum(not r.passed for r in rows)
    print(f"{'all passed' if ok else f'{failed} of {len(rows)} FAILED'} in {time.perf_counter() - t0:.1f} s",
          file=out)
    return ok
