"""Shared machinery for checking a fused scan backend against the reference.

Every backend test (cpp, cuda, triton) builds cases with ``make_case`` and compares with
``check_float64`` / ``check_float32``, so all backends are held to one tolerance table.
"""
from __future__ import annotations

import os

import torch

from srnn_fast import SRNNState, srnn_scan
from srnn_fast._ops import cpu_build as cpu_capability  # runs a build of the CPU kernels inside a block
from srnn_fast.reference import srnn_scan_ref
# The tolerance table (float32 against float64; float64 to 1e-9 relative) lives in the
# package, where srnn_fast.check() holds every backend on a user's machine to the same one.
from srnn_fast.selfcheck import FLOAT32_TOL, FLOAT64_RTOL, rel_err

NAMES = ("x_proj", "w_rec", "tau_m", "tau_adp", "u0", "eta0", "s0")


def require_cpp() -> None:
    """Skips the calling test when the compiled extension did not load, so that no cpp check
    passes by comparing nothing; with SRNN_FAST_REQUIRE_CPP=1 (.ci/run sets it) it fails instead."""
    import pytest

    from srnn_fast import _ops

    if _ops.EXTENSION_ERROR is not None:
        why = f"the compiled extension srnn_fast._C did not load: {_ops.EXTENSION_ERROR}"
        if os.environ.get("SRNN_FAST_REQUIRE_CPP") == "1":
            pytest.fail(f"SRNN_FAST_REQUIRE_CPP=1 and {why}", pytrace=False)
        pytest.skip(why)


def cpu_capabilities() -> list:
    """The builds of the CPU kernels this machine can run (srnn_fast.cpu_capability()); the
    exactness and tolerance suites run every one of them. Never empty: without the extension
    the test skips or fails (require_cpp)."""
    require_cpp()
    from srnn_fast import _C

    supported = _C.supported_cpu_capabilities()
    assert supported, "srnn_fast._C offers no build of the CPU kernels"
    return supported


def check_each_cpu_capability(run_fn, check):
    """check(run_fn()) with run_fn run on each build of the CPU kernels; a failure names the
    build. The reference a check compares with is computed once, outside."""
    for name in cpu_capabilities():
        with cpu_capability(name):
            got = run_fn()
        try:
            check(got)
        except AssertionError as e:
            raise AssertionError(f"[cpu capability {name}] {e}") from None


def case_id(T, B, H, dtype, neuron="adaptive", surrogate="gaussian") -> str:
    return f"T{T}-B{B}-H{H}-{str(dtype).split('.')[-1].replace('float', 'fp')}-{neuron}-{surrogate}"


