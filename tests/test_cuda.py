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
import warnings

import pytest
import torch

from scan_cases import (case_id, check_compile_matches_eager, check_float32, check_float32_rounded_grad_x,
                        check_float64, fused, make_case, reference)
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
    """(the CUDA code on `target` in `dtype`, float64 reference on the CPU) for the same inputs.

    float32: a near-threshold tie flips a spike in any float32 computation, the reference's
    own included, and the state then leaves float64's by more than FLOAT32_TOL allows (it is
    calibrated on cases without flips; B 200 x H 128 x T 24, seed 15, has one). So each
    float32 case is first shown to be one without: the float32 reference passes the table."""
    inputs, upstream = make_case(T, B, H, torch.float64, "cpu", seed, noncontiguous)
    ref = reference(inputs, upstream, **kw)
    if dtype == torch.float32:
        check_float32(reference({k: v.float() for k, v in inputs.items()},
                                {k: v.float() for k, v in upstream.items()}, **kw), ref)
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
    assert got["s"].dtype == torch.float32
    check_float32_rounded_grad_x(got, ref, xdtype)


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


def bwd_args(target, binary=True, H=5):
    fa = fwd_args(target.device, H=H)
    fa[7] = binary
    s, u_T, eta_T, u_seq, bits = target.ops().fwd(*fa)
    return [torch.randn_like(s), torch.randn_like(u_T), torch.randn_like(eta_T), fa[1], fa[2], fa[3], fa[4], fa[5],
            fa[6], u_seq, bits if binary else s, binary, 1, 0.01, 1.8, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("H", [5, LARGE_H[torch.float32]], ids=["persistent", "stepwise"])
def test_op_on_inputs_that_require_grad(target, H):
    """The ops called directly on tensors that require grad (as a user or opcheck may): the
    stepwise path's GEMMs (at::mm_out) refused them ("functions with out=... arguments don't
    support automatic differentiation") until the host code ran below autograd. Found by
    cuda_sim."""
    fwd, bwd = target.ops()
    fa = fwd_args(target.device, H=H)
    fa[1] = fa[1].detach().requires_grad_(True)
    want = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in fa])
    with warnings.catch_warnings():  # torch warns (once) that the op has no autograd kernel
        warnings.simplefilter("ignore")
        got = fwd(*fa)
    assert all(torch.equal(a.detach(), b) for a, b in zip(got, want))
    ba = bwd_args(target, True, H)
    ba[3] = ba[3].detach().requires_grad_(True)
    want = bwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in ba])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = bwd(*ba)
    assert all(torch.equal(a.detach(), b) for a, b in zip(got, want))


@pytest.mark.parametrize("H", [5, LARGE_H[torch.float32]], ids=["persistent", "stepwise"])
@pytest.mark.parametrize("binary", [True, False], ids=["spiking", "relu"])
def test_opcheck(target, binary, H):
    fwd, bwd = target.ops()
    fa = fwd_args(target.device, H=H)
    fa[7] = binary
    torch.library.opcheck(fwd.default, tuple(fa))
    torch.library.opcheck(bwd.default, tuple(bwd_args(target, binary, H)))


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


# ---------------------------------------------------------------------------------------
# What training runs (issue 50): non-default neuron scalars, every neuron and surrogate in
# float32, several rows per block, the training shapes, the stepwise path, initial states.
# ---------------------------------------------------------------------------------------
SCALARS = dict(b0=0.05, sigma=0.35, gamma=0.8, dt=0.7, r_m=1.2)


