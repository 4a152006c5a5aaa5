"""The "cpp" backend (csrc/scan_cpu.cpp) against the reference: SPEC section 4 on the CPU,
on every build of the CPU kernels this machine runs (avx512, avx2, default; cpu_isa.h).

Every test here runs with SRNN_FAST_POISON=1, so the op fills its outputs with NaN (spike
words with all bits set) before the kernels write them: an element a kernel forgets to
write shows up as NaN, or as a spurious spike, and fails check_float64 / check_float32.
"""
import pytest
import torch

from scan_cases import (check_each_cpu_capability, check_float32, check_float32_rounded_grad_x, check_float64,
                        check_subnormals_flushed, fused, make_case, reference)

NEURONS = ["adaptive", "lif", "relu"]
SURROGATES = ["gaussian", "multi_gaussian"]
# T = 1, prime T, B = 1, H not a multiple of 8/16/32 (and one that is, plus one above 32).
F64_CASES = [(1, 1, 1), (1, 3, 7), (2, 1, 33), (17, 2, 37), (31, 5, 13), (13, 4, 64), (23, 3, 100)]


pytestmark = pytest.mark.usefixtures("cpp_extension")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setenv("SRNN_FAST_POISON", "1")


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("neuron", NEURONS)
@pytest.mark.parametrize("T,B,H", F64_CASES, ids=[f"T{T}-B{B}-H{H}-fp64" for T, B, H in F64_CASES])
def test_float64_matches_reference(T, B, H, neuron, surrogate):
    for seed in (0, 1, 2):
        inputs, upstream = make_case(T, B, H, seed=seed, noncontiguous=seed == 1)
        kw = dict(neuron=neuron, surrogate=surrogate)
        ref = reference(inputs, upstream, **kw)
        check_each_cpu_capability(lambda: fused(inputs, upstream, "cpp", **kw), lambda got: check_float64(got, ref))


@pytest.mark.parametrize("neuron", NEURONS)
def test_float64_other_scalars(neuron):
    """Non-default b0, beta, dt, r_m, sigma, gamma reach every term."""
    inputs, upstream = make_case(19, 3, 29, seed=3)
    kw = dict(neuron=neuron, b0=0.05, beta=0.7, dt=0.5, r_m=1.7, sigma=0.3, gamma=0.8,
              surrogate="multi_gaussian")
    ref = reference(inputs, upstream, **kw)
    check_each_cpu_capability(lambda: fused(inputs, upstream, "cpp", **kw), lambda got: check_float64(got, ref))


def test_float64_real_valued_initial_spikes():
    """s0 is user state and may be any real value; the first step multiplies by it."""
    inputs, upstream = make_case(11, 4, 21, seed=4)
    inputs["s0"] = torch.rand(4, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 0.5
    ref = reference(inputs, upstream)
    check_each_cpu_capability(lambda: fused(inputs, upstream, "cpp"), lambda got: check_float64(got, ref))


def test_float64_default_state():
    """No state given: the default u = 0, eta = b0, s = 0 (no initial-state gradients)."""
    inputs, _ = make_case(29, 3, 19, seed=5)
    args = [inputs[k].clone().requires_grad_(True) for k in ("x_proj", "w_rec", "tau_m", "tau_adp")]
    from srnn_fast import srnn_scan
    from srnn_fast.reference import srnn_scan_ref

    outs = []
    for fn, kw in ((srnn_scan, {"backend": "cpp"}), (srnn_scan_ref, {})):
        s, (u, eta, s_T) = fn(*args, **kw)
        grads = torch.autograd.grad((s * torch.linspace(-1, 1, s.shape[-1], dtype=s.dtype)).sum()
                                    + u.sum() + eta.sum(), args)
        outs.append((s, u, eta, *grads))
    assert torch.equal(outs[0][0], outs[1][0])
    for got, ref in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


# float32 against the float64 reference on the same inputs: long enough for near-threshold
# ties to flip spikes, which is what FLOAT32_TOL bounds.
F32_CASES = [(200, 4, 37), (97, 8, 128)]


@pytest.mark.parametrize("neuron", NEURONS)
@pytest.mark.parametrize("T,B,H", F32_CASES, ids=[f"T{T}-B{B}-H{H}-fp32" for T, B, H in F32_CASES])
def test_float32_against_float64(T, B, H, neuron):
    inputs, upstream = make_case(T, B, H, seed=7)
    ref = reference(inputs, upstream, neuron=neuron)
    f32 = lambda d: {k: v.float() for k, v in d.items()}  # noqa: E731
    check_each_cpu_capability(lambda: fused(f32(inputs), f32(upstream), "cpp", neuron=neuron),
                              lambda got: check_float32(got, ref))


def test_low_precision_input():
    """bfloat16 x_proj with float32 state, against the float64 reference on the same (rounded)
    inputs: every output at the float32 tolerances, grad_x_proj (rounded to bfloat16) up to
    half a bfloat16 ulp more."""
    inputs, upstream = make_case(40, 3, 24, seed=8)
    inputs["x_proj"] = inputs["x_proj"].bfloat16().double()
    ref = reference(inputs, upstream)
    x = {k: v.float() for k, v in inputs.items()}
    x["x_proj"] = inputs["x_proj"].bfloat16()
    f32_upstream = {k: v.float() for k, v in upstream.items()}
    check_each_cpu_capability(lambda: fused(x, f32_upstream, "cpp"),
                              lambda got: check_float32_rounded_grad_x(got, ref, torch.bfloat16))


def test_float32_kernels_flush_subnormals():
    inputs, upstream = make_case(40, 4, 20, seed=12)
    check_each_cpu_capability(lambda: check_subnormals_flushed(fused, inputs, upstream), lambda _: None)


def test_deterministic_across_thread_counts():
    """Per-neuron gradients are reduced in a fixed order: bitwise equal for 1 and 2 threads."""
    inputs, upstream = make_case(37, 9, 45, dtype=torch.float32, seed=9)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(fused(inputs, upstream, "cpp"))
    finally:
        torch.set_num_threads(threads)
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


@pytest.mark.parametrize("binary", [True, False])
def test_op_writes_every_output(binary):
    """Direct op calls with poisoned outputs: nothing left unwritten, and the same bits as
    an unpoisoned call."""
    T, B, H = 9, 3, 70
    inputs, upstream = make_case(T, B, H, dtype=torch.float32, seed=10)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    args = (inputs["x_proj"], inputs["w_rec"], alpha, rho, inputs["u0"], inputs["eta0"], inputs["s0"], binary,
            0.01, 1.8 if binary else 0.0, 1.0, 1.0)
    outs = torch.ops.srnn_fast.scan_fwd(*args, True)
    s, u_T, eta_T, u_seq, bits = outs
    assert bits.shape == ((T, B, 3) if binary else (0,))
    spikes = bits if binary else s
    grads = torch.ops.srnn_fast.scan_bwd(upstream["s"], upstream["u"], upstream["eta"], inputs["w_rec"], alpha, rho,
                                         inputs["u0"], inputs["eta0"], inputs["s0"], u_seq, spikes, binary, 1,
                                         *args[8:], 0.5, 0.5)
    for t in outs[:4] + grads:
        assert not torch.isnan(t).any()
    if binary:
        from srnn_fast.scan import pack_spikes
        assert torch.equal(bits, pack_spikes(s))
    import os
    os.environ.pop("SRNN_FAST_POISON")  # restored by monkeypatch
    for got, ref in zip(outs, torch.ops.srnn_fast.scan_fwd(*args, True)):
        assert torch.equal(got, ref)
