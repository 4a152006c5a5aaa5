"""The fused layer ops (srnn_fast::layer_fwd / layer_bwd, CPU): input projection and
recurrence in one kernel, checkpointed backward. Held to the scan's rules (spec section 4)
against the reference path F.linear + srnn_scan_ref, on every build of the CPU kernels this
machine runs, with sparse inputs (projection summed in the kernel) and dense ones (one GEMM;
kDenseInput in csrc/layer_cpu.cpp: more than 25 % nonzero in 16 steps spread over the sequence)."""
import pytest
import torch

from srnn_fast import SRNNState, srnn_scan
from srnn_fast.layer import CKPT_EVERY, srnn_layer
from scan_cases import (FLOAT32_TOL, check_each_cpu_capability, check_float32, check_float64, check_subnormals_flushed,
                        cpu_capabilities, cpu_capability)


pytestmark = pytest.mark.usefixtures("cpp_extension")


NAMES = ("x", "w_in", "bias", "w_rec", "tau_m", "tau_adp", "u0", "eta0", "s0")


def make_layer_case(T, B, I, H, dtype=torch.float64, seed=0, density=0.3, bias=True):
    """Inputs with exact zeros (spike-like, ``density`` nonzero, some analog values) and a
    moderate firing rate; upstream gradients for every output."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    uni = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = (uni(0, 1, T, B, I) < density).double() * uni(0.5, 2.0, T, B, I)
    inputs = {
        "x": x, "w_in": rnd(H, I) * (1.5 / I ** 0.5), "bias": rnd(H) * 0.1 + 0.3,
        "w_rec": rnd(H, H) * (0.6 / H ** 0.5), "tau_m": uni(5, 30, H), "tau_adp": uni(40, 200, H),
        "u0": uni(0, 1, B, H), "eta0": uni(0, 0.2, B, H), "s0": (uni(0, 1, B, H) < 0.3).double(),
    }
    if not bias:
        inputs["bias"] = None
    upstream = {"s": rnd(T, B, H), "u": rnd(B, H), "eta": rnd(B, H), "s_T": rnd(B, H)}
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return {k: cast(v) for k, v in inputs.items()}, {k: cast(v) for k, v in upstream.items()}


def run_layer(inputs, upstream, backend, x_grad=True, noncontiguous=False, **kw):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k != "x" or x_grad)
              for k, v in inputs.items()}
    if noncontiguous:  # same values, [B, T, I] storage viewed as [T, B, I]
        leaves["x"] = inputs["x"].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(x_grad)
    state = SRNNState(leaves["u0"], leaves["eta0"], leaves["s0"])
    s, (u, eta, s_T) = srnn_layer(leaves["x"], leaves["w_in"], leaves["bias"], leaves["w_rec"], leaves["tau_m"],
                                  leaves["tau_adp"], state, backend=backend, **kw)
    loss = ((s * upstream["s"]).sum() + (u * upstream["u"]).sum() + (eta * upstream["eta"]).sum()
            + (s_T * upstream["s_T"]).sum())
    names = [k for k in NAMES if leaves[k] is not None and leaves[k].requires_grad]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    out = {"s": s.detach(), "u": u.detach(), "eta": eta.detach(), "s_T": s_T.detach()}
    out.update({f"grad_{k}": g for k, g in zip(names, grads)})
    return out


# T, B, I, H, input density: sparse (< 25 % nonzero) and dense cases alternate.
SHAPES = [(1, 1, 1, 1, 1.0), (CKPT_EVERY - 1, 3, 5, 17, 0.1), (CKPT_EVERY, 4, 3, 33, 0.6),
          (CKPT_EVERY + 1, 5, 8, 36, 0.15), (97, 6, 20, 70, 0.4), (211, 2, 700, 40, 0.05)]


@pytest.mark.parametrize("T,B,I,H,density", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("neuron,surrogate", [("adaptive", "gaussian"), ("adaptive", "multi_gaussian"),
                                              ("lif", "multi_gaussian"), ("relu", "gaussian")])
def test_float64_matches_reference(T, B, I, H, density, neuron, surrogate):
    inputs, upstream = make_layer_case(T, B, I, H, seed=T + H, density=density)
    ref = run_layer(inputs, upstream, "reference", neuron=neuron, surrogate=surrogate)
    if neuron != "relu" and T > 1:
        rate = float((ref["s"] != 0).double().mean())
        assert 0.02 < rate < 0.9, f"firing rate {rate}: the case would not test much"
    check_each_cpu_capability(lambda: run_layer(inputs, upstream, "cpp", neuron=neuron, surrogate=surrogate),
                              lambda got: check_float64(got, ref))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_float64_seeds_dense_input_no_bias_noncontiguous(seed):
    inputs, upstream = make_layer_case(70, 5, 9, 45, seed=seed, density=1.0, bias=False)
    ref = run_layer(inputs, upstream, "reference")
    assert "grad_bias" not in ref
    check_each_cpu_capability(lambda: run_layer(inputs, upstream, "cpp", noncontiguous=True),
                              lambda got: check_float64(got, ref))


def test_float64_input_without_grad():
    """A first layer's x needs no gradient: the kernel skips dL/dx."""
    for density in (0.1, 0.5):  # the sparse and the dense (GEMM) projection
        inputs, upstream = make_layer_case(50, 4, 12, 30, seed=5, density=density)
        ref = run_layer(inputs, upstream, "reference", x_grad=False)
        assert "grad_x" not in ref
        check_each_cpu_capability(lambda: run_layer(inputs, upstream, "cpp", x_grad=False),
                                  lambda got: check_float64(got, ref))


