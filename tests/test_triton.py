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

from scan_cases import (FLOAT32_TOL, check_float32, check_float32_rounded_grad_x, check_float64, fused, make_case,
                        reference, rel_err, run)
from srnn_fast import cuda_resources
from srnn_fast import reference as reference_module
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


# (T, B, H): T = 1 and primes; H below one word, not a multiple of 32, two words (64: the
# float64 limit, ops.MAX_H); B = 1 and B = 17 (two programs).
F64_CASES = [(1, 2, 7), (13, 3, 33), (5, 17, 40), (7, 1, 64), (3, 2, 61)]


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


# float32 on a GPU: the interpreter computes the surrogate's exp and divisions with NumPy
# (correctly rounded), but compiled for a GPU, tl.exp in float32 is ex2.approx.f32 of
# x * log2(e) and "/" is div.full.f32. Each surrogate value then carries a relative error of
# about (2 + 1.2 |x|) ulp from the exp (the CUDA programming guide's bound for __expf, the
# same instruction) and 2 ulp from each division, x = -(v - mu)^2 / (2 sigma^2) the exponent,
# whose own rounding adds |x| times a few ulp. The forward has neither exp nor division
# (alpha and rho come from PyTorch), so only the gradients see it.
# test_gpu_float32_exp_fits_the_tolerance emulates that error at a bound above it on the
# float64 reference and checks it takes at most a tenth of FLOAT32_TOL's gradient budget: the
# shared table holds on a GPU with no extra allowance.
def gpu_float32_pdf_rel_err(exponent: torch.Tensor) -> torch.Tensor:
    return torch.finfo(torch.float32).eps * (8 + 4 * exponent.abs())


@needs_triton
@pytest.mark.parametrize("neuron,surrogate", [("adaptive", "gaussian"), ("adaptive", "multi_gaussian"),
                                              ("relu", "gaussian")])
def test_float32_against_float64(neuron, surrogate):
    """float32 kernels vs the float64 reference, held to the shared FLOAT32_TOL table (see
    gpu_float32_pdf_rel_err for why no GPU allowance is needed)."""
    got, ref = run_pair(60, 5, 48, dtype=torch.float32, seed=7, neuron=neuron, surrogate=surrogate)
    check_float32(got, ref)


@pytest.mark.parametrize("surrogate", ["gaussian", "multi_gaussian"])
def test_gpu_float32_exp_fits_the_tolerance(monkeypatch, surrogate):
    """The surrogate computed as a GPU's float32 does (every normal pdf value off by up to
    gpu_float32_pdf_rel_err, random sign) moves no gradient by more than a tenth of
    FLOAT32_TOL["grad_rel_err"]. Needs no triton: it bounds what the GPU adds to the kernels'
    error."""
    inputs, upstream = make_case(200, 8, 48, seed=13)
    exact = reference(inputs, upstream, surrogate=surrogate)
    g = torch.Generator().manual_seed(0)
    pdf = reference_module.normal_pdf

    def gpu_pdf(x, mu, sigma):
        bound = gpu_float32_pdf_rel_err((x - mu) ** 2 / (2.0 * sigma * sigma))
        return pdf(x, mu, sigma) * (1 + bound * (2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1))

    monkeypatch.setattr(reference_module, "normal_pdf", gpu_pdf)
    perturbed = reference(inputs, upstream, surrogate=surrogate)
    assert torch.equal(perturbed["s"], exact["s"])  # the forward does not use the surrogate
    worst = max(rel_err(perturbed[k], exact[k]) for k in exact if k.startswith("grad_"))
    assert 0 < worst <= FLOAT32_TOL["grad_rel_err"] / 10, worst


@needs_triton
@pytest.mark.parametrize("H", [97, 128])
def test_float32_up_to_the_h_limit(H):
    """The largest float32 tile (BLOCK_H 128, W^T 64 KB of shared memory): four spike words,
    a partial last one at 97."""
    assert H <= ops.MAX_H[torch.float32]
    got, ref = run_pair(9, 3, H, dtype=torch.float32, seed=H)
    check_float32(got, ref)


@needs_triton
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_input(x_dtype):
    """float16/bfloat16 x_proj with float32 state: the math runs in float32."""
    got, ref = run_pair(20, 3, 33, dtype=torch.float32, seed=8, x_dtype=x_dtype)
    check_float32_rounded_grad_x(got, ref, x_dtype)


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("past", ["limit", "256"])
def test_h_limit_is_a_clear_error(dtype, past):
    """Past ops.MAX_H (H up to 256 used to compile a tile too large for any GPU's shared
    memory, so a GPU raised triton's OutOfResources): a ValueError naming the limit."""
    H = ops.MAX_H[dtype] + 1 if past == "limit" else 256
    x = torch.zeros(1, 1, H, dtype=dtype, device=DEVICE)
    tau = torch.full((H,), 10.0, dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=f"H <= {ops.MAX_H[dtype]} for {dtype} .*H = {H}"):
        srnn_scan(x, torch.zeros(H, H, dtype=dtype, device=DEVICE), tau, tau, backend="triton")