def make_case(T, B, H, dtype=torch.float64, device="cpu", seed=0, noncontiguous=False):
    """Fresh random inputs with a moderate firing rate (roughly 10-40 %), plus random
    upstream gradients for the outputs, all on ``device``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, lo=None, hi=None):
        t = torch.rand(*shape, generator=g, dtype=torch.float64) if lo is not None else \
            torch.randn(*shape, generator=g, dtype=torch.float64)
        if lo is not None:
            t = lo + (hi - lo) * t
        return t

    inputs = {
        "x_proj": rnd(T, B, H) * 1.5 + 0.4,
        "w_rec": rnd(H, H) * (0.6 / H ** 0.5),
        "tau_m": rnd(H, lo=5.0, hi=30.0),
        "tau_adp": rnd(H, lo=40.0, hi=200.0),
        "u0": rnd(B, H, lo=0.0, hi=1.0),
        "eta0": rnd(B, H, lo=0.0, hi=0.2),
        "s0": (rnd(B, H, lo=0.0, hi=1.0) < 0.3).double(),
    }
    upstream = {"s": rnd(T, B, H), "u": rnd(B, H), "eta": rnd(B, H), "s_T": rnd(B, H)}
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    inputs = {k: cast(v) for k, v in inputs.items()}
    if noncontiguous:  # same values, strided memory: [B, T, H] storage viewed as [T, B, H]
        inputs["x_proj"] = inputs["x_proj"].transpose(0, 1).contiguous().transpose(0, 1)
    return inputs, {k: cast(v) for k, v in upstream.items()}


def run(fn, inputs, upstream, **kw):
    """Forward + backward of ``fn`` (srnn_scan or srnn_scan_ref); returns a dict with the
    spikes, the final state and the gradient of every input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    if not inputs["x_proj"].is_contiguous():  # keep the caller's strides
        leaves["x_proj"] = inputs["x_proj"].detach().requires_grad_(True)
    state = SRNNState(leaves["u0"], leaves["eta0"], leaves["s0"])
    s, (u, eta, s_T) = fn(leaves["x_proj"], leaves["w_rec"], leaves["tau_m"], leaves["tau_adp"], state, **kw)
    loss = ((s * upstream["s"]).sum() + (u * upstream["u"]).sum() + (eta * upstream["eta"]).sum()
            + (s_T * upstream["s_T"]).sum())
    grads = torch.autograd.grad(loss, [leaves[k] for k in NAMES])
    out = {"s": s.detach(), "u": u.detach(), "eta": eta.detach(), "s_T": s_T.detach()}
    out.update({f"grad_{k}": g for k, g in zip(NAMES, grads)})
    return out


def reference(inputs, upstream, **kw):
    return run(srnn_scan_ref, inputs, upstream, **kw)


def fused(inputs, upstream, backend, **kw):
    return run(srnn_scan, inputs, upstream, backend=backend, **kw)


def check_float64(got: dict, ref: dict, rtol: float = FLOAT64_RTOL):
    """Exact spikes; every other output and gradient within rtol (element-wise, with an
    absolute floor of rtol times the tensor's largest magnitude). For "relu" (real-valued
    activations, whose W_rec sums may round differently) the active set is exact and the
    values are held to rtol like the rest."""
    active, active_ref = got["s"].cpu() != 0, ref["s"].cpu() != 0
    assert torch.equal(active, active_ref), \
        f"spikes differ at {int((active != active_ref).sum())} of {ref['s'].numel()} places"
    if bool(((ref["s"] == 0) | (ref["s"] == 1)).all()):
        assert torch.equal(got["s"].cpu(), ref["s"].cpu()), "spike values are not 0/1 like the reference's"
    for k, r in ref.items():
        g = got[k].cpu()
        assert not torch.isnan(g).any(), f"{k} has NaN (an unwritten output?)"
        assert g.shape == r.shape and g.dtype == r.dtype, f"{k}: {g.shape}/{g.dtype} vs {r.shape}/{r.dtype}"
        torch.testing.assert_close(g, r.cpu(), rtol=rtol, atol=rtol * float(r.abs().max().clamp_min(1e-30)),
                                   msg=lambda m, k=k: f"{k}: {m}")


def check_float32(got: dict, ref64: dict, tol: dict = FLOAT32_TOL):
    """A float32 run against the float64 reference on the same inputs."""
    for k, g in got.items():
        assert not torch.isnan(g).any(), f"{k} has NaN (an unwritten output?)"
    # Active sets: the spikes themselves for binary neurons, where s > 0 for "relu".
    mismatch = float(((got["s"].cpu() != 0) != (ref64["s"].cpu() != 0)).double().mean())
    assert mismatch <= tol["spike_mismatch_rate"], f"spike mismatch rate {mismatch:.2e}"
    binary = bool(((ref64["s"] == 0) | (ref64["s"] == 1)).all())
    for k in ("u", "eta") if binary else ("u", "eta", "s"):
        e = rel_err(got[k], ref64[k])
        assert e <= tol["state_rel_err"], f"{k}: relative error {e:.2e}"
    for k in (k for k in ref64 if k.startswith("grad_")):
        e = rel_err(got[k], ref64[k])
        assert e <= tol["grad_rel_err"], f"{k}: relative error {e:.2e}"


