"""Argument checks shared by every entry point (reference, dispatch, modules).

All validation of user input lives here so that every backend sees the same, already
validated arguments and every error message names the argument and what was expected.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

NEURONS = ("adaptive", "lif", "relu")
SURROGATES = ("gaussian", "multi_gaussian")
BACKENDS = ("auto", "cuda", "triton", "cpp", "reference", "cuda_sim")
# Default threshold adaptation strength per neuron type (beta=None).
DEFAULT_BETA = {"adaptive": 1.8, "lif": 0.0, "relu": 0.0}
STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


class SRNNState(NamedTuple):
    """Per-layer recurrent state, each tensor [B, H]: membrane u, adaptation eta, spikes s."""

    u: torch.Tensor
    eta: torch.Tensor
    s: torch.Tensor


class ScanConfig(NamedTuple):
    """Validated scalar configuration of one scan (all plain Python values)."""

    neuron: str
    binary: bool  # True for spiking neurons (s in {0, 1}), False for "relu"
    b0: float
    beta: float
    dt: float
    r_m: float
    surrogate: str
    sigma: float
    gamma: float


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


def _finite(name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number; got {value}")
    return value


def check_config(neuron="adaptive", b0=0.01, beta=None, dt=1.0, r_m=1.0, surrogate="gaussian",
                 sigma=0.5, gamma=0.5) -> ScanConfig:
    neuron = _choice("neuron", neuron, NEURONS)
    surrogate = _choice("surrogate", surrogate, SURROGATES)
    beta = DEFAULT_BETA[neuron] if beta is None else _finite("beta", beta)
    return ScanConfig(neuron, neuron != "relu", _finite("b0", b0), beta, _finite("dt", dt, True),
                      _finite("r_m", r_m), surrogate, _finite("sigma", sigma, True), _finite("gamma", gamma))


def check_backend(backend) -> str:
    return _choice("backend", backend, BACKENDS)


def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    return t


def check_positive_finite(name: str, t: torch.Tensor) -> None:
    """Value check for time constants. Needs a host sync, so it is skipped while tracing
    under torch.compile (data-dependent branches would break the graph)."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must be finite and > 0 for every neuron; {name}[{idx}] = {t[idx].item()}")


def check_scan_args(x_proj, w_rec, tau_m, tau_adp, state: Optional[SRNNState]) -> SRNNState:
    """Check shapes, dtypes, devices and time-constant values of a scan's tensors.
    Returns the state as an SRNNState, or None when none was given."""
    x_proj = _tensor("x_proj", x_proj)
    if x_proj.dim() != 3:
        raise ValueError(f"x_proj must be [T, B, H] (3-D); got {describe(x_proj)}")
    T, B, H = x_proj.shape
    if T < 1 or B < 1 or H < 1:
        raise ValueError(f"x_proj must have T, B, H >= 1; got {describe(x_proj)}")
    w_rec = _tensor("w_rec", w_rec)
    if w_rec.shape != (H, H):
        raise ValueError(f"w_rec must be [H, H] = [{H}, {H}] to match x_proj; got {describe(w_rec)}")
    dtype = w_rec.dtype
    if dtype not in STATE_DTYPES:
        raise TypeError(f"w_rec must be a floating tensor (float32/float64/float16/bfloat16); got {describe(w_rec)}")
    if x_proj.dtype != dtype and not (x_proj.dtype in LOW_PRECISION and dtype == torch.float32):
        raise TypeError(f"x_proj must have the dtype of w_rec ({dtype}), or be float16/bfloat16 with "
                        f"float32 parameters; got {describe(x_proj)}")
    device = x_proj.device
    named = [("w_rec", w_rec), ("tau_m", _tensor("tau_m", tau_m)), ("tau_adp", _tensor("tau_adp", tau_adp))]
    for name in ("tau_m", "tau_adp"):
        t = dict(named)[name]
        if t.shape != (H,):
            raise ValueError(f"{name} must be [H] = [{H}]; got {describe(t)}")
    if state is not None:
        if not isinstance(state, tuple) or len(state) != 3:
            raise TypeError(f"state must be an SRNNState(u, eta, s) of three [B, H] tensors; got {type(state).__name__}")
        state = SRNNState(*state)
        for name, t in zip(("state.u", "state.eta", "state.s"), state):
            _tensor(name, t)
            if t.shape != (B, H):
                raise ValueError(f"{name} must be [B, H] = [{B}, {H}]; got {describe(t)}")
            named.append((name, t))
    for name, t in named:
        if t.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype} like w_rec; got {describe(t)}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device} like x_proj; got {describe(t)}")
    check_positive_finite("tau_m", tau_m)
    check_positive_finite("tau_adp", tau_adp)
    return state


def initial_state(B: int, H: int, b0: float, like: torch.Tensor) -> SRNNState:
    """The default initial state: u = 0, eta = b0, s = 0."""
    z = like.new_zeros(B, H)
    return SRNNState(z, torch.full_like(z, b0), z.clone())


def check_layer_args(x, w_in, bias, w_rec, tau_m, tau_adp, state: Optional[SRNNState]) -> Optional[SRNNState]:
    """check_scan_args for a layer: x [T, B, I], w_in [H, I], bias [H] or None, then the scan's
    tensors as if x_proj were [T, B, H] (H from w_in)."""
    x = _tensor("x", x)
    if x.dim() != 3 or min(x.shape) < 1:
        raise ValueError(f"x must be [T, B, I] with T, B, I >= 1; got {describe(x)}")
    T, B, I = x.shape
    w_in = _tensor("w_in", w_in)
    if w_in.dim() != 2 or w_in.shape[1] != I or w_in.shape[0] < 1:
        raise ValueError(f"w_in must be [H, I] with I = {I} (x's last dim); got {describe(w_in)}")
    H = w_in.shape[0]
    for name, t in (("x", x), ("w_in", w_in)) + ((("bias", _tensor("bias", bias)),) if bias is not None else ()):
        if name == "bias" and t.shape != (H,):
            raise ValueError(f"bias must be [H] = [{H}]; got {describe(t)}")
        if t.dtype != getattr(w_rec, "dtype", t.dtype):
            raise TypeError(f"{name} must have dtype {w_rec.dtype} like w_rec; got {describe(t)}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} like x; got {describe(t)}")
    return check_scan_args(x.new_zeros(()).expand(T, B, H), w_rec, tau_m, tau_adp, state)
