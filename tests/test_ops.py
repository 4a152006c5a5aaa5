"""The srnn_fast:: ops as torch ops: opcheck (schema, fake implementations, dispatch),
torch.compile without graph breaks, the inference path, bad input, the missing-extension
message."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import srnn_fast
from scan_cases import check_compile_matches_eager, make_case
from srnn_fast import _ops, scan
from srnn_fast.scan import BackendUnavailableError, pack_spikes


def op_args(T=5, B=3, H=37, binary=True, dtype=torch.float64, seed=0):
    """Valid (fwd_args, bwd_args) for a direct call of the ops."""
    inputs, up = make_case(T, B, H, dtype=dtype, seed=seed)
    alpha, rho = torch.exp(-1 / inputs["tau_m"]), torch.exp(-1 / inputs["tau_adp"])
    state = (inputs["u0"], inputs["eta0"], inputs["s0"])
    scalars = (0.01, 1.8 if binary else 0.0, 1.0, 1.0)
    fwd = (inputs["x_proj"], inputs["w_rec"], alpha, rho, *state, binary, *scalars, True)
    s, _, _, u_seq, bits = torch.ops.srnn_fast.scan_fwd(*fwd)
    bwd = (up["s"], up["u"], up["eta"], inputs["w_rec"], alpha, rho, *state, u_seq, bits if binary else s,
           binary, 0, *scalars, 0.5, 0.5)
    return fwd, bwd


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "relu"])
@pytest.mark.parametrize("save", [True, False], ids=["save", "nosave"])
def test_opcheck_fwd(binary, save):
    fwd, _ = op_args(binary=binary)
    torch.library.opcheck(torch.ops.srnn_fast.scan_fwd.default, fwd[:-1] + (save,))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "relu"])
def test_opcheck_bwd(binary):
    _, bwd = op_args(binary=binary)
    torch.library.opcheck(torch.ops.srnn_fast.scan_bwd.default, bwd)


def test_compile_without_graph_breaks():
    """A model using the cpp backend compiles as one graph (fullgraph=True fails on any
    break), forward and backward, and matches eager."""
    check_compile_matches_eager("cpp", "cpu")


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.srnn_fast.scan_fwd.default:
            self.calls.append((args, out))
        return out


def test_inference_path_saves_nothing():
    """Without grad the kernel is asked to save nothing and returns empty save buffers;
    with grad it saves u_seq and the spike bits."""
    inputs, _ = make_case(6, 2, 40, dtype=torch.float32)
    args = [inputs[k] for k in ("x_proj", "w_rec", "tau_m", "tau_adp")]
    for grad, expect_save in ((False, False), (True, True)):
        leaves = [a.clone().requires_grad_(grad) for a in args]
        with OpLog() as log:
            srnn_fast.srnn_scan(*leaves, backend="cpp")
        (call_args, out), = log.calls
        assert call_args[-1] is expect_save
        u_seq, bits = out[3], out[4]
        assert (u_seq.numel(), bits.numel()) == ((6 * 2 * 40, 6 * 2 * 2) if expect_save else (0, 0))
    with torch.no_grad():
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            srnn_fast.srnn_scan(*[a.clone().requires_grad_(True) for a in args], backend="cpp")
        assert packed == []


def bad(fwd, i, value):
    args = list(fwd)
    args[i] = value
    return tuple(args)


FWD_BAD = [
    # (argument index, replacement builder, words the message must contain)
    (0, lambda a: a[0][..., :-1], "w_rec must be [H, H]"),
    (0, lambda a: a[0][0], "x_proj must be [T, B, H]"),
    (1, lambda a: a[1].float(), "w_rec"),
    (1, lambda a: a[1].int(), "w_rec must be float32 or float64"),
    (2, lambda a: a[2][:-1], "alpha must be [H]"),
    (3, lambda a: a[3].float(), "rho must have dtype"),
    (4, lambda a: a[4][:1], "u0 must be [B, H]"),
    (5, lambda a: a[5].t(), "eta0 must be [B, H]"),
    (6, lambda a: a[6].unsqueeze(0), "s0 must be [B, H]"),
    (2, lambda a: a[2].clone().index_fill_(0, torch.tensor([3]), float("nan")), "alpha[3] = nan"),
    (2, lambda a: torch.ones_like(a[2]), "alpha = exp(-dt / tau_m) must be finite and in [0, 1)"),
    (3, lambda a: a[3].clone().index_fill_(0, torch.tensor([0]), float("inf")), "rho[0] = inf"),
]


@pytest.mark.parametrize("i,make,words", FWD_BAD, ids=[w for _, _, w in FWD_BAD])
def test_bad_input_fwd(i, make, words):
    fwd, _ = op_args()
    with pytest.raises(RuntimeError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        torch.ops.srnn_fast.scan_fwd(*bad(fwd, i, make(fwd)))


BWD_BAD = [
    (0, lambda a: a[0][:-1], "u_seq must be [T, B, H]"),
    (1, lambda a: a[1].float(), "grad_u_T must have dtype"),
    (9, lambda a: a[9][:, :, :-1], "u_seq must be [T, B, H]"),
    (10, lambda a: a[10].long(), "spike bits"),
    (10, lambda a: a[10][..., :1], "ceil(H/32)"),
    (12, lambda a: 2, "surrogate must be 0"),
    (4, lambda a: -a[4], "alpha"),
]


@pytest.mark.parametrize("i,make,words", BWD_BAD, ids=[w for _, _, w in BWD_BAD])
def test_bad_input_bwd(i, make, words):
    _, bwd = op_args()
    with pytest.raises(RuntimeError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        torch.ops.srnn_fast.scan_bwd(*bad(bwd, i, make(bwd)))


def test_relu_spikes_must_be_activations():
    fwd, _ = op_args(binary=False)
    s, *_ = torch.ops.srnn_fast.scan_fwd(*fwd)
    _, bwd = op_args(binary=False)
    with pytest.raises(RuntimeError, match=r"spikes \(relu activations\) must be \[T, B, H\]"):
        torch.ops.srnn_fast.scan_bwd(*bad(bwd, 10, pack_spikes(s)))


def test_bad_device():
    """A tensor on another device than x_proj is refused by name (meta stands in for a second
    device on a machine without a GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a second real device; meta tensors dispatch to the fake implementation")
    fwd, _ = op_args()
    with pytest.raises(RuntimeError, match="u0 must be on cpu"):
        torch.ops.srnn_fast.scan_fwd(*bad(fwd, 4, fwd[4].cuda()))


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ops, "EXTENSION_ERROR", "ImportError: no module named srnn_fast._C")
    with pytest.raises(BackendUnavailableError, match="pip install -e . --no-build-isolation"):
        scan.resolve_backend("cpp", torch.device("cpu"))
    assert "cpp" not in srnn_fast.available_backends()
    # "auto" falls back to the reference only when no backend was asked for by name.
    assert scan.resolve_backend("auto", torch.device("cpu")) == "reference"