@needs_triton
@pytest.mark.parametrize("kernel", ["scan_fwd_kernel", "scan_bwd_kernel"])
def test_out_of_resources_is_a_clear_error(monkeypatch, kernel):
    """A GPU with less shared memory per block than the kernels were sized for (sm_86/sm_89:
    99 KB): triton's OutOfResources, raised before anything runs, becomes the H-limit
    ValueError."""
    from triton.runtime.errors import OutOfResources

    class TooLarge:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(135168, 101376, "shared memory")
            return launch

    monkeypatch.setattr(ops, kernel, TooLarge())
    inputs, upstream = make_case(3, 2, 40, seed=14)
    x = {k: v.to(DEVICE) for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"cannot run H = 40 .* needs 135168 \(shared memory\), the GPU allows "
                                         r"101376"):
        run(lambda *a, **kw: srnn_scan(*a, backend="triton", **kw), x, {k: v.to(DEVICE) for k, v in upstream.items()})


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


needs_nvidia_compiler = pytest.mark.skipif(
    triton is None or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend")


@needs_nvidia_compiler
def test_kernels_compile_for_sm90():
    """The real compiler (no GPU needed) on the heaviest variant of each kernel and dtype at
    its largest BLOCK_H: it rejects code the interpreter accepts (e.g. non-constexpr
    globals), and compile_check fails on shared memory over the sm_90 limit or spills. CI's
    tier 2 runs every variant for sm_90 and sm_80."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "srnn_fast.triton_kernels.compile_check", "--arch", "90", "--quick"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("| sm_90 |") == len(list(compile_check.variants(quick=True))) == 4


@needs_nvidia_compiler
@pytest.mark.parametrize("arch,shared", [(90, 5000), (80, 6024)])
def test_compile_check_counts_static_shared_memory(monkeypatch, arch, shared):
    """Triton's dynamic shared memory plus the cubin's static shared memory, less the 1 KB
    every sm_90 cubin shows (the driver's reservation, outside the opt-in limit)."""
    from types import SimpleNamespace

    compiled = SimpleNamespace(asm={"cubin": b""}, metadata=SimpleNamespace(shared=5000, num_warps=4, num_stages=1))
    monkeypatch.setattr(compile_check, "compile_variant", lambda v, a: compiled)
    monkeypatch.setattr(compile_check, "resource_usage",
                        lambda path: [cuda_resources.Usage(0, "scan_fwd_kernel", 90, 16, 1024, 8)])
    (variant, *_) = compile_check.variants(quick=True)
    r = compile_check.measure(variant, arch)
    assert (r.shared, r.regs, r.spill) == (shared, 90, 24)


@needs_nvidia_compiler
@pytest.mark.parametrize("shared,spill", [(232449, 0), (1000, 8)], ids=["shared", "spill"])
def test_compile_check_fails_on_a_violation(monkeypatch, capsys, shared, spill):
    """compile_check exits non-zero when a variant needs more shared memory than the
    architecture allows or spills registers (measured numbers replaced, nothing compiled)."""
    def measure(v, arch):
        return compile_check.Result(v, arch, 4, 1, shared, 100, spill, 0.0)

    monkeypatch.setattr(compile_check, "measure", measure)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # main() refuses the interpreter; nothing compiles here
    with pytest.raises(SystemExit) as e:
        compile_check.main(["--arch", "90", "--quick"])
    problem = "shared memory 232449 > 232448" if shared > 1000 else "8 bytes of register spills"
    assert e.value.code not in (None, 0) and problem in str(e.value.code)
    assert capsys.readouterr().out.count(problem) == 4  # the table marks every row


@needs_triton
def test_auto_only_picks_triton_for_layers_it_takes():
    from srnn_fast.scan import _triton_fits
    from srnn_fast.triton_kernels.ops import MAX_H

    for dtype, limit in MAX_H.items():
        assert _triton_fits(torch.zeros(limit, limit, dtype=dtype))
        assert not _triton_fits(torch.zeros(limit + 1, limit + 1, dtype=dtype))
    assert not _triton_fits(torch.zeros(8, 8, dtype=torch.float16))
