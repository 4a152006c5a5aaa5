r"""Theoretical energy of recurrent networks, measured firing rates and synaptic-operation counts.

The method's estimate, per layer and per time step, for a layer of n neurons with m inputs
(E_MAC, E_AC: energy of one multiply-accumulate and of one accumulate; Fr: firing rate,
spikes per neuron per time step)::

    LIF spiking layer            (mn + nn) E_AC Fr
    adaptive spiking layer       (mn + nn) E_AC Fr + 2n E_AC Fr + 2n E_MAC
    vanilla RNN                  (mn + nn) E_MAC
    non-spiking adaptive (relu)  (mn + nn + 4n) E_MAC
    LSTM                         (4mn + 4nn + 3n) E_MAC
    Bi-LSTM                      2 (4mn + 4nn + 3n) E_MAC
    GRU                          (3mn + 3nn + 3n) E_MAC    (not in the method: the natural extension)

A spike costs accumulates, not multiply-accumulates, because the weight is added as is;
only the synapses of neurons that spiked are touched, hence the factor Fr. Which Fr: a
synapse is triggered by its *presynaptic* neuron, so the mn term takes the firing rate of
the layer's inputs (the previous layer's spikes, or the input spikes of ECG / SHD /
Poisson-encoded MNIST) and the nn term and the 2n E_AC Fr of the adaptive neuron (the
threshold increment and the reset caused by its own spike) take the layer's own rate. The
method itself uses one overall Fr everywhere: pass ``fr`` only to get exactly that. An
analog input (S-MNIST with the "analog" or "rbf" encoding: real values, not spikes) has
no Fr: each of its mn synapses costs a MAC at every step. Without recurrence (a
feed-forward spiking layer) the nn term is dropped. The 2n E_MAC of the adaptive neuron
are the decays of its membrane and of its adaptation variable.

Beyond the method, the readout is counted as a layer of its own (m = last hidden width,
n = classes): the leaky integrator costs its m n synapses (AC x Fr on spikes, MAC on
analog values) plus n MAC for the decay; a spiking readout is a feed-forward adaptive
layer; the baselines' linear readout costs m n MAC at every step when it decodes every
step, once per sequence when it decodes only the last step.

The measured mode (:func:`measure_ops`) runs a trained AdaptiveSRNN on real inputs,
records every layer's input and output, and counts the operations actually triggered:
each nonzero presynaptic value at step t (an input, or a spike s_{t-1} on the recurrent
path) triggers one accumulate per postsynaptic neuron (its fan-out column of W_in or
W_rec): an AC when that value is a spike, a MAC when it is analog; plus the per-neuron
state updates under the same convention as the formula (:data:`NEURON_STATE_OPS`).

Energies are in picojoules; defaults for 45 nm CMOS, 32-bit float (Horowitz, ISSCC 2014).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

E_MAC_PJ = 4.6  # 32-bit float multiply (3.7 pJ) + add (0.9 pJ), 45 nm
E_AC_PJ = 0.9   # 32-bit float add, 45 nm

SPIKING = ("adaptive", "lif")
MODELS = ("adaptive", "lif", "relu", "rnn", "lstm", "gru", "bilstm")  # config["model"] of a run
KINDS = MODELS + ("integrator", "linear")  # the readouts
# Per neuron and time step: (MACs, ACs per own spike) for the neuron's internal state.
# adaptive: membrane and adaptation decays; each spike increments eta and resets u. The
# method counts nothing for LIF; "relu" (non-spiking adaptive) has its 4n MACs.
NEURON_STATE_OPS = {"adaptive": (2, 2), "lif": (0, 0), "relu": (4, 0)}


@dataclass(frozen=True)
class EnergyCosts:
    """Energy per operation in pJ; defaults: 45 nm CMOS, 32-bit float (Horowitz 2014)."""

    e_mac: float = E_MAC_PJ
    e_ac: float = E_AC_PJ

    def __post_init__(self):
        for name in ("e_mac", "e_ac"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number of pJ; got {v!r}")


@dataclass(frozen=True)
class OpCounts:
    """Multiply-accumulates and accumulates (may be fractional: expected counts)."""

    mac: float = 0.0
    ac: float = 0.0

    def __add__(self, other: "OpCounts") -> "OpCounts":
        return OpCounts(self.mac + other.mac, self.ac + other.ac)

    def __mul__(self, k: float) -> "OpCounts":
        return OpCounts(self.mac * k, self.ac * k)

    __rmul__ = __mul__

    def energy(self, costs: EnergyCosts = EnergyCosts()) -> float:
        """Energy in pJ."""
        return self.mac * costs.e_mac + self.ac * costs.e_ac


@dataclass(frozen=True)
class LayerSpec:
    """One layer for the estimate: ``kind`` in KINDS, m inputs, n neurons.

    ``recurrent``: has W_rec (spiking kinds). ``input_spikes``: its inputs are spikes (else
    analog values: MACs, no Fr). ``per_step``: False for a readout applied once per sequence.
    """

    name: str
    kind: str
    m: int
    n: int
    recurrent: bool = True
    input_spikes: bool = True
    per_step: bool = True


def _rate(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:  # NaN fails too
        raise ValueError(f"{name} must be a firing rate in [0, 1] (spikes per neuron per step); got {v!r}")
    return float(v)


def layer_ops(kind: str, m: int, n: int, *, fr: Optional[float] = None, fr_in: Optional[float] = None,
              recurrent: bool = True, input_spikes: bool = True) -> OpCounts:
    """Operations per time step of one layer (the method's formulas; see the module docstring).

    ``fr``: the layer's own firing rate (spiking kinds; also the readout's rate for a
    spiking readout); ``fr_in``: the rate of its input spikes, ``None`` = ``fr`` (the
    method's single Fr). ``input_spikes=False``: analog inputs, mn MACs.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    for name, v in (("m", m), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    mn, nn_ = m * n, n * n
    if kind in SPIKING or kind == "integrator":
        if input_spikes:
            if fr_in is None and fr is None:
                raise ValueError(f"a {kind!r} layer with spike inputs needs fr (or fr_in), the firing rate")
            syn = OpCounts(ac=mn * _rate("fr_in", fr_in if fr_in is not None else fr))
        else:
            syn = OpCounts(mac=mn)
        if kind == "integrator":
            return syn + OpCounts(mac=n)
        if fr is None:
            raise ValueError(f"a {kind!r} layer needs fr, its own firing rate")
        fr = _rate("fr", fr)
        if recurrent:
            syn = syn + OpCounts(ac=nn_ * fr)
        state_mac, ac_per_spike = NEURON_STATE_OPS[kind]
        return syn + OpCounts(mac=state_mac * n, ac=ac_per_spike * n * fr)
    rec = nn_ if recurrent else 0
    if kind == "relu":
        return OpCounts(mac=mn + rec + NEURON_STATE_OPS["relu"][0] * n)
    if kind == "rnn":
        return OpCounts(mac=mn + rec)
    if kind == "linear":
        return OpCounts(mac=mn)
    if kind == "gru":
        return OpCounts(mac=3 * mn + 3 * rec + 3 * n)
    one_dir = 4 * mn + 4 * rec + 3 * n  # lstm; a bilstm runs two of them
    return OpCounts(mac=(2 if kind == "bilstm" else 1) * one_dir)


def layer_energy(kind: str, m: int, n: int, *, costs: EnergyCosts = EnergyCosts(), **kw) -> float:
    """Energy in pJ per time step of one layer: ``layer_ops(...).energy(costs)``."""
    return layer_ops(kind, m, n, **kw).energy(costs)


# ---------------------------------------------------------------------------------------
# Networks described by a run's config.json
# ---------------------------------------------------------------------------------------
SPIKE_INPUT_TASKS = ("ecg", "shd")
SPIKE_ENCODINGS = ("poisson", "sliding")


def input_is_spikes(config: dict) -> bool:
    """ECG (level crossings) and SHD are spikes; MNIST with the Poisson encoding and the
    sliding window of binarised pixels (0 / 1: an addition per active input, as measure_ops
    counts it); the RBF population, analog pixels and pixel windows are real values."""
    if str(config.get("task", "")).lower() in SPIKE_INPUT_TASKS:
        return True
    encoding = (config.get("data") or {}).get("encoding", config.get("encoding", ""))
    return str(encoding).lower() in SPIKE_ENCODINGS


def network_layers(config: dict) -> list:
    """LayerSpecs (hidden layers, then the readout) of the network a run's config describes.

    Uses the keys model, input_size, hidden_sizes, num_classes, and where present
    dense_sizes, readout, decode, recurrent, task, data.encoding (the run folders of
    srnn_fast.train); dense layers are feed-forward hidden layers after the recurrent ones.
    """
    for key in ("model", "input_size", "hidden_sizes", "num_classes"):
        if key not in config:
            raise KeyError(f"config needs {key!r} to describe the network; has {sorted(config)}")
    model = config["model"]
    if model not in MODELS:
        raise ValueError(f"config['model'] must be one of {', '.join(map(repr, MODELS))}; got {model!r}")
    hidden = config["hidden_sizes"]
    hidden = [hidden] if isinstance(hidden, int) else list(hidden)
    recurrent = bool(config.get("recurrent", True))
    spikes_in = input_is_spikes(config)
    dirs = 2 if model == "bilstm" else 1
    layers, m, spiking = [], int(config["input_size"]), model in SPIKING
    for i, n in enumerate(hidden):
        layers.append(LayerSpec(f"layer{i}", model, m, int(n), recurrent=recurrent if spiking or model == "relu"
                                else True, input_spikes=spikes_in if i == 0 else spiking))
        m = int(n) * dirs
    for n in config.get("dense_sizes") or []:
        layers.append(LayerSpec(f"layer{len(layers)}", model, m, int(n), recurrent=False, input_spikes=spiking))
        m = int(n)
    C = int(config["num_classes"])
    if spiking or model == "relu":
        readout = config.get("readout", "integrator")
        kind = "adaptive" if readout in ("spiking", "membrane") else "integrator"
        layers.append(LayerSpec("readout", kind, m, C, recurrent=False, input_spikes=spiking))
    else:
        layers.append(LayerSpec("readout", "linear", m, C, recurrent=False, input_spikes=False,
                                per_step=config.get("decode", "last") == "per_step"))
    return layers


def estimate_ops(layers: Sequence[LayerSpec], *, fr: Optional[float] = None, fr_layers: Optional[Sequence] = None,
                 fr_input: Optional[float] = None, fr_readout: Optional[float] = None, T: int = 1) -> list:
    """OpCounts per sample for each layer over T steps (a once-per-sequence readout once).

    With ``fr`` only: the method's single overall Fr for every spike. With ``fr_layers``
    (one rate per hidden layer): each synapse takes its presynaptic layer's rate; the
    input spikes take ``fr_input`` (default ``fr``, else the first layer's rate); a spiking
    readout takes ``fr_readout`` (default its input's rate; 0 after non-spiking layers).
    """
    hidden = [l for l in layers if l.name != "readout"]
    if fr_layers is not None:
        fr_layers = [float(f) for f in fr_layers]
        if len(fr_layers) != len(hidden):
            raise ValueError(f"fr_layers needs one rate per hidden layer ({len(hidden)}); got {len(fr_layers)}")
    elif fr is not None:
        fr_layers = [float(fr)] * len(hidden)
    elif any(l.kind in SPIKING for l in hidden):
        raise ValueError("a spiking network needs fr (overall firing rate) or fr_layers (one per hidden layer)")
    if fr_input is None and fr_layers:
        fr_input = fr if fr is not None else fr_layers[0]
    out, prev = [], fr_input
    for i, l in enumerate(layers):
        own = fr_layers[i] if fr_layers is not None and i < len(fr_layers) else None
        if l.name == "readout":
            own = fr_readout if fr_readout is not None else (prev or 0.0)
        ops = layer_ops(l.kind, l.m, l.n, fr=own, fr_in=prev, recurrent=l.recurrent, input_spikes=l.input_spikes)
        out.append(ops * (T if l.per_step else 1))
        prev = own
    return out


def estimate_energy(config: dict, *, costs: EnergyCosts = EnergyCosts(), T: int = 1, **rates) -> float:
    """Energy in pJ per sample over T steps of the network of ``config``: sum over layers."""
    return sum(o.energy(costs) for o in estimate_ops(network_layers(config), T=T, **rates))


# ---------------------------------------------------------------------------------------
# Measured firing rates and operation counts
# ---------------------------------------------------------------------------------------
def firing_rates(spikes: Sequence[torch.Tensor]):
    """Spikes per neuron per time step: ``(overall, [per layer])`` as Python floats.

    ``spikes``: one tensor per layer, [T, B, H] (any layout: every element is one neuron at
    one step). ``overall`` weights each layer by its number of neurons (total spikes over
    total neuron-steps), i.e. the rate of an average neuron of the network. Sums over
    several batches: add their totals, see :class:`SpikeCounter`.
    """
    if not spikes:
        raise ValueError("spikes must hold at least one layer's [T, B, H] tensor")
    per_layer = [float(s.detach().float().mean()) for s in spikes]
    total = sum(float(s.detach().float().sum()) for s in spikes)
    return total / sum(s.numel() for s in spikes), per_layer


class SpikeCounter:
    """Accumulates firing rates over batches: ``add(spike_list)``, then ``rates()``."""

    def __init__(self):
        self.spikes, self.slots = None, None

    def add(self, spikes: Sequence[torch.Tensor]) -> None:
        sums = [float(s.detach().float().sum()) for s in spikes]
        sizes = [s.numel() for s in spikes]
        if self.spikes is None:
            self.spikes, self.slots = sums, sizes
        else:
            self.spikes = [a + b for a, b in zip(self.spikes, sums)]
            self.slots = [a + b for a, b in zip(self.slots, sizes)]

    def rates(self):
        """``(overall, [per layer])``, as :func:`firing_rates` over everything added."""
        if self.spikes is None:
            raise ValueError("no spikes were added")
        return sum(self.spikes) / sum(self.slots), [s / n for s, n in zip(self.spikes, self.slots)]


@dataclass
class LayerCount:
    """Measured totals of one layer over every sample and step counted."""

    name: str
    kind: str
    m: int
    n: int
    ops: OpCounts
    in_events: float   # nonzero inputs (x_t for t = 1..T)
    rec_events: float  # spikes s_{t-1} on the recurrent path
    out_events: float  # the layer's own nonzero outputs (spikes) s_t
    steps: int         # samples x time steps


def _count_layer(name: str, kind: str, x: torch.Tensor, s: Optional[torch.Tensor], n: int,
                 recurrent: bool) -> LayerCount:
    """x [T, B, m] the layer's input, s [T, B, n] its output (None for the integrator readout)."""
    T, B, m = x.shape
    x_nz = float((x != 0).sum())
    binary_in = bool(((x == 0) | (x == 1)).all())
    ops = OpCounts(ac=x_nz * n) if binary_in else OpCounts(mac=x_nz * n)
    rec = out = 0.0
    if s is not None:
        out = float((s != 0).sum())
        prev = float((s[:-1] != 0).sum())  # s_0 = 0: the spikes s_1..s_{T-1} feed steps 2..T
        if recurrent:
            binary_s = bool(((s == 0) | (s == 1)).all())
            rec = prev
            ops = ops + (OpCounts(ac=prev * n) if binary_s else OpCounts(mac=prev * n))
        state_mac, ac_per_spike = NEURON_STATE_OPS[kind]
        ops = ops + OpCounts(mac=state_mac * n * T * B, ac=ac_per_spike * prev)
    else:  # leaky integrator readout: one decay MAC per output neuron per step
        ops = ops + OpCounts(mac=n * T * B)
    return LayerCount(name, kind, m, n, ops, x_nz, rec, out, T * B)


@torch.no_grad()
def measure_ops(model: nn.Module, batches: Iterable) -> list:
    """Run an AdaptiveSRNN (eval mode) over ``batches`` and count the operations triggered.

    ``batches``: an iterable of inputs x (laid out as the model takes them), or of
    (x, ...) tuples such as a DataLoader's. Returns one :class:`LayerCount` per hidden
    layer, then the readout, with totals over every sample and step (divide ``ops`` by
    ``steps`` for per-step averages).
    """
    from .modules import AdaptiveSRNN, SRNNLayer

    if not isinstance(model, AdaptiveSRNN):
        raise TypeError(f"model must be an srnn_fast.AdaptiveSRNN (the non-spiking baselines execute every "
                        f"MAC of the formula); got {type(model).__name__}")
    mods = [(f"layer{i}", l) for i, l in enumerate(model.layers)] + [("readout", model.output)]
    seen: dict = {}

    def hook(name):
        def record(mod, args, out):
            x = args[0]
            s = out[0] if isinstance(mod, SRNNLayer) else None
            seen[name] = (x, s)
        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in mods]
    totals: dict = {}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            seen.clear()
            model(x.to(next(model.parameters()).device))
            if "readout" not in seen:  # the membrane readout runs its scan without calling the module: call it
                model.output(seen[mods[-2][0]][1])  # on the last layer's spikes, from its own initial state as there
            for name, mod in mods:
                xi, s = seen[name]
                if xi.dim() == 2:  # a module called on [T, I] unbatched input
                    xi, s = xi.unsqueeze(1), (None if s is None else s.unsqueeze(1))
                if isinstance(mod, SRNNLayer):
                    c = _count_layer(name, mod.config.neuron, xi, s, mod.hidden_size,
                                     isinstance(mod.w_rec, nn.Parameter))
                else:
                    c = _count_layer(name, "integrator", xi, None, mod.out_features, False)
                t = totals.get(name)
                totals[name] = c if t is None else LayerCount(
                    name, c.kind, c.m, c.n, t.ops + c.ops, t.in_events + c.in_events, t.rec_events + c.rec_events,
                    t.out_events + c.out_events, t.steps + c.steps)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not totals:
        raise ValueError("batches was empty: nothing to measure")
    return [totals[name] for name, _ in mods]


