"""nn.Modules: one recurrent SRNN layer, and a stacked network with a readout and a decoder."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._checks import SRNNState, _choice, check_backend, check_config
from .layer import srnn_layer
from .scan import srnn_scan

READOUTS = ("integrator", "spiking", "membrane")
DECODERS = ("count", "last", "max", "mean", "per_step")
# Initial membrane without a given state: "uniform" U(0, 1) in training and 0 in evaluation;
# "uniform_always" U(0, 1) in both (the method's code: a network trained on random starts can
# rely on the first steps' burst of spikes, and then fails from u = 0; PS-MNIST: 61 % vs 31 %);
# "uniform_b0" U(0, b0) in both (the method's PS-MNIST script: every neuron starts below its
# threshold b0 (1 + beta), so none spikes at the first step); "zeros" 0 in both.
INIT_STATES = ("uniform", "zeros", "uniform_always", "uniform_b0")
# The recurrent weights' initialisation: orthogonal, or zeros (the method's PS-MNIST script:
# the recurrence grows from nothing as training needs it).
REC_INITS = ("orthogonal", "zeros")
# Which time constants train: tau_m and tau_adp ("all"), only one of them, or neither. A
# frozen one stays at its initial value as a buffer under the same name, so optimizers,
# checkpoints, torch.compile and DDP see exactly the trainable ones.
TRAIN_TAU = ("all", "none", "m", "adp")
# Steps per block of leaky_integrate: streaming chunks that are multiples of it line up with
# the blocks of one pass, so AdaptiveSRNN.stream reproduces forward bit for bit.
INTEGRATE_BLOCK = 64


def _normal_init(t: torch.Tensor, mean_std, floor: float) -> None:
    """N(mean, std) per neuron, clamped so that no time constant starts at or below ``floor``."""
    mean, std = mean_std
    with torch.no_grad():
        nn.init.normal_(t, mean, std).clamp_(min=floor)


def leaky_integrate(y: torch.Tensor, tau: torch.Tensor, dt: float = 1.0, chunk: int = INTEGRATE_BLOCK,
                    o0: torch.Tensor = None) -> torch.Tensor:
    """o_t = a o_{t-1} + (1 - a) y_t with a = exp(-dt / tau), o_0 = ``o0`` (default 0); y [T, B, C], tau [C].

    Runs in chunks of ``chunk`` steps: within a chunk the recurrence is one batched matmul
    with the [C, L, L] matrix of powers a^(i - j), so the Python loop is T / chunk long.
    """
    T, B, C = y.shape
    log_a = -dt / tau  # [C]
    steps = torch.arange(chunk, device=y.device, dtype=y.dtype)
    lag = steps[:, None] - steps[None, :]  # [L, L], i - j
    decay = torch.exp(lag.clamp(min=0)[None] * log_a[:, None, None]) * (lag >= 0)  # [C, L, L]
    carry_pow = torch.exp((steps + 1)[:, None] * log_a[None, :])  # [L, C], a^(i+1)
    drive = (1 - torch.exp(log_a)) * y
    out, o_prev = [], (y.new_zeros(B, C) if o0 is None else o0)
    for start in range(0, T, chunk):
        d = drive[start:start + chunk]
        n = d.shape[0]
        o = torch.einsum("cij,jbc->ibc", decay[:, :n, :n], d) + carry_pow[:n, None, :] * o_prev
        out.append(o)
        o_prev = o[-1]
    return torch.cat(out)


def membrane_trace(s: torch.Tensor, x_proj: torch.Tensor, tau_m: torch.Tensor, tau_adp: torch.Tensor,
                   state: SRNNState, config, return_state: bool = False):
    """u_t for every step of a feed-forward (W_rec = 0) scan, rebuilt from its spikes s [T, B, H].

    Given the spikes, eta and u are linear recurrences (section 1 of the spec):
    eta_t = rho eta_{t-1} + (1 - rho) s_{t-1} and u_t = alpha u_{t-1} + (1 - alpha) y_t with
    y_t = r_m x_proj[t] - theta_t s_{t-1} dt / (1 - alpha), so both are leaky integrations.
    Autograd through this and through the scan that made s gives the reference's gradient of
    a loss on u (the scan carries the surrogate path s_t <- u_t), without a Python loop over t.
    With ``return_state`` it also returns the trace's SRNNState (u_T, eta_T, s_T), the
    ``state`` from which a next call continues it.
    """
    c = config
    s_prev = torch.cat([state.s.unsqueeze(0), s[:-1]])
    eta = leaky_integrate(s_prev, tau_adp, c.dt, o0=state.eta)
    theta = c.b0 + c.beta * eta
    alpha = torch.exp(-c.dt / tau_m)
    drive = c.r_m * x_proj - theta * s_prev * (c.dt / (1 - alpha))
    u = leaky_integrate(drive, tau_m, c.dt, o0=state.u)
    return (u, SRNNState(u[-1], eta[-1], s[-1])) if return_state else u


def _time_constant(module: nn.Module, name: str, value: torch.Tensor, trainable: bool) -> None:
    """Registers ``name`` as a parameter if it trains, else as a (persistent) buffer."""
    if trainable:
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


class NetworkState(NamedTuple):
    """An AdaptiveSRNN's state between two ``stream`` calls: ``layers``, one SRNNState per
    hidden layer (recurrent, then dense); ``readout``: the integrator's o [B, C], the spiking
    readout's SRNNState, or for the membrane readout (its scan's SRNNState, its membrane
    trace's SRNNState)."""

    layers: tuple
    readout: object


