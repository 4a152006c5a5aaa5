"""The "cuda" backend (csrc/scan_cuda.cu) against the reference: SPEC section 4 on CUDA tensors.

Skips without a GPU. Set SRNN_FAST_REQUIRE_CUDA=1 (bench/gpu_check.sh does) to fail instead
of skipping when a GPU is present but the extension was built without its CUDA kernels.

Paths: the persistent kernels hold W_rec in one block's shared memory (sm_90: float64
H <= 169, float32 H <= 240; sm_80: 143 and 203; `python -m srnn_fast.cuda_resources`);
larger H takes the stepwise path (GEMM per step plus a fused neuron kernel). The batch is
split into tiles of ceil(B / #SMs) rows, so a batch of several hundred rows spreads over
~100 blocks and exercises the cross-block sums. Tests that need one path ask the launcher's
planner (srnn_fast::cuda_launch_plan) that they get it.
"""
import os

import pytest
import torch

from scan_cases import (FLOAT32_TOL, case_id, check_compile_matches_eager, check_float32, check_float64, fused,
                        make_case, reference, rel_err)
import srnn_fast
from srnn_fast import BackendUnavailableError
from srnn_fast.scan import pack_spikes, resolve_backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Shared memory of the largest block on any current GPU (sm_90: 227 KB), so these widths
# take the stepwise path on every device.
LARGE_H = {torch.float64: 200, torch.float32: 260}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """The op fills its outputs with NaN (spike words with all bits set) before the kernels
    run: any element a kernel forgets to write fails the comparisons."""
    monkeypatch.setenv("SRNN_FAST_POISON", "1")


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    try:
        resolve_backend("cuda", torch.device("cuda"))
    except BackendUnavailableError as e:
        if os.environ.get("SRNN_FAST_REQUIRE_CUDA") == "1":
            pytest.fail(f"a GPU is present but the cuda backend is not: {e}")
        pytest.skip(f"cuda backend not built: {e}")


def launch_plan(B, H, dtype, forward=True):
    """(rows per block, threads, dynamic shared bytes) the launcher picks on this GPU for a
    persistent kernel; rows 0: the stepwise path. The kernels' static shared memory (none
    besides sm_90's 1 KB reservation) is left out here."""
    props = torch.cuda.get_device_properties(0)
    return tuple(torch.ops.srnn_fast.cuda_launch_plan(B, H, dtype == torch.float64, forward,
                                                      props.shared_memory_per_block_optin,
                                                      props.multi_processor_count))


def to_cuda(d):
    return {k: v.cuda() for k, v in d.items()}


def run_pair(T, B, H, dtype=torch.float64, seed=0, noncontiguous=False, **kw):
    """(fused on CUDA in `dtype`, float64 reference on the CPU) for the same inputs."""
    inputs, upstream = make_case(T, B, H, torch.float64, "cpu", seed, noncontiguous)
    ref = reference(inputs, upstream, **kw)
    x = to_cuda({k: v.to(dtype) for k, v in inputs.items()})  # .to keeps x_proj's strides
    assert x["x_proj"].is_contiguous() != noncontiguous
    return fused(x, to_cuda({k: v.to(dtype) for k, v in upstream.items()}), "cuda", **kw), ref


F64_CASES = [(1, 1, 1), (1, 3, 7), (17, 2, 33), (31, 5, 37), (13, 4, 64), (23, 3, 100), (8, 2, 160)]


@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
@pytest.mark.parametrize("T,B,H", F64_CASES, ids=[case_id(*c, torch.float64) for c in F64_CASES])
def test_float64_exact(T, B, H, neuron):
    for seed in (0, 1):
        got, ref = run_pair(T, B, H, seed=seed, neuron=neuron)
        check_float64(got, ref)


@pytest.mark.parametrize("surrogate", ["gaussian", "multi_gaussian"])
def test_float64_surrogates_noncontiguous(surrogate):
    got, ref = run_pair(19, 3, 45, seed=2, noncontiguous=True, surrogate=surrogate, dt=0.5, r_m=1.3)
    check_float64(got, ref)


@pytest.mark.parametrize("neuron", ["adaptive", "relu"])
def test_float64_large_h_stepwise(neuron):
    got, ref = run_pair(7, 3, LARGE_H[torch.float64], seed=3, neuron=neuron)
    check_float64(got, ref)


