"""Speed benchmark (SPEC section 6): fused SRNN backends vs the reference loop, torch.compile
of the reference, and nn.LSTM / nn.GRU / nn.RNN of the same hidden sizes, on the task shapes.

What is timed, for every contender alike: the whole recurrent layer stack of the task (each
layer's input projection over all steps plus its recurrence; no readout), on the same
inputs, float32. "fwd" runs under torch.no_grad() (the fused backends' inference path);
"fwd+bwd" is a forward with grad plus backward of <output, fixed random gradient>. Times are
medians of --repeats calls after --warmup calls, device-synchronized, after one untimed first
call of each; a contender whose first calls took over SLOW_CALL_S gets at most 3 timed calls
and no further warm-up (results.json records "repeats"). With --rounds N every contender is
timed N times, round-robin (all contenders of a round, then the next round), and the report
gives the median over rounds; each ratio is the median of the per-round ratios, since
contenders of one round ran close together in time (timings on shared hosts swing 2-3x
between minutes).

Subnormals: PyTorch's ops compute with subnormal numbers (below 1.18e-38 in float32), which
the backward of a spiking network makes by the million, and which cost some CPUs (Intel) a
microcode assist each; the fused float32 kernels flush them to zero. So on the CPU every
contender is timed twice in the same run: as PyTorch runs by default, and with subnormals
flushed in every thread ("flushed"; --no-flushed skips it). The report gives both ratios.

Work: per shape and contender, the floating-point operations of the forward and of
forward+backward (bench/flops.py: dense products by formula from the shapes, spike-driven ones
from the spikes that contender produced in the run, the neuron arithmetic per neuron and step),
and the fraction of the machine's GEMM rate each reaches: the rate of a large float32 torch.mm
measured at the start of every round, on the same threads; each fraction is the median over
rounds of the round's work / time / GEMM rate.

Memory: "saved" is what autograd keeps for backward during the fwd+bwd forward (every saved
tensor, once per storage), beyond the input and the parameters, which exist anyway (for
every contender alike).
"peak" is torch.cuda.max_memory_allocated during fwd+bwd on CUDA; on the CPU it is not
measured (torch's CPU allocator has no peak counter) and "saved" stands for it.

CPU builds: the "cpp" backend's kernels exist per instruction set (avx512, avx2, default;
srnn_fast.cpu_capability()). The report names the CPU model and the build that ran;
--cpu-capability runs another build, or several ("all": every build this CPU runs, each as
its own contender "cpp-<build>", against the same peers in the same run).

--scan times the srnn_scan op alone (x_proj given: the recurrence of the first hidden layer,
what direct callers and the membrane readout run) against the reference scan.

With --compile, torch.compile runs in a child process with a time limit (--compile-timeout),
two ways: "compiled_reference" compiles the whole reference stack (Dynamo unrolls all T steps,
which takes longer than the limit at the task shapes), "compiled_step" compiles the
reference's per-step update (srnn_fast.reference.reference_step) and loops over it in
Python. A compile that fails or runs out of time is recorded as such. Without --compile they
are listed as not run: they take minutes on a 2-core CPU.

    python bench/run.py                      # all shapes, the usual contenders, on GPU if present
    python bench/run.py --quick              # tiny shapes and repeats, seconds (CI)
    python bench/run.py --cpu-capability all --backends cpp,reference --threads 2
    python bench/run.py --scan --cpu-capability all --rounds 5   # noisy host: medians over 5 rounds
    python bench/run.py --shapes ecg --backends cpp,reference --out /tmp/b
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import srnn_fast  # noqa: E402
from srnn_fast._ops import cpu_build  # noqa: E402
from flops import gemm_rate, rnn_stack_flops, srnn_stack_flops  # noqa: E402
from measure import median_time, saved_bytes  # noqa: E402
from srnn_fast.reference import reference_step, srnn_scan_ref  # noqa: E402

# B, T, layer sizes [input, hidden...], input kind.
SHAPES = {
    "ecg": dict(B=64, T=1301, sizes=[4, 36], input="spikes"),
    "shd": dict(B=64, T=250, sizes=[700, 128, 128], input="spikes"),
    "smnist": dict(B=256, T=784, sizes=[80, 120, 100], input="analog"),
}
QUICK = dict(B=4, T=24)
BASELINES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
PEERS = ("reference", "compiled_step", "compiled_reference", *BASELINES)
COMPILED = ("compiled_step", "compiled_reference")  # run in a child process with a time limit


def fused_backends(device: torch.device) -> list:
    """Fused backends that run natively on ``device`` (never the Triton interpreter)."""
    out = []
    for name in srnn_fast.available_backends():
        if name == "reference":
            continue
        try:
            srnn_fast.scan.resolve_backend(name, device)
        except (ValueError, srnn_fast.BackendUnavailableError):
            continue
        if device.type == "cpu" and name == "triton":
            continue
        out.append(name)
    return out


class ScanOnly(nn.Module):
    """srnn_scan alone on a given x_proj: the recurrent part of one SRNN layer."""

    def __init__(self, hidden: int, backend: str):
        super().__init__()
        layer = srnn_fast.SRNNLayer(1, hidden, init_state="zeros")  # its w_rec, tau_m, tau_adp
        self.w_rec, self.tau_m, self.tau_adp = layer.w_rec, layer.tau_m, layer.tau_adp
        self.backend = backend

    def forward(self, x_proj):
        return srnn_fast.srnn_scan(x_proj, self.w_rec, self.tau_m, self.tau_adp, backend=self.backend)[0]


class SRNNStack(nn.Module):
    """SRNN layers back to back; ``backend`` "compiled_reference" uses the reference."""

    def __init__(self, sizes, backend):
        super().__init__()
        b = "reference" if backend == "compiled_reference" else backend
        self.layers = nn.ModuleList(srnn_fast.SRNNLayer(i, h, backend=b, init_state="zeros")
                                    for i, h in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers:
            x, _ = layer(x)
        return x


class CompiledStepStack(nn.Module):
    """The reference loop with its per-step update compiled (torch.compile of
    srnn_fast.reference.reference_step): how a user gets torch.compile into a recurrence
    without unrolling T steps. Same parameters as the other SRNN contenders."""

    def __init__(self, sizes):
        super().__init__()
        self.layers = SRNNStack(sizes, "reference").layers
        self.step = torch.compile(reference_step, dynamic=False)

    def forward(self, x):
        for layer in self.layers:
            cfg = layer.config
            u, eta, s = layer.initial_state(x.shape[1])
            alpha, rho = torch.exp(-cfg.dt / layer.tau_m), torch.exp(-cfg.dt / layer.tau_adp)
            w_t = layer.w_rec.t()
            out = []
            for x_t in layer.input(x).unbind(0):
                u, eta, s = self.step(x_t, u, eta, s, w_t, alpha, rho, cfg)
                out.append(s)
            x = torch.stack(out)
        return x


class SnnTorchStack(nn.Module):
    """snnTorch peer: nn.Linear input projection + snntorch.RLeaky (all-to-all recurrent
    LIF), stepped over t as snnTorch's own examples do."""

    def __init__(self, sizes):
        super().__init__()
        import snntorch

        self.inputs = nn.ModuleList(nn.Linear(i, h) for i, h in zip(sizes[:-1], sizes[1:]))
        self.cells = nn.ModuleList(snntorch.RLeaky(beta=0.95, linear_features=h) for h in sizes[1:])

    def forward(self, x):
        for linear, cell in zip(self.inputs, self.cells):
            spk, mem = cell.init_rleaky()
            out = []
            for current in linear(x).unbind(0):
                spk, mem = cell(current, spk, mem)
                out.append(spk)
            x = torch.stack(out)
        return x


