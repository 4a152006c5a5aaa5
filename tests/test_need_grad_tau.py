"""need_grad_tau: the backward ops skip the time-constant gradients when nothing needs them
(frozen tau_m and tau_adp). Every other gradient stays bit for bit what the full backward
gives, on every build of the CPU kernels, and the autograd Functions ask for the skip exactly
when neither alpha nor rho needs a gradient."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import srnn_fast
from srnn_fast import SRNNState, srnn_scan
from srnn_fast.layer import CKPT_EVERY, srnn_layer
from scan_cases import check_each_cpu_capability, make_case
from test_layer import make_layer_case

pytestmark = pytest.mark.skipif("cpp" not in srnn_fast.available_backends(), reason="extension not built")

DTYPES = [torch.float64, torch.float32]
NEURONS = [("adaptive", True, 1.8), ("relu", False, 0.0)]  # (name, binary, beta)


def scan_bwd_args(T, B, H, dtype, binary, beta, seed=0, device="cpu"):
    inputs, up = make_case(T, B, H, dtype=dtype, seed=seed, device=device)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    state = (inputs["u0"], inputs["eta0"], inputs["s0"])
    scalars = (0.01, beta, 1.0, 1.0)
    s, _, _, u_seq, bits = torch.ops.srnn_fast.scan_fwd(inputs["x_proj"], inputs["w_rec"], alpha, rho, *state, binary,
                                                        *scalars, True)
    return (up["s"], up["u"], up["eta"], inputs["w_rec"], alpha, rho, *state, u_seq, bits if binary else s, binary, 1,
            *scalars, 0.5, 0.5)


def layer_bwd_args(T, B, I, H, dtype, binary, beta, density, seed=0):
    inputs, up = make_layer_case(T, B, I, H, dtype=dtype, seed=seed, density=density)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    head = (inputs["x"], inputs["w_in"], inputs["bias"], inputs["w_rec"], alpha, rho, inputs["u0"], inputs["eta0"],
            inputs["s0"])
    scalars = (0.01, beta, 1.0, 1.0)
    s, _, _, u_ck, eta_ck, bits = torch.ops.srnn_fast.layer_fwd(*head, binary, *scalars, CKPT_EVERY)
    return (up["s"], up["u"], up["eta"], *head, u_ck, eta_ck, bits if binary else s, binary, 1, *scalars, 0.5, 0.5,
            CKPT_EVERY, True)


def check_skip(op, args, tau_outputs, H):
    """On every CPU build: op(*args, need_grad_tau=False) returns [0] tau gradients and every
    other output bit-identical to op(*args) (need_grad_tau defaults to True)."""
    def run():
        return op(*args), op(*args, False)

    def check(got):
        full, skipped = got
        for i, (a, b) in enumerate(zip(full, skipped)):
            if i in tau_outputs:
                assert a.shape == (H,) and b.shape == (0,), (i, a.shape, b.shape)
                assert torch.isfinite(a).all() and a.abs().max() > 0, "the full backward's tau gradient tests nothing"
            else:
                assert torch.equal(a, b), f"output {i} differs without the tau gradients"
    check_each_cpu_capability(run, check)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("neuron,binary,beta", NEURONS, ids=[n[0] for n in NEURONS])
@pytest.mark.parametrize("T,B,H", [(1, 1, 3), (40, 5, 37), (130, 9, 70)])
def test_scan_bwd_skip_is_bit_identical(T, B, H, neuron, binary, beta, dtype):
    check_skip(torch.ops.srnn_fast.scan_bwd, scan_bwd_args(T, B, H, dtype, binary, beta, seed=T), (1, 2), H)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("neuron,binary,beta", NEURONS, ids=[n[0] for n in NEURONS])
@pytest.mark.parametrize("T,B,I,H,density", [(1, 1, 2, 3, 1.0), (CKPT_EVERY + 5, 5, 6, 37, 0.1),
                                             (100, 9, 20, 70, 0.6)], ids=["tiny", "sparse", "dense"])
def test_layer_bwd_skip_is_bit_identical(T, B, I, H, density, neuron, binary, beta, dtype):
    args = layer_bwd_args(T, B, I, H, dtype, binary, beta, density, seed=T)
    check_skip(torch.ops.srnn_fast.layer_bwd, args, (4, 5), H)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_scan_bwd_takes_the_flag(dtype):
    """The CUDA kernel computes the tau sums anyway, and returns them as the contract's [0]."""
    args = scan_bwd_args(50, 5, 40, dtype, True, 1.8, device="cuda")
    full, skipped = torch.ops.srnn_fast.scan_bwd(*args), torch.ops.srnn_fast.scan_bwd(*args, False)
    for i, (a, b) in enumerate(zip(full, skipped)):
        assert b.shape == (0,) if i in (1, 2) else torch.equal(a, b), i