@pytest.mark.parametrize("H", [33, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
def test_many_blocks_deterministic(H):
    """~100+ blocks: the per-block tau-gradient partials must add up exactly, every time."""
    B = 700 if H < 100 else 300
    inputs, upstream = make_case(9, B, H, torch.float64, "cpu", seed=4)
    ref = reference(inputs, upstream)
    got = fused(to_cuda(inputs), to_cuda(upstream), "cuda")
    check_float64(got, ref)
    again = fused(to_cuda(inputs), to_cuda(upstream), "cuda")
    for k in ("grad_tau_m", "grad_tau_adp", "grad_x_proj"):
        assert torch.equal(got[k], again[k]), f"{k} differs between two identical runs"


@pytest.mark.parametrize("neuron", ["adaptive", "relu"])
@pytest.mark.parametrize("H", [37, 100, "smem"])
def test_several_rows_per_block(H, neuron):
    """B = 3 #SMs + 1: each block of the persistent kernels takes several batch rows; the
    spike words (binary) or values (relu) of each row live in their own slice of shared
    memory. "smem": the largest float64 H that still gets 2 rows, where shared memory, not
    the batch, sets the rows per block (the planner's trimming loop)."""
    B = 3 * torch.cuda.get_device_properties(0).multi_processor_count + 1
    if H == "smem":
        H = next(h for h in range(256, 0, -1)
                 if all(launch_plan(B, h, torch.float64, forward)[0] >= 2 for forward in (True, False)))
        assert launch_plan(B, H, torch.float64, True)[0] < 4  # fewer rows than the batch asks for
    for forward in (True, False):
        assert launch_plan(B, H, torch.float64, forward)[0] >= 2
    got, ref = run_pair(5, B, H, seed=11, neuron=neuron)
    check_float64(got, ref)


FP32_CASES = [(200, 8, 64), (300, 16, 36), (60, 4, LARGE_H[torch.float32])]


@pytest.mark.parametrize("T,B,H", FP32_CASES, ids=[case_id(*c, torch.float32) for c in FP32_CASES])
def test_float32_tolerances(T, B, H):
    got, ref = run_pair(T, B, H, torch.float32, seed=5)
    check_float32(got, ref)


@pytest.mark.parametrize("H", [48, LARGE_H[torch.float32]], ids=["persistent", "stepwise"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
def test_low_precision_x_proj(xdtype, H):
    """bf16/fp16 x_proj with float32 state, on both paths (each has its own bf16/fp16
    kernels): against the float64 reference on the same (rounded) inputs."""
    for forward in (True, False):
        assert (launch_plan(6, H, torch.float32, forward)[0] == 0) == (H == LARGE_H[torch.float32])
    inputs, upstream = make_case(40, 6, H, torch.float64, "cpu", seed=6)
    inputs["x_proj"] = inputs["x_proj"].to(xdtype).double()
    ref = reference(inputs, upstream)
    x = {k: v.float() for k, v in inputs.items()}
    x["x_proj"] = inputs["x_proj"].to(xdtype)
    got = fused(to_cuda(x), to_cuda({k: v.float() for k, v in upstream.items()}), "cuda")
    assert got["grad_x_proj"].dtype == xdtype
    assert got["s"].dtype == torch.float32
    # grad_x_proj is rounded to xdtype: up to half an ulp more than the float32 tolerance.
    bound = FLOAT32_TOL["grad_rel_err"] + torch.finfo(xdtype).eps / 2
    e = rel_err(got["grad_x_proj"], ref["grad_x_proj"])
    assert e <= bound, f"grad_x_proj: relative error {e:.2e} > {bound:.2e}"
    check_float32({**got, "grad_x_proj": ref["grad_x_proj"]}, ref)  # everything else at float32 tolerance


@pytest.mark.parametrize("binary", [True, False], ids=["spiking", "relu"])
@pytest.mark.parametrize("H", [37, LARGE_H[torch.float64]], ids=["persistent", "stepwise"])
def test_op_writes_every_output(H, binary):
    """Direct op calls (outputs poisoned): everything written, spike words equal to
    pack_spikes(s), and the inference path (save=False) computes the same."""
    T, B = 6, 3
    inputs, upstream = make_case(T, B, H, torch.float64, "cuda", seed=7)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    args = (inputs["x_proj"], inputs["w_rec"], alpha, rho, inputs["u0"], inputs["eta0"], inputs["s0"], binary,
            0.01, 1.8 if binary else 0.0, 1.0, 1.0)
    s, u_T, eta_T, u_seq, bits = torch.ops.srnn_fast.scan_fwd(*args, True)
    assert bits.shape == ((T, B, (H + 31) // 32) if binary else (0,))
    if binary:
        assert torch.equal(bits, pack_spikes(s))
    grads = torch.ops.srnn_fast.scan_bwd(upstream["s"], upstream["u"], upstream["eta"], inputs["w_rec"], alpha, rho,
                                         inputs["u0"], inputs["eta0"], inputs["s0"], u_seq, bits if binary else s,
                                         binary, 0, *args[8:], 0.5, 0.5)
    for t in (s, u_T, eta_T, u_seq) + tuple(grads):
        assert not torch.isnan(t).any()
    s2, u2, eta2, useq2, bits2 = torch.ops.srnn_fast.scan_fwd(*args, False)
    assert torch.equal(s2, s) and torch.equal(u2, u_T) and torch.equal(eta2, eta_T)
    assert useq2.numel() == 0 and bits2.numel() == 0


def fwd_args(T=4, B=2, H=5, dtype=torch.float32, device="cuda"):
    inputs, _ = make_case(T, B, H, dtype, device, seed=9)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    return [inputs["x_proj"], inputs["w_rec"], alpha, rho, inputs["u0"], inputs["eta0"], inputs["s0"],
            True, 0.01, 1.8, 1.0, 1.0, True]


def bwd_args(binary=True):
    fa = fwd_args()
    fa[7] = binary
    s, u_T, eta_T, u_seq, bits = torch.ops.srnn_fast.scan_fwd(*fa)
    return [torch.randn_like(s), torch.randn_like(u_T), torch.randn_like(eta_T), fa[1], fa[2], fa[3], fa[4], fa[5],
            fa[6], u_seq, bits if binary else s, binary, 1, 0.01, 1.8, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("binary", [True, False], ids=["spiking", "relu"])
def test_opcheck(binary):
    fa = fwd_args()
    fa[7] = binary
    torch.library.opcheck(torch.ops.srnn_fast.scan_fwd.default, tuple(fa))
    torch.library.opcheck(torch.ops.srnn_fast.scan_bwd.default, tuple(bwd_args(binary)))


def test_bad_input_raises_clear_errors():
    def fwd_with(i, value):
        a = fwd_args()
        a[i] = value
        return a

    a = fwd_args()
    bad = {
        "w_rec on the CPU": (fwd_with(1, a[1].cpu()), r"w_rec"),
        "alpha on the CPU": (fwd_with(2, a[2].cpu()), r"alpha must be on cuda"),
        "alpha shape": (fwd_with(2, a[2][:-1]), r"alpha must be \[H\] = \[5\]"),
        "u0 shape": (fwd_with(4, a[4].t()), r"u0 must be \[B, H\] = \[2, 5\]"),
        "x_proj rank": (fwd_with(0, a[0][0]), r"x_proj must be \[T, B, H\]"),
        "x_proj float64 with float32 w_rec": (fwd_with(0, a[0].double()), r"x_proj must have dtype"),
        "w_rec float16": (fwd_with(1, a[1].half()), r"w_rec must be float32 or float64"),
    }
    for name, (args, msg) in bad.items():
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.srnn_fast.scan_fwd(*args)
    # The public entry point catches the mixing before any kernel.
    with pytest.raises(ValueError, match=r"w_rec must be on cuda"):
        srnn_fast.srnn_scan(a[0], a[1].cpu(), a[2], a[3], backend="cuda")
    b = bwd_args()
    b[10] = b[10].float()  # spike bits must be int32
    with pytest.raises(RuntimeError, match=r"spikes \(spike bits\) must have dtype Int"):
        torch.ops.srnn_fast.scan_bwd(*b)
    b = bwd_args()
    b[12] = 5
    with pytest.raises(RuntimeError, match=r"surrogate must be 0"):
        torch.ops.srnn_fast.scan_bwd(*b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """Runs on the tensors' device, not the current one (device guard)."""
    inputs, upstream = make_case(6, 2, 20, torch.float64, "cpu", seed=10)
    moved = lambda d: {k: v.to("cuda:1") for k, v in d.items()}  # noqa: E731
    check_float64(fused(moved(inputs), moved(upstream), "cuda"), reference(inputs, upstream))


def test_compile_without_graph_breaks():
    """A model on the cuda backend compiles as one graph (fullgraph=True), forward and
    backward, and matches eager. aot_eager checks tracing and the fake kernels on CUDA
    tensors without inductor's compile time."""
    check_compile_matches_eager("cuda", "cuda")
