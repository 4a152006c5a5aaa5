"""Energy model: each formula against hand-computed numbers, measured counts against brute force."""
import math

import pytest
import torch

from srnn_fast import AdaptiveSRNN, srnn_scan
from srnn_fast.energy import (EnergyCosts, OpCounts, SpikeCounter, compare_table, estimate_energy, estimate_ops,
                              firing_rates, layer_energy, layer_ops, measure_ops, network_layers)

# m = 4, n = 36 (the ECG network), E_MAC = 4.6 pJ, E_AC = 0.9 pJ; worked by hand:
#   mn = 144, nn = 1296, mn + nn = 1440
#   lif      1440 * 0.9 * 0.1                                    = 129.6
#   adaptive 129.6 + 2*36 * 0.9 * 0.1 + 2*36 * 4.6 = 129.6 + 6.48 + 331.2 = 467.28
#   rnn      1440 * 4.6                                          = 6624
#   relu     (1440 + 144) * 4.6 = 1584 * 4.6                     = 7286.4
#   lstm     (576 + 5184 + 108) * 4.6 = 5868 * 4.6               = 26992.8
#   bilstm   2 * 26992.8                                         = 53985.6
#   gru      (432 + 3888 + 108) * 4.6 = 4428 * 4.6               = 20368.8
HAND = {"lif": 129.6, "adaptive": 467.28, "rnn": 6624.0, "relu": 7286.4, "lstm": 26992.8, "bilstm": 53985.6,
        "gru": 20368.8}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_formula_hand_computed(kind):
    assert layer_energy(kind, 4, 36, fr=0.1) == pytest.approx(HAND[kind], rel=1e-12)


def test_formula_separate_rates_costs_and_no_recurrence():
    # m = 3, n = 2, input rate 0.5, own rate 0.25:
    #   AC = mn fr_in + nn fr + 2n fr = 6*.5 + 4*.25 + 4*.25 = 5;  MAC = 2n = 4
    ops = layer_ops("adaptive", 3, 2, fr=0.25, fr_in=0.5)
    assert (ops.mac, ops.ac) == (4, 5)
    assert ops.energy(EnergyCosts(e_mac=2.0, e_ac=1.0)) == 13.0
    # without W_rec: AC = 3 + 1 = 4; lif has no state cost: AC = 3 + 1 = 4 with recurrence
    assert layer_ops("adaptive", 3, 2, fr=0.25, fr_in=0.5, recurrent=False) == OpCounts(mac=4, ac=4)
    assert layer_ops("lif", 3, 2, fr=0.25, fr_in=0.5) == OpCounts(mac=0, ac=4)
    # analog inputs (S-MNIST RBF): the mn synapses are MACs, dense: MAC = 6 + 4, AC = 1 + 1
    assert layer_ops("adaptive", 3, 2, fr=0.25, input_spikes=False) == OpCounts(mac=10, ac=2)
    # readouts: integrator on spikes = mn AC fr + n MAC; linear = mn MAC
    assert layer_ops("integrator", 3, 2, fr_in=0.5) == OpCounts(mac=2, ac=3)
    assert layer_ops("linear", 3, 2) == OpCounts(mac=6)