def test_opcheck_without_tau_grads():
    """The schemas' need_grad_tau and the fake kernels' [0] outputs agree with the kernels."""
    torch.library.opcheck(torch.ops.srnn_fast.scan_bwd.default,
                          scan_bwd_args(5, 3, 37, torch.float64, True, 1.8) + (False,))
    torch.library.opcheck(torch.ops.srnn_fast.layer_bwd.default,
                          layer_bwd_args(10, 3, 4, 6, torch.float32, True, 1.8, 0.3) + (False,))


class BackwardLog(TorchDispatchMode):
    """Records need_grad_tau of every scan_bwd / layer_bwd call."""

    OPS = ("srnn_fast::scan_bwd", "srnn_fast::layer_bwd", "srnn_fast::triton_scan_bwd")

    def __init__(self):
        super().__init__()
        self.flags = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            n = len(func._schema.arguments)
            self.flags.append((func._schema.name, args[n - 1] if len(args) == n else True))
        return func(*args, **(kwargs or {}))


def _grads(fn, inputs, upstream, frozen):
    """Gradients of every input but the frozen ones, and the need_grad_tau the kernels got."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k not in frozen) for k, v in inputs.items()}
    s, (u, eta, _) = fn(leaves)
    loss = (s * upstream["s"]).sum() + (u * upstream["u"]).sum() + (eta * upstream["eta"]).sum()
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    with BackwardLog() as log:
        grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return dict(zip(names, grads)), log.flags


def _scan(backend):
    def fn(v):
        return srnn_scan(v["x_proj"], v["w_rec"], v["tau_m"], v["tau_adp"], SRNNState(v["u0"], v["eta0"], v["s0"]),
                         backend=backend)
    return fn


def _layer(v):
    return srnn_layer(v["x"], v["w_in"], v["bias"], v["w_rec"], v["tau_m"], v["tau_adp"],
                      SRNNState(v["u0"], v["eta0"], v["s0"]), backend="cpp")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["scan", "layer"])
def test_autograd_asks_only_when_no_tau_trains(path, dtype):
    if path == "scan":
        inputs, upstream = make_case(60, 4, 33, dtype=dtype, seed=3)
        fn, op = _scan("cpp"), "srnn_fast::scan_bwd"
    else:
        inputs, upstream = make_layer_case(60, 4, 7, 33, dtype=dtype, seed=3)
        fn, op = _layer, "srnn_fast::layer_bwd"
    full, flags = _grads(fn, inputs, upstream, frozen=())
    assert flags == [(op, True)]
    for frozen, flag in ((("tau_m",), True), (("tau_adp",), True), (("tau_m", "tau_adp"), False)):
        got, flags = _grads(fn, inputs, upstream, frozen)
        assert flags == [(op, flag)], frozen
        assert set(got) == set(full) - set(frozen)
        for k, g in got.items():
            assert torch.equal(g, full[k]), f"{k} with {frozen} frozen"


def test_triton_drops_tau_grads():
    """The Triton backend (interpreted on CPU here) takes the flag too: [0] tau gradients,
    the rest unchanged."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton runs on CPU tensors only with TRITON_INTERPRET=1")
    from srnn_fast.triton_kernels import ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs, upstream = make_case(6, 2, 8, dtype=torch.float32, device=device, seed=1)
    full, flags = _grads(_scan("triton"), inputs, upstream, frozen=())
    assert flags == [("srnn_fast::triton_scan_bwd", True)]
    got, flags = _grads(_scan("triton"), inputs, upstream, frozen=("tau_m", "tau_adp"))
    assert flags == [("srnn_fast::triton_scan_bwd", False)]
    for k, g in got.items():
        assert torch.equal(g, full[k]), k
    args = scan_bwd_args(6, 2, 8, torch.float32, True, 1.8)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    out = ops.scan_bwd(*args, False)
    assert out[1].shape == out[2].shape == (0,)
