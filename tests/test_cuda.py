"""The CUDA scan (csrc/scan_cuda_kernels.cuh, scan_cuda_host.h) against the reference: SPEC
section 4, on two targets.

- "cuda": the compiled kernels on a GPU. Skips without one; SRNN_FAST_REQUIRE_CUDA=1
  (bench/gpu_check.sh sets it) fails instead where a GPU is present but the extension was
  built without its CUDA kernels.
- "cuda_sim": the same host code and kernels, compiled by the host compiler and executed
  thread by thread on CPU tensors by the harness (srnn_fast/cuda_sim.py), every op under
  two thread schedules that must agree bit for bit. Always runs where it is built (Linux).
  Its emulated device is an H100 (132 SMs, 232448 B of shared memory per block) unless a
  test sets other limits.

Paths: the persistent kernels hold W_rec in one block's shared memory (sm_90: float64
H <= 169, float32 H <= 240; sm_80: 143 and 203; `python -m srnn_fast.cuda_resources`);
larger H takes the stepwise path (GEMM per step plus a fused neuron kernel). The batch is
split into tiles of ceil(B / #SMs) rows. Tests that need one path assert that the planner
(csrc/cuda_plan.h) picks it, and on cuda_sim that its kernels are the ones that ran.
"""
import os

import pytest
import torch

from scan_cases import (FLOAT32_TOL, case_id, check_compile_matches_eager, check_float32, check_float64, fused,
                        make_case, reference, rel_err)
import srnn_fast
from srnn_fast import BackendUnavailableError, cuda_sim
from srnn_fast.scan import kernels_for, pack_spikes, resolve_backend

# Shared memory of the largest block on any current GPU (sm_90: 227 KB), so these widths
# take the stepwise path on every device.
LARGE_H = {torch.float64: 200, torch.float32: 260}
# The largest H the persistent kernels take at sm_90's limit (cuda_resources.py checks it).
PERSISTENT_MAX_H = {torch.float64: 169, torch.float32: 240}


class Target:
    """Where the CUDA code runs: a GPU ("cuda") or the harness ("cuda_sim")."""

    def __init__(self, backend: str):
        self.backend = backend
        self.device = "cuda" if backend == "cuda" else "cpu"
        self.sim = backend == "cuda_sim"

    def __repr__(self):
        return self.backend

    @property
    def sms(self) -> int:
        return cuda_sim.device()["sms"] if self.sim else torch.cuda.get_device_properties(0).multi_processor_count

    def rows(self, B, H, dtype, forward=True) -> int:
        """Batch rows per block the planner gives a persistent kernel here; 0: stepwise."""
        if self.sim:
            return cuda_sim.plan(B, H, dtype, forward).rows
        props = torch.cuda.get_device_properties(0)
        return torch.ops.srnn_fast.cuda_launch_plan(B, H, dtype == torch.float64, forward,
                                                    props.shared_memory_per_block_optin,
                                                    props.multi_processor_count)[0]

    def expect_path(self, B, H, dtype, persistent: bool):
        """Asserts the planner's path for both directions; on cuda_sim clears the launch log
        for check_ran."""
        for forward in (True, False):
            assert (self.rows(B, H, dtype, forward) > 0) == persistent, (B, H, dtype, forward)
        if self.sim:
            cuda_sim.clear_launches()

    def check_ran(self, persistent: bool):
        """cuda_sim: the kernels of that path ran, those of the other did not."""
        if not self.sim:
            return
        ran = {launch.kernel.split("<")[0] for launch in cuda_sim.launches()}
        want = {"fwd_persistent_kernel", "bwd_persistent_kernel"} if persistent else \
            {"fwd_step_kernel", "bwd_step_kernel", "eta_kernel"}
        other = {"fwd_step_kernel", "bwd_step_kernel", "eta_kernel"} if persistent else \
            {"fwd_persistent_kernel", "bwd_persistent_kernel"}
        assert want <= ran and not (other & ran), ran

    def ops(self):
        return kernels_for(self.backend)