def test_network_estimate_from_config():
    cfg = {"task": "ecg", "model": "adaptive", "input_size": 4, "hidden_sizes": [36], "num_classes": 6,
           "readout": "integrator", "decode": "per_step", "data": {}}
    # hidden 467.28 + readout (36*6*0.1 AC + 6 MAC = 21.6*0.9 + 27.6 = 47.04), times T = 10
    assert estimate_energy(cfg, fr=0.1, T=10) == pytest.approx(10 * (467.28 + 47.04))
    # Bi-LSTM: the second layer sees both directions (m = 2 * 5); readout once (decode "last")
    bi = {"task": "shd", "model": "bilstm", "input_size": 7, "hidden_sizes": [5, 3], "num_classes": 2,
          "readout": "linear", "decode": "last"}
    layers = network_layers(bi)
    assert [(l.m, l.n, l.per_step) for l in layers] == [(7, 5, True), (10, 3, True), (6, 2, False)]
    lstm = lambda m, n: 4 * m * n + 4 * n * n + 3 * n  # noqa: E731
    ops = estimate_ops(layers, T=4)
    assert sum(o.mac for o in ops) == 4 * 2 * (lstm(7, 5) + lstm(10, 3)) + 6 * 2
    # S-MNIST RBF input is analog: MACs in the first layer; per-layer rates for the rest
    sm = {"task": "smnist", "model": "lif", "input_size": 80, "hidden_sizes": [120, 100], "num_classes": 10,
          "readout": "spiking", "decode": "count", "data": {"encoding": "rbf"}}
    a, b, r = estimate_ops(network_layers(sm), fr_layers=[0.5, 0.25], fr_readout=0.125)
    assert a == OpCounts(mac=80 * 120, ac=120 * 120 * 0.5)
    assert b == OpCounts(ac=120 * 100 * 0.5 + 100 * 100 * 0.25)
    assert r == OpCounts(mac=2 * 10, ac=100 * 10 * 0.25 + 2 * 10 * 0.125)  # adaptive, feed-forward
    # dense_sizes: feed-forward hidden layers after the recurrent ones, fed by spikes
    ps = {"task": "psmnist", "model": "adaptive", "input_size": 4, "hidden_sizes": [64, 256], "dense_sizes": [32],
          "num_classes": 10, "readout": "spiking", "decode": "count", "data": {"encoding": "sliding"}}
    layers = network_layers(ps)
    assert [(l.name, l.m, l.n, l.recurrent, l.input_spikes) for l in layers] == [
        ("layer0", 4, 64, True, True), ("layer1", 64, 256, True, True), ("layer2", 256, 32, False, True),
        ("readout", 32, 10, False, True)]
    d = estimate_ops(layers, fr_layers=[0.5, 0.25, 0.125], fr_readout=0.0625)[2]
    assert d == OpCounts(mac=2 * 32, ac=256 * 32 * 0.25 + 2 * 32 * 0.125)


def test_formula_errors():
    with pytest.raises(ValueError, match="kind"):
        layer_ops("transformer", 3, 2)
    with pytest.raises(ValueError, match="fr"):
        layer_ops("lif", 3, 2)
    with pytest.raises(ValueError, match=r"must be a firing rate in \[0, 1\]"):
        layer_ops("lif", 3, 2, fr=1.5)
    with pytest.raises(ValueError, match="n must be a positive int"):
        layer_ops("rnn", 3, 0)
    with pytest.raises(ValueError, match="e_mac"):
        EnergyCosts(e_mac=-1.0)
    with pytest.raises(ValueError, match="one rate per hidden layer"):
        estimate_ops(network_layers({"model": "lif", "input_size": 2, "hidden_sizes": [3, 3], "num_classes": 2}),
                     fr_layers=[0.1])


def test_firing_rates():
    a = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])   # [T 2, B 1, H 2]: 3 spikes / 4
    b = torch.zeros(2, 1, 6)                          # 0 spikes / 12
    overall, per_layer = firing_rates([a, b])
    assert per_layer == [0.75, 0.0]
    assert overall == 3 / 16
    counter = SpikeCounter()
    counter.add([a[:1], b[:1]])
    counter.add([a[1:], b[1:]])
    assert counter.rates() == (overall, per_layer)


def brute_force(layers, readout, x):
    """Explicit loops over the recorded activity. layers: [(neuron, recurrent, n)], x [T, B, m]."""
    mac = ac = 0
    per_layer = []
    h = x
    for neuron, recurrent, layer in layers:
        s, _ = layer(h)
        T, B, m = h.shape
        n = s.shape[-1]
        lm = la = 0
        for t in range(T):
            for b in range(B):
                for j in range(m):
                    v = h[t, b, j].item()
                    if v != 0:  # one accumulate per postsynaptic neuron
                        if v == 1:
                            la += n
                        else:
                            lm += n
                if neuron == "adaptive":
                    lm += 2 * n  # membrane and adaptation decay
                for j in range(n):
                    if t > 0 and s[t - 1, b, j].item() != 0:
                        if recurrent:
                            if neuron == "relu":
                                lm += n
                            else:
                                la += n
                        if neuron == "adaptive":
                            la += 2  # threshold increment and reset
                if neuron == "relu":
                    lm += 4 * n
        per_layer.append((lm, la))
        h = s
    T, B, m = h.shape
    if readout is not None:  # leaky integrator on the last layer's output
        C = readout.out_features
        lm = la = 0
        for t in range(T):
            for b in range(B):
                lm += C
                for j in range(m):
                    v = h[t, b, j].item()
                    if v != 0:
                        la, lm = (la + C, lm) if v == 1 else (la, lm + C)
        per_layer.append((lm, la))
    return per_layer