def compare_table(counts: Sequence[LayerCount], config: dict, *, fr: float, costs: EnergyCosts = EnergyCosts()) -> str:
    """Markdown table, per layer and total: the method's estimate (single Fr), the estimate
    with per-layer measured rates, and the measured counts, all in pJ per sample per step."""
    layers = network_layers(config)
    hidden_counts = [c for c in counts if c.name != "readout"]
    fr_layers = [c.out_events / (c.steps * c.n) for c in hidden_counts]
    first = counts[0]
    fr_input = first.in_events / (first.steps * first.m)
    readout = counts[-1]
    fr_out = readout.out_events / (readout.steps * readout.n) if readout.kind != "integrator" else None
    single = estimate_ops(layers, fr=fr, fr_input=fr)
    per_layer = estimate_ops(layers, fr_layers=fr_layers, fr_input=fr_input, fr_readout=fr_out)
    rows = ["| layer | m | n | input rate | Fr measured | method (single Fr) pJ | per-layer Fr pJ | measured pJ "
            "| measured MAC | measured AC |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    tot = [0.0, 0.0, 0.0]
    for c, a, b in zip(counts, single, per_layer):
        m_ops = c.ops * (1.0 / c.steps)
        vals = (a.energy(costs), b.energy(costs), m_ops.energy(costs))
        tot = [x + y for x, y in zip(tot, vals)]
        rate = "" if c.kind == "integrator" else f"{c.out_events / (c.steps * c.n):.4f}"
        rate_in = c.in_events / (c.steps * c.m)  # nonzero inputs per input channel per step
        rows.append(f"| {c.name} ({c.kind}) | {c.m} | {c.n} | {rate_in:.4f} | {rate} | {vals[0]:.1f} | "
                    f"{vals[1]:.1f} | {vals[2]:.1f} | {m_ops.mac:.1f} | {m_ops.ac:.1f} |")
    rows.append(f"| total | | | | {fr:.4f} | {tot[0]:.1f} | {tot[1]:.1f} | {tot[2]:.1f} | | |")
    return "\n".join(rows)