def check_float32_rounded_grad_x(got: dict, ref64: dict, x_dtype: torch.dtype, tol: dict = FLOAT32_TOL):
    """check_float32 for a run whose x_proj is float16 / bfloat16 (state in float32): its
    grad_x_proj comes back rounded to x_dtype, so it may be up to half an x_dtype ulp further
    off; everything else is held to the float32 tolerances."""
    assert got["grad_x_proj"].dtype == x_dtype, got["grad_x_proj"].dtype
    bound = tol["grad_rel_err"] + torch.finfo(x_dtype).eps / 2
    e = rel_err(got["grad_x_proj"], ref64["grad_x_proj"])
    assert e <= bound, f"grad_x_proj: relative error {e:.2e} > {bound:.2e}"
    check_float32({**got, "grad_x_proj": ref64["grad_x_proj"]}, ref64, tol)


def check_compile_matches_eager(backend: str, device: str):
    """A small AdaptiveSRNN on ``backend`` compiles as one graph (fullgraph=True fails on any
    break), forward and backward, and matches eager. aot_eager checks the tracing and the
    fake kernels without inductor's compile time."""
    from srnn_fast import AdaptiveSRNN

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = AdaptiveSRNN(3, [16], 4, backend=backend, decode="mean").double().to(device)
    x = torch.randn(20, 2, 3, dtype=torch.float64, device=device)
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def loss_and_grads(model):
        torch.manual_seed(1)  # the same random initial membrane in both runs
        loss = model(x).square().sum()
        return loss, torch.autograd.grad(loss, list(net.parameters()))

    eager = loss_and_grads(net)
    net.load_state_dict(state)
    compiled = loss_and_grads(torch.compile(net, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-12, atol=0)
    for g_c, g_e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(g_c, g_e, rtol=1e-10, atol=1e-14)


SUBNORMAL32 = 1e-39  # below float32's smallest normal number, 1.18e-38


def check_subnormals_flushed(run_fn, inputs, upstream):
    """The float32 CPU kernels count subnormals as zero (FlushSubnormals, cpu_isa.h): with every
    upstream gradient subnormal, every gradient is exactly zero (the reference's are not: its
    sums of many subnormal terms reach normal numbers) and the forward is unchanged; float64
    keeps subnormals. Neither the calling thread nor torch's worker threads are left flushing."""
    scale = lambda d, f, dtype: {k: None if v is None else (v * f).to(dtype) for k, v in d.items()}  # noqa: E731
    f32 = scale(inputs, 1.0, torch.float32)
    tiny32 = scale(upstream, SUBNORMAL32, torch.float32)
    assert all(0 < v.abs().max() < torch.finfo(torch.float32).tiny for v in tiny32.values())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        got = run_fn(f32, tiny32, "cpp")
        ref = run_fn(f32, tiny32, "reference")
        plain = run_fn(f32, scale(upstream, 1.0, torch.float32), "cpp")
        big = torch.full((1 << 20,), SUBNORMAL32)  # torch's mul runs it on both threads
        assert bool(((big * 1.0) != 0).all()) and (torch.tensor([SUBNORMAL32]) * 1.0).item() > 0
    finally:
        torch.set_num_threads(threads)
    grads = [k for k in got if k.startswith("grad_")]
    assert all(bool((got[k] == 0).all()) for k in grads), [k for k in grads if (got[k] != 0).any()]
    assert any(bool((ref[k] != 0).any()) for k in grads)
    assert all(torch.equal(got[k], plain[k]) for k in got if not k.startswith("grad_"))
    f64 = run_fn(scale(inputs, 1.0, torch.float64), scale(upstream, 1e-310, torch.float64), "cpp")
    assert any(bool((f64[k] != 0).any()) for k in grads)