def _skip_reason(backend):
    if backend == "cuda_sim":
        return None if cuda_sim.SIM_ERROR is None else f"cuda_sim is not built: {cuda_sim.SIM_ERROR}"
    return None if torch.cuda.is_available() else "needs a CUDA GPU"


TARGETS = [pytest.param(b, id=b, marks=[pytest.mark.skipif(_skip_reason(b) is not None, reason=_skip_reason(b) or "")]
                        + ([pytest.mark.gpu] if b == "cuda" else []))
           for b in ("cuda", "cuda_sim")]


@pytest.fixture(params=TARGETS)
def target(request):
    t = Target(request.param)
    if t.backend == "cuda":
        try:
            resolve_backend("cuda", torch.device("cuda"))
        except BackendUnavailableError as e:
            if os.environ.get("SRNN_FAST_REQUIRE_CUDA") == "1":
                pytest.fail(f"a GPU is present but the cuda backend is not: {e}")
            pytest.skip(f"cuda backend not built: {e}")
    return t


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """The op fills its outputs with NaN (spike words with all bits set) before the kernels
    run: any element a kernel forgets to write fails the comparisons."""
    monkeypatch.setenv("SRNN_FAST_POISON", "1")


def on(target, d):
    return {k: v.to(target.device) for k, v in d.items()}  # .to keeps x_proj's strides


def run_pair(target, T, B, H, dtype=torch.float64, seed=0, noncontiguous=False, **kw):
    """(the CUDA code on `target` in `dtype`, float64 reference on the CPU) for the same inputs."""
    inputs, upstream = make_case(T, B, H, torch.float64, "cpu", seed, noncontiguous)
    ref = reference(inputs, upstream, **kw)
    x = on(target, {k: v.to(dtype) for k, v in inputs.items()})
    assert x["x_proj"].is_contiguous() != noncontiguous
    return fused(x, on(target, {k: v.to(dtype) for k, v in upstream.items()}), target.backend, **kw), ref


F64_CASES = [(1, 1, 1), (1, 3, 7), (17, 2, 33), (31, 5, 37), (13, 4, 64), (23, 3, 100), (8, 2, 160)]


@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
@pytest.mark.parametrize("T,B,H", F64_CASES, ids=[case_id(*c, torch.float64) for c in F64_CASES])
def test_float64_exact(target, T, B, H, neuron):
    for seed in (0, 1):
        got, ref = run_pair(target, T, B, H, seed=seed, neuron=neuron)
        check_float64(got, ref)


@pytest.mark.parametrize("surrogate", ["gaussian", "multi_gaussian"])
def test_float64_surrogates_noncontiguous(target, surrogate):
    got, ref = run_pair(target, 19, 3, 45, seed=2, noncontiguous=True, surrogate=surrogate, dt=0.5, r_m=1.3)
    check_float64(got, ref)


@pytest.mark.parametrize("neuron", ["adaptive", "relu"])
def test_float64_large_h_stepwise(target, neuron):
    H = LARGE_H[torch.float64]
    target.expect_path(3, H, torch.float64, persistent=False)
    got, ref = run_pair(target, 7, 3, H, seed=3, neuron=neuron)
    check_float64(got, ref)
    target.check_ran(persistent=False)