@pytest.mark.parametrize("H", [40, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
@pytest.mark.parametrize("neuron,surrogate", [("adaptive", "gaussian"), ("adaptive", "multi_gaussian"),
                                              ("lif", "multi_gaussian"), ("relu", "gaussian")])
def test_float64_non_default_scalars(target, neuron, surrogate, H):
    """b0, beta, sigma, gamma, dt, r_m away from their defaults: a kernel that hard-codes any
    of them fails (each changes the reference's outputs or gradients on these inputs)."""
    kw = dict(SCALARS, beta=1.3) if neuron == "adaptive" else dict(SCALARS)
    target.expect_path(4, H, torch.float64, persistent=H == 40)
    got, ref = run_pair(target, 15, 4, H, seed=12, neuron=neuron, surrogate=surrogate, **kw)
    check_float64(got, ref)
    target.check_ran(persistent=H == 40)


def test_non_default_scalars_change_the_reference():
    """The scalars of test_float64_non_default_scalars, one at a time back at its default,
    each change some output or gradient: none of them goes unchecked."""
    inputs, upstream = make_case(15, 4, 40, torch.float64, "cpu", seed=12)
    full = dict(SCALARS, beta=1.3, surrogate="multi_gaussian")
    ref = reference(inputs, upstream, **full)
    defaults = dict(b0=0.01, sigma=0.5, gamma=0.5, dt=1.0, r_m=1.0, beta=1.8)
    for name, default in defaults.items():
        other = reference(inputs, upstream, **dict(full, **{name: default}))
        assert any(not torch.equal(ref[k], other[k]) for k in ref), name


@pytest.mark.parametrize("H", [64, LARGE_H[torch.float32]], ids=["persistent", "stepwise"])
@pytest.mark.parametrize("neuron,surrogate", [("lif", "gaussian"), ("relu", "gaussian"),
                                              ("adaptive", "multi_gaussian"), ("lif", "multi_gaussian")])
def test_float32_neurons_and_surrogates(target, neuron, surrogate, H):
    got, ref = run_pair(target, 80, 5, H, torch.float32, seed=13, neuron=neuron, surrogate=surrogate)
    check_float32(got, ref)


@pytest.mark.parametrize("neuron", ["adaptive", "relu"])
def test_float32_several_rows_per_block(target, neuron):
    """float32 spike words and values of several rows in one block's shared memory."""
    B, H = 3 * target.sms + 1, 48
    assert target.rows(B, H, torch.float32, True) >= 4 and target.rows(B, H, torch.float32, False) >= 4
    got, ref = run_pair(target, 40, B, H, torch.float32, seed=14, neuron=neuron)
    check_float32(got, ref)


@pytest.mark.parametrize("H", [100, 128])
def test_float32_training_shape_two_rows_per_block(target, H):
    """The S-MNIST / SHD training shapes: B 200 at H 100-128, which an H100 (132 SMs) runs at
    two rows per block, so ~100 blocks each sum two rows' tau gradients."""
    B = 200
    if target.sim or 100 <= target.sms < 200:
        assert target.rows(B, H, torch.float32, True) == 2 and target.rows(B, H, torch.float32, False) == 2
    got, ref = run_pair(target, 16, B, H, torch.float32, seed=15)
    check_float32(got, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_persistent_limit_and_one_past(target, dtype):
    """The largest H the persistent kernels take (shared memory for W_rec and one row, sm_90)
    and one past it (stepwise), at a training batch."""
    H = PERSISTENT_MAX_H[dtype]
    if target.sim:
        for forward in (True, False):
            assert target.rows(200, H, dtype, forward) == 1 and target.rows(1, H + 1, dtype, forward) == 0
    for h, B, T in ((H, 200 if dtype == torch.float32 else 40, 12), (H + 1, 3, 5)):
        target.expect_path(B, h, dtype, persistent=target.rows(B, h, dtype) > 0)
        got, ref = run_pair(target, T, B, h, dtype, seed=16)
        (check_float64 if dtype == torch.float64 else check_float32)(got, ref)


STEPWISE_CASES = [(1, 1, "lif", "multi_gaussian"), (1, 3, "adaptive", "gaussian"), (9, 1, "lif", "gaussian"),
                  (6, 2, "adaptive", "multi_gaussian"), (5, 2, "relu", "gaussian")]


@pytest.mark.parametrize("T,B,neuron,surrogate", STEPWISE_CASES,
                         ids=[f"T{t}-B{b}-{n}-{s}" for t, b, n, s in STEPWISE_CASES])
def test_stepwise_training_cases(target, T, B, neuron, surrogate):
    H = LARGE_H[torch.float64]
    target.expect_path(B, H, torch.float64, persistent=False)
    got, ref = run_pair(target, T, B, H, seed=17, neuron=neuron, surrogate=surrogate)
    check_float64(got, ref)
    target.check_ran(persistent=False)


@pytest.mark.parametrize("H", [37, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
@pytest.mark.parametrize("neuron", ["adaptive", "relu"])
def test_non_binary_initial_spikes(target, neuron, H):
    """s_0 is user state and may be any real value: the persistent kernel's first step sums
    it densely (later steps add the W^T rows of spiking neurons only)."""
    inputs, upstream = make_case(8, 3, H, torch.float64, "cpu", seed=18)
    inputs["s0"] = torch.rand(3, H, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    ref = reference(inputs, upstream, neuron=neuron)
    check_float64(fused(on(target, inputs), on(target, upstream), target.backend, neuron=neuron), ref)


@pytest.mark.parametrize("H", [37, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
def test_default_state(target, H):
    """state=None: the kernels start from u = 0, eta = b0, s = 0 like the reference."""
    inputs, upstream = make_case(6, 2, H, torch.float64, "cpu", seed=19)
    names = ("x_proj", "w_rec", "tau_m", "tau_adp")
    leaves = [inputs[k].to(target.device).requires_grad_(True) for k in names]
    leaves_ref = [inputs[k].clone().requires_grad_(True) for k in names]
    s, st = srnn_fast.srnn_scan(*leaves, backend=target.backend, b0=0.03)
    s_ref, st_ref = srnn_fast.reference.srnn_scan_ref(*leaves_ref, b0=0.03)
    assert torch.equal(s.cpu(), s_ref)
    for a, b in zip(st, st_ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
    loss = lambda s, st, dev: (s * upstream["s"].to(dev)).sum() + (st.u * upstream["u"].to(dev)).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(s, st, target.device), leaves)
    grads_ref = torch.autograd.grad(loss(s_ref, st_ref, "cpu"), leaves_ref)
    for name, a, b in zip(names, grads, grads_ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9 * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("H", [37, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
def test_frozen_time_constants(target, H):
    """need_grad_tau off (train_tau="none"): the op returns [0] tau gradients, the others are
    those of the reference; on: the op returns them."""
    inputs, upstream = make_case(7, 3, H, torch.float64, "cpu", seed=20)
    ref = reference(inputs, upstream)
    leaves = {k: v.to(target.device, copy=True).requires_grad_(k not in ("tau_m", "tau_adp"))
              for k, v in inputs.items()}
    s, (u, eta, s_T) = srnn_fast.srnn_scan(leaves["x_proj"], leaves["w_rec"], leaves["tau_m"], leaves["tau_adp"],
                                           srnn_fast.SRNNState(leaves["u0"], leaves["eta0"], leaves["s0"]),
                                           backend=target.backend)
    loss = sum((a * upstream[k].to(target.device)).sum() for k, a in (("s", s), ("u", u), ("eta", eta),
                                                                        ("s_T", s_T)))
    names = ("x_proj", "w_rec", "u0", "eta0", "s0")
    for k, g in zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])):
        r = ref[f"grad_{k}"]
        torch.testing.assert_close(g.cpu(), r, rtol=1e-9, atol=1e-9 * float(r.abs().max()), msg=k)
    fwd, bwd = target.ops()
    x = {k: v.to(target.device) for k, v in inputs.items()}
    alpha, rho = torch.exp(-1 / x["tau_m"]), torch.exp(-1 / x["tau_adp"])
    _, _, _, u_seq, bits = fwd(x["x_proj"], x["w_rec"], alpha, rho, x["u0"], x["eta0"], x["s0"], True, 0.01, 1.8,
                               1.0, 1.0, True)
    args = (upstream["s"], upstream["u"], upstream["eta"], x["w_rec"], alpha, rho, x["u0"], x["eta0"], x["s0"],
            u_seq, bits, True, 0, 0.01, 1.8, 1.0, 1.0, 0.5, 0.5)
    off, on_ = bwd(*[a.to(target.device) if isinstance(a, torch.Tensor) else a for a in args], False), \
        bwd(*[a.to(target.device) if isinstance(a, torch.Tensor) else a for a in args], True)
    assert off[1].numel() == 0 and off[2].numel() == 0 and on_[1].shape == (H,)
    for a, b in zip(off[:1] + off[3:], on_[:1] + on_[3:]):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# The layer and the network on the CUDA code (projection GEMM + the scan), and inference.
# ---------------------------------------------------------------------------------------
def test_layer_matches_reference(target):
    """srnn_layer (input projection, scan, a given state) and every gradient, float64."""
    from srnn_fast.layer import srnn_layer

    g = torch.Generator().manual_seed(21)
    T, B, I, H = 9, 4, 6, 45
    tensors = dict(x=torch.randn(T, B, I, generator=g), w_in=torch.randn(H, I, generator=g) * 0.6,
                   bias=torch.randn(H, generator=g) * 0.1, w_rec=torch.randn(H, H, generator=g) / H ** 0.5,
                   tau_m=torch.rand(H, generator=g) * 20 + 5, tau_adp=torch.rand(H, generator=g) * 100 + 50,
                   u0=torch.rand(B, H, generator=g), eta0=torch.rand(B, H, generator=g) * 0.1,
                   s0=(torch.rand(B, H, generator=g) < 0.3).double())
    upstream = torch.randn(T, B, H, generator=g, dtype=torch.float64)

    def run(backend, device):
        leaves = {k: v.double().to(device).requires_grad_(True) for k, v in tensors.items()}
        s, (u, eta, _) = srnn_layer(leaves["x"], leaves["w_in"], leaves["bias"], leaves["w_rec"], leaves["tau_m"],
                                    leaves["tau_adp"], (leaves["u0"], leaves["eta0"], leaves["s0"]),
                                    surrogate="multi_gaussian", backend=backend)
        loss = (s * upstream.to(device)).sum() + u.square().sum() + eta.sum()
        return [s, u, eta] + list(torch.autograd.grad(loss, list(leaves.values())))

    got, ref = run(target.backend, target.device), run("reference", "cpu")
    assert torch.equal(got[0].cpu(), ref[0])
    for name, a, b in zip(["s", "u", "eta"] + [f"grad_{k}" for k in tensors], got, ref):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-9 * float(b.abs().max()),
                                   msg=name)


def test_network_matches_reference(target):
    """AdaptiveSRNN (two recurrent layers, integrator readout), forward and backward."""
    from srnn_fast import AdaptiveSRNN

    def run(backend, device):
        torch.manual_seed(22)
        net = AdaptiveSRNN(5, [24, 40], 3, backend=backend, decode="mean").double().to(device)
        x = torch.randn(12, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
        torch.manual_seed(23)  # the same random initial membranes in both runs
        out = net(x)
        return [out] + list(torch.autograd.grad(out.square().sum(), list(net.parameters())))

    for a, b in zip(run(target.backend, target.device), run("reference", "cpu")):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("H", [37, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
def test_inference_path_matches_reference(target, H):
    """Without grad the op saves nothing (save=False): its spikes and state against the
    reference."""
    inputs, _ = make_case(9, 3, H, torch.float64, "cpu", seed=24)
    x = on(target, inputs)
    with torch.no_grad():
        s, st = srnn_fast.srnn_scan(x["x_proj"], x["w_rec"], x["tau_m"], x["tau_adp"], (x["u0"], x["eta0"], x["s0"]),
                                    backend=target.backend)
    s_ref, st_ref = srnn_fast.reference.srnn_scan_ref(inputs["x_proj"], inputs["w_rec"], inputs["tau_m"],
                                                      inputs["tau_adp"], (inputs["u0"], inputs["eta0"], inputs["s0"]))
    assert torch.equal(s.cpu(), s_ref)
    for a, b in zip(st, st_ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)