class SRNNLayer(nn.Module):
    """A recurrent layer of spiking (or relu) neurons with trainable time constants.

    Parameters: ``input.weight`` [H, I] (Xavier-uniform), ``input.bias`` [H] (zeros),
    ``w_rec`` [H, H] (orthogonal, or zeros with ``rec_init="zeros"``; absent when
    ``recurrent=False``), ``tau_m`` [H] ~ N(20, 5), ``tau_adp`` [H] ~ N(150, 10).
    ``forward(x, state=None) -> (s, SRNNState)`` with x of shape [T, B, I] ([B, T, I] if batch_first,
    [T, I] unbatched) and s shaped alike.
    Without a state it starts from u ~ U(0, 1) in training (``init_state="uniform"``), in
    training and evaluation (``"uniform_always"``; drawn from torch's global RNG, so seed it
    for a repeatable evaluation), from u ~ U(0, b0) in both (``"uniform_b0"``), else from
    u = 0; always with eta = b0 and s = 0.
    ``train_tau``: which time constants are parameters ("all", "m": tau_m only, "adp":
    tau_adp only, "none"); the others are buffers that keep their initial values (same
    state_dict keys).
    """

    def __init__(self, input_size: int, hidden_size: int, *, neuron: str = "adaptive", batch_first: bool = False,
                 backend: str = "auto", bias: bool = True, recurrent: bool = True, b0: float = 0.01, beta=None,
                 dt: float = 1.0, r_m: float = 1.0, surrogate: str = "gaussian", sigma: float = 0.5,
                 gamma: float = 0.5, tau_m_init=(20.0, 5.0), tau_adp_init=(150.0, 10.0),
                 init_state: str = "uniform", train_tau: str = "all", rec_init: str = "orthogonal",
                 device=None, dtype=None):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        self.config = check_config(neuron, b0, beta, dt, r_m, surrogate, sigma, gamma)
        self.backend = check_backend(backend)
        self.init_state = _choice("init_state", init_state, INIT_STATES)
        self.train_tau = _choice("train_tau", train_tau, TRAIN_TAU)
        self.rec_init = _choice("rec_init", rec_init, REC_INITS)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.batch_first = batch_first
        factory = {"device": device, "dtype": dtype}
        self.input = nn.Linear(input_size, hidden_size, bias=bias, **factory)
        if recurrent:
            self.w_rec = nn.Parameter(torch.empty(hidden_size, hidden_size, **factory))
        else:  # a feed-forward spiking layer: the scan with W_rec = 0
            self.register_buffer("w_rec", torch.zeros(hidden_size, hidden_size, **factory), persistent=False)
        _time_constant(self, "tau_m", torch.empty(hidden_size, **factory), train_tau in ("all", "m"))
        _time_constant(self, "tau_adp", torch.empty(hidden_size, **factory), train_tau in ("all", "adp"))
        self.tau_m_init, self.tau_adp_init = tau_m_init, tau_adp_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.input.weight)
        if self.input.bias is not None:
            nn.init.zeros_(self.input.bias)
        if isinstance(self.w_rec, nn.Parameter):
            (nn.init.orthogonal_ if self.rec_init == "orthogonal" else nn.init.zeros_)(self.w_rec)
        _normal_init(self.tau_m, self.tau_m_init, floor=self.config.dt)
        _normal_init(self.tau_adp, self.tau_adp_init, floor=self.config.dt)

    def scan_options(self) -> dict:
        """The keyword arguments of srnn_scan / srnn_layer that this layer was configured with."""
        c = self.config
        return dict(neuron=c.neuron, b0=c.b0, beta=c.beta, dt=c.dt, r_m=c.r_m, surrogate=c.surrogate, sigma=c.sigma,
                    gamma=c.gamma, backend=self.backend)

    def initial_state(self, batch: int) -> SRNNState:
        w = self.w_rec
        if self.init_state == "uniform_always" or (self.training and self.init_state == "uniform"):
            u = torch.rand(batch, self.hidden_size, device=w.device, dtype=w.dtype)
        elif self.init_state == "uniform_b0":
            u = torch.rand(batch, self.hidden_size, device=w.device, dtype=w.dtype) * self.config.b0
        else:
            u = w.new_zeros(batch, self.hidden_size)
        return SRNNState(u, torch.full_like(u, self.config.b0), torch.zeros_like(u))

    def forward(self, x: torch.Tensor, state=None):
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [T, B, {self.input_size}] ([B, T, {self.input_size}] with batch_first, "
                             f"or [T, {self.input_size}] unbatched); got {got}")
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        if state is None:
            state = self.initial_state(x.shape[1])
        elif unbatched:
            state = SRNNState(*(t.unsqueeze(0) for t in state))
        s, state = srnn_layer(x, self.input.weight, self.input.bias, self.w_rec, self.tau_m, self.tau_adp, state,
                              **self.scan_options())
        if unbatched:
            return s.squeeze(1), SRNNState(*(t.squeeze(0) for t in state))
        return (s.transpose(0, 1) if self.batch_first else s), state

    def extra_repr(self) -> str:
        frozen = "" if self.train_tau == "all" else f", train_tau={self.train_tau!r}"
        zeros = ", rec_init='zeros'" if self.rec_init == "zeros" and isinstance(self.w_rec, nn.Parameter) else ""
        return (f"{self.input_size}, {self.hidden_size}, neuron={self.config.neuron!r}, "
                f"recurrent={isinstance(self.w_rec, nn.Parameter)}, backend={self.backend!r}{frozen}{zeros}")