@pytest.mark.parametrize("H", [33, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
def test_many_blocks_deterministic(target, H):
    """~100+ blocks: the per-block tau-gradient partials must add up exactly, every time."""
    B = 700 if H < 100 else 300
    target.expect_path(B, H, torch.float64, persistent=H < 100)
    inputs, upstream = make_case(9, B, H, torch.float64, "cpu", seed=4)
    ref = reference(inputs, upstream)
    got = fused(on(target, inputs), on(target, upstream), target.backend)
    check_float64(got, ref)
    target.check_ran(persistent=H < 100)
    again = fused(on(target, inputs), on(target, upstream), target.backend)
    for k in ("grad_tau_m", "grad_tau_adp", "grad_x_proj"):
        assert torch.equal(got[k], again[k]), f"{k} differs between two identical runs"


def largest_h_with_rows(target, B, dtype, rows):
    """The largest H whose persistent launches (both directions) get at least `rows` rows."""
    return next(h for h in range(256, 0, -1) if all(target.rows(B, h, dtype, f) >= rows for f in (True, False)))


@pytest.mark.parametrize("neuron", ["adaptive", "relu"])
@pytest.mark.parametrize("H", [37, 100, "smem"])
def test_several_rows_per_block(target, H, neuron):
    """B = 3 #SMs + 1: each block of the persistent kernels takes several batch rows (and the
    last block fewer); the spike words (binary) or values (relu) of each row live in their
    own slice of shared memory. "smem": the largest float64 H that still gets 2 rows, where
    shared memory, not the batch, sets the rows per block (the planner's trimming loop)."""
    B = 3 * target.sms + 1
    if H == "smem":
        H = largest_h_with_rows(target, B, torch.float64, 2)
        assert target.rows(B, H, torch.float64) < 4  # fewer rows than the batch asks for
    for forward in (True, False):
        assert target.rows(B, H, torch.float64, forward) >= 2
    got, ref = run_pair(target, 5, B, H, seed=11, neuron=neuron)
    check_float64(got, ref)


FP32_CASES = [(200, 8, 64), (300, 16, 36), (60, 4, LARGE_H[torch.float32])]


@pytest.mark.parametrize("T,B,H", FP32_CASES, ids=[case_id(*c, torch.float32) for c in FP32_CASES])
def test_float32_tolerances(target, T, B, H):
    got, ref = run_pair(target, T, B, H, torch.float32, seed=5)
    check_float32(got, ref)


@pytest.mark.parametrize("H", [48, LARGE_H[torch.float32]], ids=["persistent", "stepwise"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_proj(target, xdtype, H):
    """bf16/fp16 x_proj with float32 state, on both paths (each has its own bf16/fp16
    kernels): against the float64 reference on the same (rounded) inputs."""
    persistent = H != LARGE_H[torch.float32]
    target.expect_path(6, H, torch.float32, persistent)
    inputs, upstream = make_case(40, 6, H, torch.float64, "cpu", seed=6)
    inputs["x_proj"] = inputs["x_proj"].to(xdtype).double()
    ref = reference(inputs, upstream)
    x = {k: v.float() for k, v in inputs.items()}
    x["x_proj"] = inputs["x_proj"].to(xdtype)
    got = fused(on(target, x), on(target, {k: v.float() for k, v in upstream.items()}), target.backend)
    target.check_ran(persistent)
    assert got["grad_x_proj"].dtype == xdtype
    assert got["s"].dtype == torch.float32
    # grad_x_proj is rounded to xdtype: up to half an ulp more than the float32 tolerance.
    bound = FLOAT32_TOL["grad_rel_err"] + torch.finfo(xdtype).eps / 2
    e = rel_err(got["grad_x_proj"], ref["grad_x_proj"])
    assert e <= bound, f"grad_x_proj: relative error {e:.2e} > {bound:.2e}"
    check_float32({**got, "grad_x_proj": ref["grad_x_proj"]}, ref)  # everything else at float32 tolerance


@pytest.mark.parametrize("binary", [True, False], ids=["spiking", "relu"])
@pytest.mark.parametrize("H", [37, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
def test_op_writes_every_output(target, H, binary):
    """Direct op calls (outputs poisoned): everything written, spike words equal to
    pack_spikes(s), and the inference path (save=False) computes the same."""
    T, B = 6, 3
    fwd, bwd = target.ops()
    inputs, upstream = make_case(T, B, H, torch.float64, target.device, seed=7)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    args = (inputs["x_proj"], inputs["w_rec"], alpha, rho, inputs["u0"], inputs["eta0"], inputs["s0"], binary,
            0.01, 1.8 if binary else 0.0, 1.0, 1.0)
    s, u_T, eta_T, u_seq, bits = fwd(*args, True)
    assert bits.shape == ((T, B, (H + 31) // 32) if binary else (0,))
    if binary:
        assert torch.equal(bits, pack_spikes(s))
    grads = bwd(upstream["s"], upstream["u"], upstream["eta"], inputs["w_rec"], alpha, rho, inputs["u0"],
                inputs["eta0"], inputs["s0"], u_seq, bits if binary else s, binary, 0, *args[8:], 0.5, 0.5)
    for t in (s, u_T, eta_T, u_seq) + tuple(grads):
        assert not torch.isnan(t).any()
    s2, u2, eta2, useq2, bits2 = fwd(*args, False)
    assert torch.equal(s2, s) and torch.equal(u2, u_T) and torch.equal(eta2, eta_T)
    assert useq2.numel() == 0 and bits2.numel() == 0


def fwd_args(device, T=4, B=2, H=5, dtype=torch.float32):
    inputs, _ = make_case(T, B, H, dtype, device, seed=9)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    return [inputs["x_proj"], inputs["w_rec"], alpha, rho, inputs["u0"], inputs["eta0"], inputs["s0"],
            True, 0.01, 1.8, 1.0, 1.0, True]


def bwd_args(target, binary=True):
    fa = fwd_args(target.device)
    fa[7] = binary
    s, u_T, eta_T, u_seq, bits = target.ops().fwd(*fa)
    return [torch.randn_like(s), torch.randn_like(u_T), torch.randn_like(eta_T), fa[1], fa[2], fa[3], fa[4], fa[5],
            fa[6], u_seq, bits if binary else s, binary, 1, 0.01, 1.8, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("binary", [True, False], ids=["spiking", "relu"])
def test_opcheck(target, binary):
    fwd, bwd = target.ops()
    fa = fwd_args(target.device)
    fa[7] = binary
    torch.library.opcheck(fwd.default, tuple(fa))
    torch.library.opcheck(bwd.default, tuple(bwd_args(target, binary)))


def test_bad_input_raises_clear_errors(target):
    fwd, bwd = target.ops()

    def fwd_with(i, value):
        a = fwd_args(target.device)
        a[i] = value
        return a

    a = fwd_args(target.device)
    bad = {
        "alpha shape": (fwd_with(2, a[2][:-1]), r"alpha must be \[H\] = \[5\]"),
        "u0 shape": (fwd_with(4, a[4].t()), r"u0 must be \[B, H\] = \[2, 5\]"),
        "x_proj rank": (fwd_with(0, a[0][0]), r"x_proj must be \[T, B, H\]"),
        "x_proj float64 with float32 w_rec": (fwd_with(0, a[0].double()), r"x_proj must have dtype"),
        "w_rec float16": (fwd_with(1, a[1].half()), r"w_rec must be float32 or float64"),
    }
    if not target.sim:  # the harness runs on CPU tensors: there is no other device to mix in
        bad["w_rec on the CPU"] = (fwd_with(1, a[1].cpu()), r"w_rec")
        bad["alpha on the CPU"] = (fwd_with(2, a[2].cpu()), r"alpha must be on cuda")
    for name, (args, msg) in bad.items():
        with pytest.raises(RuntimeError, match=msg):
            fwd(*args)
    if not target.sim:  # the public entry point catches the mixing before any kernel
        with pytest.raises(ValueError, match=r"w_rec must be on cuda"):
            srnn_fast.srnn_scan(a[0], a[1].cpu(), a[2], a[3], backend="cuda")
    b = bwd_args(target)
    b[10] = b[10].float()  # spike bits must be int32
    with pytest.raises(RuntimeError, match=r"spikes \(spike bits\) must have dtype Int"):
        bwd(*b)
    b = bwd_args(target)
    b[12] = 5
    with pytest.raises(RuntimeError, match=r"surrogate must be 0"):
        bwd(*b)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """Runs on the tensors' device, not the current one (device guard)."""
    inputs, upstream = make_case(6, 2, 20, torch.float64, "cpu", seed=10)
    moved = lambda d: {k: v.to("cuda:1") for k, v in d.items()}  # noqa: E731
    check_float64(fused(moved(inputs), moved(upstream), "cuda"), reference(inputs, upstream))


def test_compile_without_graph_breaks(target):
    """A model on the CUDA code compiles as one graph (fullgraph=True), forward and backward,
    and matches eager. aot_eager checks tracing and the fake kernels without inductor's
    compile time."""
    check_compile_matches_eager(target.backend, target.device)