@pytest.mark.parametrize("T,B,I,H,density", [(1301, 4, 4, 36, 0.05), (250, 4, 700, 128, 0.05), (300, 4, 80, 120, 1.0)],
                         ids=["ecg", "shd", "dense"])
@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
def test_float32_against_float64(T, B, I, H, density, neuron):
    inputs, upstream = make_layer_case(T, B, I, H, seed=7, density=density)
    ref64 = run_layer(inputs, upstream, "reference", neuron=neuron)
    f32 = {k: None if v is None else v.float() for k, v in inputs.items()}
    check_each_cpu_capability(lambda: run_layer(f32, {k: v.float() for k, v in upstream.items()}, "cpp",
                                                neuron=neuron),
                              lambda got: check_float32(got, ref64, FLOAT32_TOL))


def test_poisoned_outputs_are_all_written(monkeypatch):
    """SRNN_FAST_POISON=1 NaN-fills every output and reused scratch buffer before the kernels
    run (density 0.3: the dense path; on the default build its x_proj and dI buffers are kept
    between calls)."""
    inputs, upstream = make_layer_case(CKPT_EVERY * 2 + 3, 5, 6, 40, seed=11)
    clean = run_layer(inputs, upstream, "cpp")
    monkeypatch.setenv("SRNN_FAST_POISON", "1")
    poisoned = run_layer(inputs, upstream, "cpp")
    for k, v in clean.items():
        assert torch.equal(v, poisoned[k]), k


@pytest.mark.parametrize("T,B,I,H,density,bias", [(100, 9, 10, 50, 0.3, True), (300, 3, 7, 70, 1.0, False),
                                                  (60, 5, 30, 40, 0.05, True)], ids=["dense", "dense-chunks", "sparse"])
def test_deterministic_across_thread_counts(T, B, I, H, density, bias):
    """Every reduction (also dW_in = dI^T x of dense inputs, which a BLAS GEMM splits across
    threads on Intel CPUs) runs in a fixed order: bitwise equal for 1 and 2 threads, on every
    build; the avx2 and avx512 builds (both with FMA) bitwise equal to each other. "dense-chunks":
    T B = 900 rows, several row chunks, no bias; H and I + 1 not whole tiles."""
    inputs, upstream = make_layer_case(T, B, I, H, dtype=torch.float32, seed=4, density=density, bias=bias)
    before = torch.get_num_threads()
    builds = {}
    try:
        for name in cpu_capabilities():
            with cpu_capability(name):
                torch.set_num_threads(1)
                one = run_layer(inputs, upstream, "cpp")
                torch.set_num_threads(2)
                two = run_layer(inputs, upstream, "cpp")
            for k in one:
                assert torch.equal(one[k], two[k]), f"[cpu capability {name}] {k}"
            builds[name] = one
    finally:
        torch.set_num_threads(before)
    if "avx2" in builds and "avx512" in builds:
        for k, v in builds["avx2"].items():
            assert torch.equal(v, builds["avx512"][k]), k


@pytest.mark.parametrize("density", [0.05, 0.6], ids=["sparse", "dense"])
def test_float32_kernels_flush_subnormals(density):
    inputs, upstream = make_layer_case(40, 4, 6, 20, seed=12, density=density)
    check_each_cpu_capability(lambda: check_subnormals_flushed(run_layer, inputs, upstream), lambda _: None)