class NorseStack(nn.Module):
    """norse peer: norse.torch.LSNNRecurrent layers (adaptive LIF with input and recurrent
    weights), each run over the whole sequence by norse."""

    def __init__(self, sizes):
        super().__init__()
        from norse.torch import LSNNRecurrent

        self.layers = nn.ModuleList(LSNNRecurrent(i, h) for i, h in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers:
            x, _ = layer(x)
        return x


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# Peers from other SNN libraries, benchmarked where they are installed (SPEC section 6).
LIBRARY_PEERS = {"norse": ("norse", NorseStack), "snntorch": ("snntorch", SnnTorchStack)}


class RNNStack(nn.Module):
    """nn.LSTM / GRU / RNN layers of the same widths (separate modules: widths differ)."""

    def __init__(self, cls, sizes):
        super().__init__()
        self.layers = nn.ModuleList(cls(i, h) for i, h in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers:
            x, _ = layer(x)
        return x


def split_capability(contender: str):
    """"cpp-avx2" -> ("cpp", "avx2"); anything else -> (contender, None)."""
    name, _, cap = contender.partition("-")
    return (name, cap) if name == "cpp" and cap else (contender, None)


def build(contender: str, sizes, device, scan: bool = False) -> nn.Module:
    torch.manual_seed(0)  # the same parameters for every SRNN contender
    contender = split_capability(contender)[0]
    if scan:
        return ScanOnly(sizes[1], contender).to(device)
    if contender in BASELINES:
        model = RNNStack(BASELINES[contender], sizes)
    elif contender in LIBRARY_PEERS:
        model = LIBRARY_PEERS[contender][1](sizes)
    elif contender == "compiled_step":
        model = CompiledStepStack(sizes)
    else:
        model = SRNNStack(sizes, contender)
    model = model.to(device)
    if contender == "compiled_reference":
        model = torch.compile(model)
    return model


def make_input(shape: dict, device, scan: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    T, B, I = shape["T"], shape["B"], shape["sizes"][0]
    if scan:  # x_proj of the first hidden layer: an input current that makes it fire moderately
        return (0.5 * torch.randn(T, B, shape["sizes"][1], generator=g) + 0.2).to(device)
    if shape["input"] == "spikes":  # event data: sparse binary frames
        x = (torch.rand(T, B, I, generator=g) < 0.05).float()
    else:  # analog pixels through a population code: dense values in [0, 1]
        x = torch.rand(T, B, I, generator=g)
    # The first layer's input weights are Xavier-uniform; scale so the layer actually spikes.
    return (x * (3.0 if shape["input"] == "spikes" else 1.5)).to(device)


@contextlib.contextmanager
def capability_of(contender: str):
    """Runs the CPU build a "cpp-<build>" contender names, inside the block."""
    with cpu_build(split_capability(contender)[1]):
        yield


# Contenders whose first forward + forward-backward take longer than this get at most 3
# timed calls and no warm-up beyond those first calls: it keeps the main job within 3 min
# on a 2-core machine (the S-MNIST shape's reference, RNNs and peers take seconds per call).
SLOW_CALL_S = 1.0


def measure(contender: str, shape: dict, device, repeats: int, warmup: int, scan: bool = False,
            flushed: bool = False, count: bool = False) -> dict:
    with capability_of(contender):
        return _measure(contender, shape, device, repeats, warmup, scan, flushed, count)


@contextlib.contextmanager
def subnormals_flushed():
    """Subnormal float32/float64 numbers flushed to zero in every torch CPU thread inside the
    block (srnn_fast._C.set_flush_denormal: torch.set_flush_denormal reaches only the calling
    thread), as the fused float32 kernels always run; off again after it."""
    from srnn_fast import _C

    _C.set_flush_denormal(True)
    try:
        yield
    finally:
        _C.set_flush_denormal(False)


def can_flush_subnormals() -> bool:
    """Whether this CPU flushes subnormals on request, and every torch thread does it: a
    subnormal times 1 is 0 in every element of an op large enough to run on all threads."""
    from srnn_fast import _ops

    if _ops.EXTENSION_ERROR is not None or not torch.set_flush_denormal(False):
        return False
    with subnormals_flushed():
        ok = bool(((torch.full((1 << 20,), 1e-39) * 1.0) == 0).all())
    return ok


def count_flops(contender: str, model: nn.Module, x: torch.Tensor, shape: dict):
    """The stack's work (bench/flops.py) from this contender's own spikes, or None where not counted."""
    name = split_capability(contender)[0]
    if name in BASELINES:
        return rnn_stack_flops(name, shape["sizes"], shape["T"], shape["B"])
    if isinstance(model, SRNNStack):
        return srnn_stack_flops(model.layers, x)
    return None


def _measure(contender: str, shape: dict, device, repeats: int, warmup: int, scan: bool, flushed: bool,
             count: bool) -> dict:
    model = build(contender, shape["sizes"], device, scan)
    x = make_input(shape, device, scan)
    out_shape = (shape["T"], shape["B"], shape["sizes"][1 if scan else -1])
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(2)).to(device)

    def fwd():
        with torch.no_grad():
            return model(x)

    def fwd_bwd():
        model(x).backward(grad)

    clear = lambda: model.zero_grad(set_to_none=True)  # noqa: E731
    t0 = time.perf_counter()
    fwd(), fwd_bwd()  # first calls (compiles for torch.compile), outside the timings
    first_s = time.perf_counter() - t0
    if first_s > SLOW_CALL_S:  # the first calls warmed up; a median of 3 s-long calls is stable
        repeats, warmup = min(repeats, 3), 0
    res = {"fwd_ms": 1e3 * median_time(fwd, device, repeats, warmup),
           "fwd_bwd_ms": 1e3 * median_time(fwd_bwd, device, repeats, warmup, clear),
           "first_call_s": first_s, "repeats": repeats}
    if flushed:  # the same calls again with subnormals flushed in every thread, for every contender
        with subnormals_flushed():
            res["fwd_ms_flushed"] = 1e3 * median_time(fwd, device, repeats, warmup)
            res["fwd_bwd_ms_flushed"] = 1e3 * median_time(fwd_bwd, device, repeats, warmup, clear)
    clear()
    if count and not scan:
        res["flops"] = count_flops(contender, model, x, shape)
    res["saved_bytes"] = saved_bytes(lambda: model(x), exclude=[x, *model.parameters()])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd()
        torch.cuda.synchronize()
        res["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        res["peak_bytes"] = None
    return res


def validate(backend: str, device) -> str:
    """float64 check of a fused backend against the reference on a small case; '' if it
    agrees, else what differed (no speedup is reported for a backend that fails)."""
    g = torch.Generator().manual_seed(0)
    T, B, H = 23, 3, 37
    args = [torch.randn(T, B, H, generator=g, dtype=torch.float64) + 0.4,
            torch.randn(H, H, generator=g, dtype=torch.float64) * 0.1,
            5 + 25 * torch.rand(H, generator=g, dtype=torch.float64),
            40 + 160 * torch.rand(H, generator=g, dtype=torch.float64)]
    results = []
    for kw in ({"backend": split_capability(backend)[0]}, {"backend": "reference"}):
        leaves = [a.to(device).requires_grad_(True) for a in args]
        with capability_of(backend):
            s, (u, eta, _) = srnn_fast.srnn_scan(*leaves, **kw)
            grads = torch.autograd.grad((s * torch.arange(H, device=device)).sum() + u.sum() + eta.sum(), leaves)
        results.append(tuple(t.detach() for t in (s, u, eta, *grads)))
    if not torch.equal(results[0][0], results[1][0]):
        return "spikes differ from the reference"
    for name, a, b in zip(("u", "eta", "x_proj", "w_rec", "tau_m", "tau_adp"), results[0][1:], results[1][1:]):
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(b.abs().max())):
            return f"{name} differs from the reference"
    return ""


def run_child(args, contender: str, shape_name: str) -> dict:
    """One contender in a child process with a time limit (used for torch.compile)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", contender, "--shapes", shape_name,
           "--device", args.device, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(torch.get_num_threads())] + (["--quick"] if args.quick else [])
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout)
    except subprocess.TimeoutExpired:
        why = " (torch.compile unrolls all T steps of the loop)" if contender == "compiled_reference" else ""
        return {"error": f"did not finish within --compile-timeout {args.compile_timeout:.0f} s{why}"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": f"child exited with {p.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def fmt(v, unit=""):
    if v is None:
        return "-"
    return f"{v:.1f}{unit}" if isinstance(v, float) else str(v)


def fmt_ratio(v) -> str:
    """A bytes ratio as '0.021 (1/48)'."""
    if v is None:
        return "-"
    return f"{v:.3f} (1/{1 / v:.0f})" if 0 < v < 1 else f"{v:.3f}"


def markdown(report: dict) -> str:
    m = report["meta"]
    caps = ", ".join(dict.fromkeys(c for c in m.get("cpu_capabilities_run", []) if c))
    cpu = (f" CPU model {m['cpu_model']}, AVX-512 {'yes' if m.get('cpu_avx512') else 'no'}; cpp build(s): "
           f"{caps or '-'}." if m["device"] == "cpu" else "")
    flushed = m.get("flushed", False)
    lines = [f"Device: {m['device_name']} ({m['device']}), torch {m['torch']}, {m['threads']} threads, "
             f"float32, {m['date']}, {m.get('what', 'layer stacks')}.{cpu} Command: `{m['command']}`", "",
             "Times as PyTorch runs by default (subnormal numbers kept)"
             + (", and flushed: every contender again with subnormals flushed to zero in every thread, as "
                "the fused float32 kernels always run" if flushed else "") + ".", "",
             "| shape | contender | fwd ms | fwd+bwd ms |" + (" fwd ms, flushed | fwd+bwd ms, flushed |" if flushed else "")
             + " saved MB | peak MB | note |", "|---|---|---:|---:|" + ("---:|---:|" if flushed else "") + "---:|---:|---|"]
    for shape, rows in report["results"].items():
        for name, r in rows.items():
            mb = lambda b: None if b is None else b / 2**20  # noqa: E731
            lines.append(f"| {shape} | {name} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} | "
                         + (f"{fmt(r.get('fwd_ms_flushed'))} | {fmt(r.get('fwd_bwd_ms_flushed'))} | " if flushed else "")
                         + f"{fmt(mb(r.get('saved_bytes')))} | {fmt(mb(r.get('peak_bytes')))} | "
                         f"{r.get('error', r.get('note', ''))} |")
    best = any("fwd_bwd_best" in row for row in report["ratios"])
    rounds = m.get("rounds", 1)
    lines += ["", "Speedup of each fused backend (time of the peer / time of the fused backend"
              + (f"; median of the {rounds} per-round ratios, and the ratio of the best rounds" if best else "")
              + ("; \"flushed\": both timed with subnormals flushed" if flushed else "") + "):", "",
              "| shape | fused | peer | fwd | fwd+bwd |" + (" fwd, flushed | fwd+bwd, flushed |" if flushed else "")
              + (" fwd+bwd, best rounds |" if best else "") + " saved bytes, fused / peer |",
              "|---|---|---|---:|---:|" + ("---:|---:|" if flushed else "") + ("---:|" if best else "") + "---:|"]
    for row in report["ratios"]:
        lines.append(f"| {row['shape']} | {row['fused']} | {row['peer']} | {fmt(row['fwd'], 'x')} | "
                     f"{fmt(row['fwd_bwd'], 'x')} |"
                     + (f" {fmt(row.get('fwd_flushed'), 'x')} | {fmt(row.get('fwd_bwd_flushed'), 'x')} |" if flushed else "")
                     + (f" {fmt(row.get('fwd_bwd_best'), 'x')} |" if best else "") + f" {fmt_ratio(row['saved'])} |")
    if report.get("gemm_fractions"):
        pct = lambda v: "-" if v is None else f"{100 * v:.0f} %"  # noqa: E731
        lines += ["", f"Work (bench/flops.py: dense products by formula, spike-driven ones from the spikes of the "
                      f"run, neuron arithmetic per neuron and step) against the GEMM rate of this run: "
                      f"{m['gemm_gflops']:.0f} GFLOP/s (float32 torch.mm, n = "
                      f"{' and '.join(map(str, m['gemm_sizes']))}, the better; median over rounds), "
                      f"{m['threads']} threads. % = GFLOP / time / GEMM rate"
                      + ("; median of the per-round fractions" if rounds > 1 else "") + ".", "",
                  "| shape | contender | GFLOP fwd | GFLOP fwd+bwd | % fwd | % fwd+bwd |"
                  + (" % fwd, flushed | % fwd+bwd, flushed |" if flushed else ""),
                  "|---|---|---:|---:|---:|---:|" + ("---:|---:|" if flushed else "")]
        for row in report["gemm_fractions"]:
            lines.append(f"| {row['shape']} | {row['contender']} | {row['gflop_fwd']:.3g} | {row['gflop_fwd_bwd']:.3g} | "
                         f"{pct(row.get('fwd'))} | {pct(row.get('fwd_bwd'))} |"
                         + (f" {pct(row.get('fwd_flushed'))} | {pct(row.get('fwd_bwd_flushed'))} |" if flushed else ""))
    return "\n".join(lines) + "\n"


# Times per contender: as measured, and with subnormals flushed in every thread (--flushed).
TIME_KEYS = ("fwd_ms", "fwd_bwd_ms", "fwd_ms_flushed", "fwd_bwd_ms_flushed")
# Ratio keys ("fwd_bwd": fwd_bwd_ms of the peer / of the fused backend).
RATIO_KEYS = {k.replace("_ms", ""): k for k in TIME_KEYS}


def ratios(results: dict, fused: list) -> list:
    rows = []
    for shape, res in results.items():
        for f in fused:
            mine = res.get(f, {})
            if "fwd_ms" not in mine:
                continue
            for peer, r in res.items():
                if peer in fused or "fwd_ms" not in r:
                    continue
                saved = (mine["saved_bytes"] / r["saved_bytes"]) if r.get("saved_bytes") else None
                row = {"shape": shape, "fused": f, "peer": peer, "saved": None if saved is None else round(saved, 4)}
                row.update({k: r[t] / mine[t] for k, t in RATIO_KEYS.items() if t in r and t in mine})
                rows.append(row)
    return rows


def gemm_fractions(results: dict, rate: float) -> list:
    """Per shape and contender with a work count: GFLOP and the fraction of the GEMM rate
    ``rate`` (FLOP/s) reached, per timing (fwd, fwd_bwd, and flushed where timed)."""
    rows = []
    for shape, res in results.items():
        for c, r in res.items():
            work = r.get("flops")
            if not work or "fwd_ms" not in r:
                continue
            row = {"shape": shape, "contender": c, "gflop_fwd": work["fwd"]["total"] / 1e9,
                   "gflop_fwd_bwd": work["fwd_bwd"]["total"] / 1e9}
            for k, t in RATIO_KEYS.items():
                if t in r:
                    row[k] = work["fwd_bwd" if k.startswith("fwd_bwd") else "fwd"]["total"] / (r[t] / 1e3) / rate
            rows.append(row)
    return rows


def median_rows(per_round: list, key_fields: tuple) -> list:
    """Rows of several rounds that agree on ``key_fields`` merged into one: the first round's
    row with each RATIO_KEYS value replaced by its median over the rounds; "rounds" = how many."""
    rows = {}
    for round_rows in per_round:
        for row in round_rows:
            rows.setdefault(tuple(row[f] for f in key_fields), []).append(row)
    out = []
    for same in rows.values():
        row = dict(same[0])
        for key in RATIO_KEYS:
            values = [r[key] for r in same if key in r]
            if values:
                row[key] = statistics.median(values)
        row["rounds"] = len(same)
        out.append(row)
    return out


def combine_fractions(per_round: list) -> list:
    """The median over rounds of each fraction (each round against its own GEMM rate)."""
    return median_rows(per_round, ("shape", "contender"))


def combine_rounds(rounds: list) -> dict:
    """Per shape and contender, the first round's record with its times replaced by their
    median over the rounds (and the per-round times kept under "<key>_rounds")."""
    out = {}
    for shape, res in rounds[0].items():
        out[shape] = {}
        for c, rec in res.items():
            rec = dict(rec)
            for key in TIME_KEYS:
                times = [r[shape][c][key] for r in rounds if key in r[shape].get(c, {})]
                if len(rounds) > 1 and times:
                    rec[key], rec[key + "_rounds"] = statistics.median(times), times
                    rec[key + "_best"] = min(times)
            out[shape][c] = rec
    return out


def combine_ratios(per_round: list, combined: dict = None) -> list:
    """The median over rounds of each ratio: each round's ratio compares times taken close
    together, so the median of ratios resists a host's slow spells better than the ratio of
    medians. With ``combined`` (combine_rounds' output) each row also gets "fwd_bwd_best":
    the ratio of the best (least disturbed) rounds, the contenders' own speed."""
    out = median_rows(per_round, ("shape", "fused", "peer"))
    for row in out:
        if len(per_round) == 1:
            del row["rounds"]
        else:
            res = (combined or {}).get(row["shape"], {})
            fused, peer = res.get(row["fused"], {}), res.get(row["peer"], {})
            if "fwd_bwd_ms_best" in fused and "fwd_bwd_ms_best" in peer:
                row["fwd_bwd_best"] = peer["fwd_bwd_ms_best"] / fused["fwd_bwd_ms_best"]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--backends", default=None,
                   help="comma list of contenders (fused backends, " + ", ".join(PEERS) + "); default all")
    p.add_argument("--quick", action="store_true", help=f"tiny shapes (T {QUICK['T']}, B {QUICK['B']}), 2 repeats")
    p.add_argument("--compile", action="store_true",
                   help="also run the torch.compile contenders (minutes per shape; else only where named in --backends)")
    p.add_argument("--scan", action="store_true", help="time the srnn_scan op alone (x_proj given) instead of the "
                                                       "layer stacks: fused backends against the reference scan")
    p.add_argument("--cpu-capability", default=None,
                   help="build(s) of the CPU kernels for the cpp backend: avx512, avx2, default, a comma list, or all "
                        "(default: the one srnn_fast.cpu_capability() picks)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 5, quick 2; at most 3 for contenders whose first calls took over 1 s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every contender this many times, round-robin, and report medians over the rounds "
                        "(ratios: the median of the per-round ratios); for noisy shared hosts")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 1)")
    p.add_argument("--no-flushed", dest="flushed", action="store_false",
                   help="skip the second timing of every contender with subnormal numbers flushed to zero in every "
                        "thread (CPU; the fused float32 kernels flush them anyway, PyTorch's ops do not)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile-timeout", type=float, default=240.0,
                   help="seconds allowed for torch.compile of the reference per shape (default 240)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                   help="folder for results.json and results.md (default bench/out)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None, p=None):
    """The arguments; a wrong value ends the command with argparse's one error line (exit status 2)."""
    p = p or build_parser()
    args = p.parse_args(argv)
    for name in args.shapes.split(","):
        if name not in SHAPES:
            p.error(f"--shapes: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1; got {args.rounds}")
    args.warmup = args.warmup if args.warmup is not None else 1
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = {}
    for name in args.shapes.split(","):
        shapes[name] = dict(SHAPES[name], **(QUICK if args.quick else {}))
    if args.child:  # one contender, one shape; the parent reads the JSON line
        shape = shapes[args.shapes]
        print(json.dumps(measure(args.child, shape, device, args.repeats, args.warmup)))
        return 0

    try:
        fused = expand_capabilities(fused_backends(device), args.cpu_capability)
    except ValueError as e:
        parser.error(str(e))
    peers = ["reference"] if args.scan else (
        list(PEERS) + [p for p, (module, _) in LIBRARY_PEERS.items() if _importable(module)])
    contenders = fused + peers
    if args.backends:
        wanted = args.backends.split(",")
        wanted = [c for w in wanted for c in ([f for f in fused if f.startswith("cpp")] if w == "cpp" else [w])]
        unknown = [w for w in wanted if w not in contenders and w not in ("cpp", "cuda", "triton")]
        if unknown:
            parser.error(f"--backends: unknown {unknown}; choose from {', '.join(contenders)}")
        contenders = [c for c in contenders if c in wanted]
        for w in wanted:  # a fused backend asked for by name but not usable here: say why
            if w in ("cpp", "cuda", "triton") and w not in fused:
                print(f"note: backend {w!r} does not run on {device} here; skipped", file=sys.stderr)
    asked = args.backends.split(",") if args.backends else []

    invalid = {f: validate(f, device) for f in fused if f in contenders}
    cpu_build = _active_capability()
    for f, why in invalid.items():
        if why:
            print(f"WARNING: backend {f} fails its correctness check ({why}); its times are not compared",
                  file=sys.stderr)

    from tqdm import tqdm

    flushed = args.flushed and device.type == "cpu" and can_flush_subnormals()
    if args.flushed and device.type == "cpu" and not flushed:
        print("note: this CPU (or build) cannot flush subnormals in every thread; no flushed timings",
              file=sys.stderr)
    gemm_sizes = (256, 512) if args.quick else (1024, 2048)
    # Rounds: every contender once per round, round after round, so that contenders compared
    # in a ratio were timed minutes apart at most and a slow spell of a shared host hits all.
    # Each round starts by measuring the GEMM rate its fractions are held against.
    tasks = [(r, s, c) for r in range(args.rounds) for s in shapes for c in contenders]
    rounds = [{s: {} for s in shapes} for _ in range(args.rounds)]
    rates = []
    for r, shape_name, c in tqdm(tasks, desc="bench", unit="run", file=sys.stderr):
        results = rounds[r]
        if len(rates) == r:
            rates.append(gemm_rate(device, gemm_sizes))
        if c in COMPILED and not args.compile and c not in asked:
            results[shape_name][c] = {"note": "not run: pass --compile (torch.compile takes minutes here)"}
            continue
        if c in COMPILED:  # minutes per call: timed in the first round only
            results[shape_name][c] = run_child(args, c, shape_name) if r == 0 else rounds[0][shape_name][c]
        else:
            try:
                results[shape_name][c] = measure(c, shapes[shape_name], device, args.repeats, args.warmup, args.scan,
                                                 flushed, count=r == 0)
            except Exception as e:  # record and go on: one failing contender must not lose the rest
                results[shape_name][c] = {"error": f"{type(e).__name__}: {e}"}
        if invalid.get(c):
            results[shape_name][c]["error"] = f"fails the correctness check: {invalid[c]}"

    valid_fused = [f for f in fused if f in contenders and not invalid.get(f)]
    results = combine_rounds(rounds)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else _cpu_name() + f", {os.cpu_count()} CPUs")
    report = {
        "meta": {"device": str(device), "device_name": device_name, "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "date": datetime.datetime.now(datetime.timezone.utc)
                 .strftime("%Y-%m-%d %H:%M UTC"), "command": "python bench/run.py " + " ".join(sys.argv[1:]),
                 "python": platform.python_version(), "quick": args.quick, "repeats": args.repeats,
                 "rounds": args.rounds,
                 "warmup": args.warmup, "shapes": shapes, "what": "srnn_scan op" if args.scan else "layer stacks",
                 "cpu_model": _cpu_name(), "cpu_avx512": "avx512f" in _cpu_flags(), "cpu_avx2": "avx2" in _cpu_flags(),
                 "cpu_capability": cpu_build, "flushed": flushed,
                 "gemm_gflops": statistics.median(rates) / 1e9, "gemm_gflops_rounds": [g / 1e9 for g in rates],
                 "gemm_sizes": gemm_sizes,
                 "cpu_capabilities_run": [split_capability(f)[1] or cpu_build for f in fused if f.startswith("cpp")]},
        "results": results,
        "ratios": combine_ratios([ratios(res, valid_fused) for res in rounds], results),
        # Work counts are taken in the first round, so each round's fractions use them.
        "gemm_fractions": combine_fractions([gemm_fractions(_with_flops(res, results), rate)
                                             for res, rate in zip(rounds, rates)]),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {os.path.join(args.out, 'results.json')} and results.md")
    return 0


def _with_flops(round_results: dict, combined: dict) -> dict:
    """A round's results with the work counts of the first round (combine_rounds keeps them)."""
    return {shape: {c: dict(rec, flops=combined[shape].get(c, {}).get("flops")) for c, rec in res.items()}
            for shape, res in round_results.items()}


def expand_capabilities(fused: list, wanted) -> list:
    """The cpp backend once per CPU build asked for ("cpp-<build>" when more than one, or
    another than the active one); other fused backends as they are. A build this CPU cannot run:
    ValueError."""
    if "cpp" not in fused or not wanted:
        return fused
    from srnn_fast import _C

    supported = _C.supported_cpu_capabilities()
    caps = supported if wanted == "all" else wanted.split(",")
    bad = [c for c in caps if c not in supported]
    if bad:
        raise ValueError(f"--cpu-capability: {', '.join(bad)} not among the builds this CPU runs "
                         f"({', '.join(supported)})")
    if caps == [_active_capability()]:
        return fused
    return [n for f in fused for n in ([f"cpp-{c}" for c in caps] if f == "cpp" else [f])]


def _active_capability():
    try:
        return srnn_fast.cpu_capability()
    except Exception:  # not built: no CPU build runs
        return None


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


if __name__ == "__main__":
    sys.exit(main())
