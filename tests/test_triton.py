"""The "triton" backend (srnn_fast/triton_kernels) against the reference: SPEC section 4.

Runs on CUDA tensors where a GPU is present, else on CPU tensors through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported). The
interpreter is slow, so the shapes are small; they still cover T = 1, prime T, H not a
multiple of 32 (and below/above one 32-bit spike word), B = 1, B > one batch tile (16 rows,
so several programs and their partial tau-gradient sums), non-contiguous x_proj.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from scan_cases import FLOAT32_TOL, check_float32, check_float64, fused, make_case, reference, run
from srnn_fast import srnn_scan
from srnn_fast.reference import srnn_scan_ref
from srnn_fast.scan import pack_spikes, resolve_backend

try:
    import triton  # noqa: F401
except ImportError:
    triton = None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if triton is None:
    SKIP = "the triton backend needs triton (pip install triton)"
elif DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    SKIP = "no GPU, and TRITON_INTERPRET=1 was not set before triton was imported"
else:
    SKIP = None
    from srnn_fast.triton_kernels import compile_check, ops
needs_triton = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def run_pair(T, B, H, dtype=torch.float64, seed=0, noncontiguous=False, x_dtype=None, **kw):
    """(triton in ``dtype`` on DEVICE, float64 reference on the CPU) for the same inputs.
    ``x_dtype`` (float16/bfloat16) rounds x_proj first; the reference sees the rounded values."""
    inputs, upstream = make_case(T, B, H, torch.float64, "cpu", seed, noncontiguous)
    if x_dtype is not None:
        inputs["x_proj"] = inputs["x_proj"].to(x_dtype).double()
    ref = reference(inputs, upstream, **kw)
    x = {k: v.to(DEVICE, dtype) for k, v in inputs.items()}  # .to keeps x_proj's strides
    if x_dtype is not None:
        x["x_proj"] = x["x_proj"].to(x_dtype)
    assert x["x_proj"].is_contiguous() != noncontiguous
    return fused(x, {k: v.to(DEVICE, dtype) for k, v in upstream.items()}, "triton", **kw), ref


@needs_triton
def test_backend_resolves():
    assert resolve_backend("triton", torch.device(DEVICE)) == "triton"
    if DEVICE == "cpu":  # the interpreter is for tests: "auto" never picks it
        assert resolve_backend("auto", torch.device("cpu")) != "triton"


# (T, B, H): T = 1 and primes; H below one word, not a multiple of 32, over two words;
# B = 1 and B = 17 (two programs).
F64_CASES = [(1, 2, 7), (13, 3, 33), (5, 17, 40), (7, 1, 64), (3, 2, 97)]


@needs_triton
@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
@pytest.mark.parametrize("T,B,H", F64_CASES, ids=[f"T{T}-B{B}-H{H}" for T, B, H in F64_CASES])
def test_float64_exact(T, B, H, neuron):
    """Exact spikes and every output/gradient (incl. tau and initial state) to 1e-9."""
    got, ref = run_pair(T, B, H, seed=T + H, neuron=neuron)
    check_float64(got, ref)


@needs_triton
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("neuron", ["adaptive", "lif"])
def test_float64_multi_gaussian_noncontiguous(neuron, seed):
    got, ref = run_pair(11, 3, 37, seed=seed, noncontiguous=True, neuron=neuron, surrogate="multi_gaussian",
                        dt=0.5, r_m=1.3, b0=0.05, sigma=0.4, gamma=0.7)
    check_float64(got, ref)


@needs_triton
def test_float64_default_state():
    """state=None: the kernels start from u = 0, eta = b0, s = 0 like the reference."""
    inputs, upstream = make_case(6, 2, 20, seed=5)
    x = {k: v.to(DEVICE) for k, v in inputs.items()}
    args = ("x_proj", "w_rec", "tau_m", "tau_adp")
    leaves = [x[k].clone().requires_grad_(True) for k in args]
    leaves_ref = [inputs[k].clone().requires_grad_(True) for k in args]
    s, st = srnn_scan(*leaves, backend="triton")
    s_ref, st_ref = srnn_scan_ref(*leaves_ref)
    assert torch.equal(s.cpu(), s_ref)
    torch.testing.assert_close(st.u.cpu(), st_ref.u, rtol=1e-9, atol=1e-12)
    g = torch.autograd.grad((s * upstream["s"].to(DEVICE)).sum() + (st.u * upstream["u"].to(DEVICE)).sum(), leaves)
    g_ref = torch.autograd.grad((s_ref * upstream["s"]).sum() + (st_ref.u * upstream["u"]).sum(), leaves_ref)
    for name, a, b in zip(args, g, g_ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9 * float(b.abs().max()), msg=name)


@needs_triton
@pytest.mark.parametrize("neuron,surrogate", [("adaptive", "gaussian"), ("adaptive", "multi_gaussian"),
                                              ("relu", "gaussian")])
def test_float32_against_float64(neuron, surrogate):
    """float32 kernels vs the float64 reference, held to the shared FLOAT32_TOL table."""
    got, ref = run_pair(60, 5, 48, dtype=torch.float32, seed=7, neuron=neuron, surrogate=surrogate)
    check_float32(got, ref)


@needs_triton
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_input(x_dtype):
    """float16/bfloat16 x_proj with float32 state: the math runs in float32."""
    got, ref = run_pair(20, 3, 33, dtype=torch.float32, seed=8, x_dtype=x_dtype)
    assert got["grad_x_proj"].dtype == x_dtype
    check_float32(got, ref, dict(FLOAT32_TOL, grad_rel_err=5e-3))  # grad_x is rounded to x's dtype


@needs_triton
def test_inference_path_matches_training_path():
    """Without grad the kernel saves nothing, and computes the same spikes and state."""
    inputs, _ = make_case(9, 3, 33, seed=9)
    x = {k: v.to(DEVICE) for k, v in inputs.items()}
    state = (x["u0"], x["eta0"], x["s0"])
    with torch.no_grad():
        s0, st0 = srnn_scan(x["x_proj"], x["w_rec"], x["tau_m"], x["tau_adp"], state, backend="triton")
    x_proj = x["x_proj"].clone().requires_grad_(True)  # takes the autograd path, which saves
    s1, st1 = srnn_scan(x_proj, x["w_rec"], x["tau_m"], x["tau_adp"], state, backend="triton")
    assert s1.requires_grad
    for a, b in ((s0, s1), (st0.u, st1.u), (st0.eta, st1.eta)):
        assert torch.equal(a, b.detach())


@needs_triton
@pytest.mark.parametrize("neuron", ["adaptive", "relu"])
def test_poisoned_outputs_are_all_written(monkeypatch, neuron):
    """Every output and scratch buffer starts as NaN (-1 for spike words): an element a
    kernel does not write would show up as NaN or a wrong word."""
    monkeypatch.setattr(ops, "POISON_OUTPUTS", True)
    got, ref = run_pair(7, 17, 33, seed=10, neuron=neuron)  # two programs, a partial last word
    check_float64(got, ref)
    inputs, _ = make_case(7, 17, 33, seed=10)
    x = {k: v.to(DEVICE) for k, v in inputs.items()}
    alpha, rho = torch.exp(-1 / x["tau_m"]), torch.exp(-1 / x["tau_adp"])
    s, u_T, eta_T, u_seq, bits = ops.scan_fwd(x["x_proj"], x["w_rec"], alpha, rho, x["u0"], x["eta0"], x["s0"],
                                              neuron != "relu", 0.01, 1.8 if neuron == "adaptive" else 0.0,
                                              1.0, 1.0, True)
    assert not torch.isnan(u_seq).any() and torch.equal(u_seq[-1], u_T)
    if neuron == "relu":
        assert bits.numel() == 0
    else:
        assert torch.equal(bits, pack_spikes(s))


@needs_triton
def test_h_limit_is_a_clear_error():
    H = ops.MAX_H + 1
    x = torch.zeros(1, 1, H, dtype=torch.float64, device=DEVICE)
    tau = torch.full((H,), 10.0, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=f"H <= {ops.MAX_H}.*H = {H}"):
        srnn_scan(x, torch.zeros(H, H, dtype=torch.float64, device=DEVICE), tau, tau, backend="triton")


@needs_triton
def test_opcheck_custom_ops():
    """Schemas, fake (meta) implementations and dispatch of the two custom ops."""
    inputs, upstream = make_case(4, 3, 33, seed=11)
    x = {k: v.to(DEVICE) for k, v in inputs.items()}
    alpha, rho = torch.exp(-1 / x["tau_m"]), torch.exp(-1 / x["tau_adp"])
    state = (x["u0"], x["eta0"], x["s0"])
    fwd_args = (x["x_proj"], x["w_rec"], alpha, rho, *state, True, 0.01, 1.8, 1.0, 1.0, True)
    torch.library.opcheck(ops.scan_fwd, fwd_args)
    s, u_T, eta_T, u_seq, bits = ops.scan_fwd(*fwd_args)
    up = {k: v.to(DEVICE) for k, v in upstream.items()}
    torch.library.opcheck(ops.scan_bwd, (up["s"], up["u"], up["eta"], x["w_rec"], alpha, rho, *state, u_seq, bits,
                                         True, 1, 0.01, 1.8, 1.0, 1.0, 0.5, 0.5))


@needs_triton
def test_torch_compile_fullgraph():
    """srnn_scan(backend="triton") traces into one graph (custom ops with fake kernels).
    aot_eager checks the tracing and the fakes without inductor's long C++ compile on CPU."""
    inputs, upstream = make_case(5, 3, 33, seed=12)
    x = {k: v.to(DEVICE) for k, v in inputs.items()}
    compiled = torch.compile(lambda *a, **kw: srnn_scan(*a, backend="triton", **kw), backend="aot_eager",
                             fullgraph=True)
    got = run(compiled, x, {k: v.to(DEVICE) for k, v in upstream.items()})
    check_float64(got, reference(inputs, upstream))


def test_without_triton_the_package_imports_and_says_how_to_get_it():
    """triton is optional: with it hidden, srnn_fast imports, does not list "triton", and
    asking for it raises BackendUnavailableError with the install command."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, srnn_fast\n"
            "assert 'triton' not in srnn_fast.available_backends()\n"
            "try:\n"
            "    srnn_fast.srnn_scan(torch.zeros(1, 1, 2), torch.zeros(2, 2), torch.ones(2), torch.ones(2),"
            " backend='triton')\n"
            "except srnn_fast.BackendUnavailableError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install triton" in out.stdout


@pytest.mark.skipif(triton is None or importlib.util.find_spec("triton.backends.nvidia") is None,
                    reason="needs triton with its NVIDIA backend")
def test_kernels_compile_for_sm90():
    """The real compiler (no GPU needed) on the kernels the interpreter runs above: it
    rejects code the interpreter accepts (e.g. non-constexpr globals)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "srnn_fast.triton_kernels.compile_check", "--arch", "90"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("compiled in") == len(list(compile_check.variants()))