def test_grad_w_rec_matches_gemm():
    """The dW_rec op equals scan.py's fallback (unpacked spikes, one GEMM), float64, with a
    real-valued s0 (user state) and more rows than the op's fixed chunk count."""
    T, B, H = 13, 5, 70
    fwd, bwd = op_args(T=T, B=B, H=H)
    bits, grad_x = bwd[10], torch.randn(T, B, H, dtype=torch.float64)
    s0 = torch.rand(B, H, dtype=torch.float64) * 2 - 0.5
    s_prev = torch.cat([s0.unsqueeze(0), scan.unpack_spikes(bits, H, s0.dtype)[:-1]])
    want = grad_x.reshape(T * B, H).t() @ s_prev.reshape(T * B, H)
    torch.testing.assert_close(torch.ops.srnn_fast.grad_w_rec(grad_x, bits, s0), want, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.srnn_fast.grad_w_rec.default, (grad_x, bits, s0))
    with pytest.raises(RuntimeError, match=r"spk_bits must be \[T, B, ceil\(H/32\)\]"):
        torch.ops.srnn_fast.grad_w_rec(grad_x, bits[..., :2], s0)
    with pytest.raises(RuntimeError, match=r"grad_x must be \[T, B, H\]"):
        torch.ops.srnn_fast.grad_w_rec(grad_x[:, :, :-1], bits, s0)


def test_auto_passes_over_a_backend_that_cannot_take_the_layer(monkeypatch):
    """"auto" asks each backend whether it takes w_rec's size and dtype (triton: H <= 128 in
    float32) and goes on to the next one instead of failing in the kernel's H check."""
    cpu = torch.device("cpu")
    small_only = scan.Backend("small", lambda: ("cpu",), lambda: None, lambda w_rec: w_rec.shape[0] <= 8)
    monkeypatch.setattr(scan, "BACKEND_TABLE", (small_only,) + scan.BACKEND_TABLE)
    assert scan.resolve_backend("auto", cpu, torch.zeros(8, 8)) == "small"
    assert scan.resolve_backend("auto", cpu, torch.zeros(9, 9)) in ("cpp", "reference")