@pytest.mark.parametrize("density", [0.1, 0.6], ids=["sparse", "dense"])
@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
def test_inference_paths_save_nothing_and_match_the_reference(neuron, density, monkeypatch):
    """Under no_grad srnn_layer and srnn_scan call the kernels' paths that save nothing for
    backward (layer_fwd with ckpt_every = 0, scan_fwd with save = False); held to the float64
    rules against the reference (exact spikes, final state to rtol)."""
    inputs, _ = make_layer_case(CKPT_EVERY + 7, 3, 5, 20, seed=6, density=density)
    x, w_in, bias, w_rec, tau_m, tau_adp = (inputs[k] for k in ("x", "w_in", "bias", "w_rec", "tau_m", "tau_adp"))
    state = SRNNState(inputs["u0"], inputs["eta0"], inputs["s0"])
    as_dict = lambda s, st: {"s": s, "u": st.u, "eta": st.eta, "s_T": st.s}  # noqa: E731
    ref = as_dict(*srnn_layer(x, w_in, bias, w_rec, tau_m, tau_adp, state, neuron=neuron, backend="reference"))
    if neuron != "relu":
        assert 0.02 < float(ref["s"].mean()) < 0.9  # spikes to compare
    saved = {}  # op -> (its last argument: ckpt_every / save, the sizes of what it saved)

    def spy(name, op):
        def call(*args):
            out = op(*args)
            saved[name] = (args[-1], [t.numel() for t in out[3:]])
            return out
        return call
    for name in ("layer_fwd", "scan_fwd"):
        monkeypatch.setattr(torch.ops.srnn_fast, name, spy(name, getattr(torch.ops.srnn_fast, name)))

    def inference():
        saved.clear()
        with torch.no_grad():
            layer = srnn_layer(x, w_in, bias, w_rec, tau_m, tau_adp, state, neuron=neuron, backend="cpp")
            scan = srnn_scan(torch.nn.functional.linear(x, w_in, bias), w_rec, tau_m, tau_adp, state, neuron=neuron,
                             backend="cpp")
        assert saved == {"layer_fwd": (0, [0, 0, 0]), "scan_fwd": (False, [0, 0])}, saved
        return as_dict(*layer), as_dict(*scan)

    def check(got):
        for name, g in zip(("srnn_layer", "srnn_scan"), got):
            try:
                check_float64(g, ref)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None

    check_each_cpu_capability(inference, check)


def _op_args(T=10, B=3, I=4, H=6, ckpt=4):
    inputs, _ = make_layer_case(T, B, I, H, dtype=torch.float32, seed=8)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    fwd = [inputs["x"], inputs["w_in"], inputs["bias"], inputs["w_rec"], alpha, rho, inputs["u0"], inputs["eta0"],
           inputs["s0"], True, 0.01, 1.8, 1.0, 1.0, ckpt]
    return fwd


def test_opcheck():
    fwd = _op_args()
    torch.library.opcheck(torch.ops.srnn_fast.layer_fwd, tuple(fwd))
    s, u_T, eta_T, u_ck, eta_ck, bits = torch.ops.srnn_fast.layer_fwd(*fwd)
    g = torch.randn_like(s)
    z = torch.zeros_like(u_T)
    bwd = (g, z, z, *fwd[:9], u_ck, eta_ck, bits, True, 0, 0.01, 1.8, 1.0, 1.0, 0.5, 0.5, fwd[-1], True)
    torch.library.opcheck(torch.ops.srnn_fast.layer_bwd, bwd)


@pytest.mark.parametrize("index,bad,match", [
    (0, torch.zeros(10, 3), "x must be"),
    (0, torch.zeros(10, 3, 4, dtype=torch.float64), "x must have dtype"),
    (1, torch.zeros(6, 5), "w_in must be"),
    (2, torch.zeros(5), "bias must be"),
    (3, torch.zeros(6, 5), "w_rec must be"),
    (6, torch.zeros(2, 6), "u0 must be"),
    (14, -1, "ckpt_every must be"),
])
def test_op_rejects_bad_input(index, bad, match):
    args = _op_args()
    args[index] = bad
    with pytest.raises(RuntimeError, match=match):
        torch.ops.srnn_fast.layer_fwd(*args)


def test_layer_rejects_bad_input():
    inputs, _ = make_layer_case(10, 3, 4, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="w_in must be"):
        srnn_layer(inputs["x"], inputs["w_in"][:, :3], inputs["bias"], inputs["w_rec"], inputs["tau_m"],
                   inputs["tau_adp"], backend="cpp")
    with pytest.raises(ValueError, match="tau_m must be finite"):
        srnn_layer(inputs["x"], inputs["w_in"], inputs["bias"], inputs["w_rec"], -inputs["tau_m"],
                   inputs["tau_adp"], backend="cpp")


def test_dense_or_sparse_input_from_steps_over_the_whole_sequence():
    """The layer ops pick the dense path (projection over every input) when more than 25 % of x
    is nonzero in 16 steps spread over the sequence: a burst in the first steps alone (a spiking
    layer's start from u = 0: S-MNIST's layer 1 fires 25 % in each of its first 8 steps and
    6 % over the sequence) must not send the next layer down the dense path."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(784, 4, 120, generator=g) < 0.06).float()
    x[:8] = (torch.rand(8, 4, 120, generator=g) < 0.3).float()
    dense_input = torch.ops.srnn_fast.layer_dense_input
    assert not dense_input(x)
    assert dense_input((torch.rand(784, 4, 120, generator=g) < 0.3).float())
    assert dense_input(torch.rand(3, 2, 5, generator=g))  # T < 16: every step
    assert not dense_input(torch.zeros(1, 1, 1))