class AdaptiveSRNN(nn.Module):
    """Stacked recurrent SRNN layers, a readout and a decoder.

    ``readout="integrator"``: o_t = a_o o_{t-1} + (1 - a_o)(W_out h_t + b), a_o = exp(-dt / tau_out),
    tau_out trainable (with tau_m: ``train_tau`` "all" or "m"). ``readout="spiking"``: a feed-forward
    adaptive spiking output layer, o_t its spikes.
    ``readout="membrane"``: the same spiking output layer, o_t its membrane potential u_t (the
    method's ECG network: the output neurons spike and reset, and their membrane is the logit).
    ``decode``: "count" (sum of output spikes; spiking readout only), "last" (o_T), "max" / "mean"
    over t, or "per_step" (o_t for every step: [T, B, C], or [B, T, C] with batch_first).
    ``dense_sizes``: feed-forward spiking layers (W_rec = 0) of these widths after the recurrent
    ones (the method's PS-MNIST network: recurrent 64 and 256, then a dense layer of 256); they
    are in ``layers`` after the recurrent ones.
    ``forward(x) -> logits [B, C]``; ``forward(x, return_spikes=True)`` also returns the list
    of every hidden layer's output s [T, B, H] (time-major).
    """

    def __init__(self, input_size: int, hidden_sizes, output_size: int, *, neuron: str = "adaptive",
                 readout: str = "integrator", decode: str = "mean", batch_first: bool = False,
                 backend: str = "auto", tau_out_init=(20.0, 5.0), dense_sizes=(), device=None, dtype=None,
                 **layer_kwargs):
        super().__init__()
        if isinstance(hidden_sizes, int):
            hidden_sizes = [hidden_sizes]
        hidden_sizes = list(hidden_sizes)
        if not hidden_sizes:
            raise ValueError("hidden_sizes must name at least one recurrent layer")
        dense_sizes = [dense_sizes] if isinstance(dense_sizes, int) else list(dense_sizes)
        if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
            raise ValueError(f"output_size must be a positive int; got {output_size!r}")
        self.readout = _choice("readout", readout, READOUTS)
        self.decode = _choice("decode", decode, DECODERS)
        if decode == "count" and readout != "spiking":
            raise ValueError('decode="count" counts output spikes and needs readout="spiking"')
        self.batch_first = batch_first
        factory = {"device": device, "dtype": dtype}
        sizes = [input_size] + hidden_sizes + dense_sizes
        ff_kwargs = {k: v for k, v in layer_kwargs.items() if k != "recurrent"}  # dense and readout layers
        self.layers = nn.ModuleList(
            [SRNNLayer(i, h, neuron=neuron, backend=backend, **layer_kwargs, **factory)
             for i, h in zip(sizes, hidden_sizes)] +
            [SRNNLayer(i, h, neuron=neuron, backend=backend, recurrent=False, **ff_kwargs, **factory)
             for i, h in zip(sizes[len(hidden_sizes):], dense_sizes)])
        self.dt = self.layers[0].config.dt
        if readout == "integrator":
            self.output = nn.Linear(sizes[-1], output_size, **factory)
            nn.init.xavier_uniform_(self.output.weight)
            nn.init.zeros_(self.output.bias)
            _time_constant(self, "tau_out", torch.empty(output_size, **factory),
                           isinstance(self.layers[0].tau_m, nn.Parameter))  # trains with tau_m
            _normal_init(self.tau_out, tau_out_init, floor=self.dt)
        else:
            out_kwargs = {k: v for k, v in ff_kwargs.items() if k != "neuron"}
            self.output = SRNNLayer(sizes[-1], output_size, neuron="adaptive", backend=backend,
                                    recurrent=False, **out_kwargs, **factory)

    def forward(self, x: torch.Tensor, return_spikes: bool = False):
        o, hidden, _, _ = self._run(x, None)
        if self.decode == "count":
            logits = o.sum(0)
        elif self.decode == "last":
            logits = o[-1]
        elif self.decode == "max":
            logits = o.max(0).values
        elif self.decode == "mean":
            logits = o.mean(0)
        else:
            logits = o.transpose(0, 1) if self.batch_first else o
        return (logits, hidden) if return_spikes else logits

    def stream(self, x: torch.Tensor, state: "NetworkState" = None, return_spikes: bool = False):
        """The readout o_t at every step of ``x`` (laid out as forward's x and its per_step
        logits, whatever the decoder) and the NetworkState after the last step; passing that
        state to the next call continues the sequence. Without a state it starts as forward
        does. Chunks give what forward gives on their concatenation (decode="per_step"), bit
        for bit when every chunk but the last is a multiple of INTEGRATE_BLOCK steps (the
        readout integrates in blocks of that many steps; otherwise they differ by rounding, a
        few float eps of the largest |o_t|: tests/test_modules.py holds them to INTEGRATE_BLOCK eps).
        ``return_spikes``: also the spikes [T, B, H] (time-major) of every spiking layer,
        the hidden layers' then the readout's where it spikes.
        """
        o, hidden, s_out, state = self._run(x, state)
        o = o.transpose(0, 1) if self.batch_first else o
        if not return_spikes:
            return o, state
        return o, state, hidden + ([] if s_out is None else [s_out])

    def _run(self, x: torch.Tensor, state):
        """(o [T, B, C], hidden spikes, readout spikes or None, NetworkState) from ``state``
        (None: the initial states)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [T, B, input] ([B, T, input] with batch_first); got {got}")
        if state is not None and (not isinstance(state, NetworkState) or len(state.layers) != len(self.layers)):
            raise ValueError(f"state must be the NetworkState of a previous stream() call of this network "
                             f"({len(self.layers)} layer states); got {type(state).__name__}")
        # Time-major and contiguous once here: the layers would each copy a strided view (the
        # fused layer's forward and again its backward).
        h = x.transpose(0, 1).contiguous() if self.batch_first else x
        hidden, layer_states = [], []
        for i, layer in enumerate(self.layers):
            h, st = layer(h, None if state is None else state.layers[i])  # layers are time-major
            hidden.append(h)
            layer_states.append(st)
        carried = None if state is None else state.readout
        if self.readout == "integrator":
            o = leaky_integrate(self.output(h), self.tau_out, self.dt, o0=carried)
            s_out, readout_state = None, o[-1]
        elif self.readout == "spiking":
            o, readout_state = self.output(h, carried)
            s_out = o
        else:  # the scan's state and the trace's (which rounds differently) are both carried
            out = self.output
            x_proj = out.input(h)
            scan_state, trace_state = (out.initial_state(h.shape[1]),) * 2 if carried is None else carried
            s_out, scan_state = srnn_scan(x_proj, out.w_rec, out.tau_m, out.tau_adp, scan_state,
                                          **out.scan_options())
            o, trace_state = membrane_trace(s_out, x_proj, out.tau_m, out.tau_adp, trace_state, out.config,
                                            return_state=True)
            readout_state = (scan_state, trace_state)
        return o, hidden, s_out, NetworkState(tuple(layer_states), readout_state)
