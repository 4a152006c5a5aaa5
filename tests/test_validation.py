"""Bad input: every entry point raises a clear ValueError/TypeError naming the argument."""
import pytest
import torch

from srnn_fast import AdaptiveSRNN, BackendUnavailableError, SRNNLayer, SRNNState, available_backends, srnn_scan
from srnn_fast.reference import srnn_scan_ref

T, B, H = 4, 2, 3


def args(**over):
    a = dict(x_proj=torch.randn(T, B, H), w_rec=torch.randn(H, H), tau_m=torch.full((H,), 20.0),
             tau_adp=torch.full((H,), 150.0), state=None)
    a.update(over)
    return a


def state(**over):
    st = dict(u=torch.zeros(B, H), eta=torch.zeros(B, H), s=torch.zeros(B, H))
    st.update(over)
    return SRNNState(**st)


BAD = {
    "x-rank": (args(x_proj=torch.randn(T, H)), {}, ValueError, r"x_proj must be \[T, B, H\]"),
    "x-empty": (args(x_proj=torch.randn(0, B, H)), {}, ValueError, "x_proj must have T, B, H >= 1"),
    "x-not-tensor": (args(x_proj=[[1.0]]), {}, TypeError, "x_proj must be a torch.Tensor"),
    "w-shape": (args(w_rec=torch.randn(H, H + 1)), {}, ValueError, r"w_rec must be \[H, H\] = \[3, 3\]"),
    "tau_m-shape": (args(tau_m=torch.ones(H + 1)), {}, ValueError, r"tau_m must be \[H\] = \[3\]"),
    "tau_adp-shape": (args(tau_adp=torch.ones(1, H)), {}, ValueError, r"tau_adp must be \[H\]"),
    "state-shape": (args(state=state(u=torch.zeros(B + 1, H))), {}, ValueError, r"state.u must be \[B, H\]"),
    "state-type": (args(state=torch.zeros(B, H)), {}, TypeError, "state must be an SRNNState"),
    "tau_m-zero": (args(tau_m=torch.tensor([20.0, 0.0, 5.0])), {}, ValueError, r"tau_m must be finite and > 0.*tau_m\[1\]"),
    "tau_adp-neg": (args(tau_adp=torch.tensor([-1.0, 2.0, 5.0])), {}, ValueError, r"tau_adp.*tau_adp\[0\]"),
    "tau_m-nan": (args(tau_m=torch.tensor([1.0, 2.0, float("nan")])), {}, ValueError, r"tau_m\[2\]"),
    "tau_adp-inf": (args(tau_adp=torch.tensor([1.0, float("inf"), 1.0])), {}, ValueError, r"tau_adp\[1\]"),
    "dtype-mix": (args(w_rec=torch.randn(H, H, dtype=torch.float64)), {}, TypeError, "x_proj must have the dtype"),
    "dtype-tau": (args(tau_m=torch.full((H,), 20.0, dtype=torch.float64)), {}, TypeError, "tau_m must have dtype"),
    "dtype-state": (args(state=state(s=torch.zeros(B, H, dtype=torch.float64))), {}, TypeError, "state.s must have dtype"),
    "dtype-int": (args(x_proj=torch.ones(T, B, H, dtype=torch.int64), w_rec=torch.ones(H, H, dtype=torch.int64)), {},
                  TypeError, "w_rec must be a floating tensor"),
    "device-mix": (args(tau_m=torch.full((H,), 20.0, device="meta")), {}, ValueError, "tau_m must be on cpu"),
    "neuron": (args(), {"neuron": "izhikevich"}, ValueError, "neuron must be one of"),
    "surrogate": (args(), {"surrogate": "sigmoid"}, ValueError, "surrogate must be one of"),
    "sigma": (args(), {"sigma": 0.0}, ValueError, "sigma must be a finite positive"),
    "dt": (args(), {"dt": -1.0}, ValueError, "dt must be a finite positive"),
    "beta": (args(), {"beta": "big"}, TypeError, "beta must be a real number"),
}


@pytest.mark.parametrize("fn", [srnn_scan, srnn_scan_ref], ids=["srnn_scan", "srnn_scan_ref"])
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(fn, case):
    a, kw, exc, msg = BAD[case]
    with pytest.raises(exc, match=msg):
        fn(a["x_proj"], a["w_rec"], a["tau_m"], a["tau_adp"], a["state"], **kw)


def test_bad_backend_name():
    a = args()
    with pytest.raises(ValueError, match="backend must be one of"):
        srnn_scan(a["x_proj"], a["w_rec"], a["tau_m"], a["tau_adp"], backend="fastest")


@pytest.mark.parametrize("backend", ["cuda", "triton", "cpp"])
def test_unavailable_backend_says_how(backend):
    a = args()
    if backend in available_backends() and not (backend == "cuda"):
        pytest.skip(f"{backend} is available here")
    with pytest.raises((BackendUnavailableError, ValueError), match=r"(pip install|runs on|needs)"):
        srnn_scan(a["x_proj"], a["w_rec"], a["tau_m"], a["tau_adp"], backend=backend)


def test_available_backends():
    names = available_backends()
    assert names[-1] == "reference"
    order = ["cuda", "triton", "cpp", "reference"]
    assert names == sorted(names, key=order.index)


def test_module_errors():
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        SRNNLayer(3, 0)
    with pytest.raises(ValueError, match="neuron must be one of"):
        SRNNLayer(3, 4, neuron="lstm")
    with pytest.raises(ValueError, match="init_state must be one of"):
        SRNNLayer(3, 4, init_state="random")
    with pytest.raises(ValueError, match="backend must be one of"):
        SRNNLayer(3, 4, backend="gpu")
    with pytest.raises(ValueError, match=r"x must be \[T, B, 3\]"):
        SRNNLayer(3, 4)(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="readout must be one of"):
        AdaptiveSRNN(3, [4], 2, readout="linear")
    with pytest.raises(ValueError, match="decode must be one of"):
        AdaptiveSRNN(3, [4], 2, decode="sum")
    with pytest.raises(ValueError, match="hidden_sizes must name"):
        AdaptiveSRNN(3, [], 2)
    with pytest.raises(ValueError, match=r"x must be \[T, B, input\]"):
        AdaptiveSRNN(3, [4], 2)(torch.randn(5, 3))