@pytest.mark.parametrize("neuron,readout,analog", [("adaptive", "integrator", False), ("lif", "integrator", True),
                                                   ("adaptive", "spiking", True), ("lif", "membrane", False),
                                                   ("relu", "integrator", True)],
                         ids=["adaptive-spikes", "lif-analog", "adaptive-spiking-readout", "lif-membrane-readout", "relu"])
def test_measured_counts_match_brute_force(neuron, readout, analog):
    torch.manual_seed(0)
    T, B, I = 9, 3, 5
    # layer 1 dense (feed-forward): no recurrent synapses to count
    net = AdaptiveSRNN(I, [6], 3, dense_sizes=[4], neuron=neuron, readout=readout, decode="mean",
                       batch_first=True, backend="reference", init_state="zeros", dtype=torch.float64)
    with torch.no_grad():  # strong weights so that every layer fires
        for layer in net.layers:
            layer.input.weight.mul_(4.0)
            layer.tau_m.fill_(3.0)
    x = torch.rand(B, T, I, dtype=torch.float64) if analog else (torch.rand(B, T, I) < 0.4).double()
    x[x < 0.3] = 0  # analog inputs have zeros too: they trigger nothing
    counts = measure_ops(net, [(x[:2], None), (x[2:], None)])  # two batches are summed
    net.eval()
    layers = [(neuron, i == 0, l) for i, l in enumerate(net.layers)]
    if readout != "integrator":  # a feed-forward adaptive spiking layer
        layers.append(("adaptive", False, net.output))
    expected = brute_force(layers, net.output if readout == "integrator" else None, x.transpose(0, 1))
    assert [c.name for c in counts] == ["layer0", "layer1", "readout"]
    assert [(c.ops.mac, c.ops.ac) for c in counts] == expected
    assert all(c.steps == T * B for c in counts)
    assert sum(c.out_events for c in counts[:2]) > 0  # the comparison is not between empty counts
    if readout == "membrane":  # the counted output spikes are those of the scan inside forward
        h = x.transpose(0, 1)
        for layer in net.layers:
            h, _ = layer(h)
        out = net.output
        s, _ = srnn_scan(out.input(h), out.w_rec, out.tau_m, out.tau_adp, out.initial_state(B), **out.scan_options())
        assert counts[-1].out_events == s.count_nonzero().item() > 0


def test_compare_table_rows():
    torch.manual_seed(1)
    cfg = {"task": "ecg", "model": "adaptive", "input_size": 4, "hidden_sizes": [8], "num_classes": 3,
           "readout": "integrator", "decode": "per_step", "data": {}}
    net = AdaptiveSRNN(4, [8], 3, decode="per_step", batch_first=True, backend="reference")
    x = (torch.rand(2, 20, 4) < 0.3).float()
    counts = measure_ops(net, [x])
    table = compare_table(counts, cfg, fr=0.05)
    lines = table.splitlines()
    assert len(lines) == 2 + 2 + 1 and lines[-1].startswith("| total")
    measured = sum(c.ops.energy() / c.steps for c in counts)
    assert f"{measured:.1f}" in lines[-1]
    # the method's column: the single Fr = 0.05 everywhere, summed over the layer and the readout
    single = (layer_energy("adaptive", 4, 8, fr=0.05) + layer_energy("integrator", 8, 3, fr_in=0.05))
    assert f"{single:.1f}" in lines[-1]
    assert math.isfinite(measured) and measured > 0
