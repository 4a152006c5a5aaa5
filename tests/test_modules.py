"""SRNNLayer / AdaptiveSRNN: shapes, decoders, initialisation, streaming, the integrator."""
import math

import pytest
import torch

from srnn_fast import AdaptiveSRNN, SRNNLayer, SRNNState, srnn_scan
from srnn_fast.modules import INTEGRATE_BLOCK, leaky_integrate

T, B, I, C = 17, 3, 5, 4


@pytest.mark.parametrize("readout,decode", [("integrator", "last"), ("integrator", "max"), ("integrator", "mean"),
                                            ("integrator", "per_step"), ("spiking", "count"),
                                            ("spiking", "per_step"), ("membrane", "per_step"),
                                            ("membrane", "mean")])
def test_network_shapes_and_batch_first(readout, decode):
    """Time-major [T, B, I] and batch_first [B, T, I] calls of the same network: the shapes,
    and the same values (per_step logits transposed)."""
    torch.manual_seed(0)
    kw = dict(readout=readout, decode=decode, dtype=torch.float64)
    net = AdaptiveSRNN(I, [8, 6], C, **kw)
    net_bf = AdaptiveSRNN(I, [8, 6], C, batch_first=True, **kw)
    net_bf.load_state_dict(net.state_dict())
    x = torch.rand(T, B, I, dtype=torch.float64) * 3
    torch.manual_seed(1)  # the same random initial membranes in both calls
    logits, hidden = net(x, return_spikes=True)
    torch.manual_seed(1)
    logits_bf, hidden_bf = net_bf(x.transpose(0, 1), return_spikes=True)
    assert logits.shape == ((T, B, C) if decode == "per_step" else (B, C))
    assert [h.shape for h in hidden] == [h.shape for h in hidden_bf] == [(T, B, 8), (T, B, 6)]
    assert all(h.sum() > 0 for h in hidden)  # both layers fire: the values compared depend on them
    assert torch.equal(logits_bf, logits.transpose(0, 1) if decode == "per_step" else logits)
    assert all(torch.equal(a, b) for a, b in zip(hidden_bf, hidden))
    if readout == "spiking" and decode == "count":
        assert torch.equal(logits, logits.round()) and (logits >= 0).all()


def test_count_needs_spiking_readout():
    with pytest.raises(ValueError, match="count"):
        AdaptiveSRNN(I, [8], C, decode="count")


@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
def test_layer_like_lstm(neuron):
    """Like nn.LSTM: batch_first [B, T, I] and unbatched [T, I] calls, with a given state or
    without, give the values of the time-major batched call (transposed, or its batch row)."""
    torch.manual_seed(0)
    layer = SRNNLayer(I, 7, neuron=neuron, dtype=torch.float64)
    layer_bf = SRNNLayer(I, 7, neuron=neuron, batch_first=True, dtype=torch.float64)
    layer_bf.load_state_dict(layer.state_dict())
    # Spike-like input (the kernel's own projection over nonzero inputs): dense input goes through
    # torch's BLAS GEMM, whose rounding depends on the row count and on x's memory alignment.
    x = (torch.rand(T, B, I, dtype=torch.float64) < 0.2).double() * 3
    state = layer.initial_state(B)  # random membranes (training mode)
    s, st = layer(x, state)
    assert s.shape == (T, B, 7) and isinstance(st, SRNNState) and all(t.shape == (B, 7) for t in st)
    assert 0 < float((s != 0).double().mean()) < 1  # values that depend on the input and the state
    s_bf, st_bf = layer_bf(x.transpose(0, 1), state)
    assert torch.equal(s_bf, s.transpose(0, 1)) and all(torch.equal(a, b) for a, b in zip(st_bf, st))
    row = SRNNState(*(t[1] for t in state))  # unbatched: batch row 1 alone, from its state [H]
    s1, st1 = layer(x[:, 1], row)
    assert s1.shape == (T, 7) and isinstance(st1, SRNNState) and all(t.shape == (7,) for t in st1)
    assert torch.equal(s1, s[:, 1]) and all(torch.equal(a, b[1]) for a, b in zip(st1, st))
    s_a, st_a = layer(x[:9, 1], row)  # and streamed: the unbatched state carried on
    s_b, st_b = layer(x[9:, 1], st_a)
    assert torch.equal(torch.cat([s_a, s_b]), s1) and all(torch.equal(a, b) for a, b in zip(st_b, st1))
    torch.manual_seed(2)  # no state: the layer's initial state, drawn as for a batch of one
    s_none, _ = layer(x[:, 1])
    torch.manual_seed(2)
    assert torch.equal(s_none, layer(x[:, 1:2])[0][:, 0])


def test_initialisation():
    torch.manual_seed(0)
    layer = SRNNLayer(20, 400)
    w = layer.w_rec.detach()
    torch.testing.assert_close(w @ w.t(), torch.eye(400), atol=1e-4, rtol=0)  # orthogonal
    assert layer.tau_m.mean().item() == pytest.approx(20, abs=1.0)
    assert layer.tau_m.std().item() == pytest.approx(5, abs=0.7)
    assert layer.tau_adp.mean().item() == pytest.approx(150, abs=2.0)
    assert layer.tau_adp.std().item() == pytest.approx(10, abs=1.5)
    assert (layer.input.bias == 0).all()
    bound = math.sqrt(6 / (20 + 400))
    assert layer.input.weight.abs().max() <= bound
    layer.train()
    st = layer.initial_state(2)
    assert (st.u >= 0).all() and (st.u < 1).all() and st.u.std() > 0
    assert (st.eta == 0.01).all() and (st.s == 0).all()
    layer.eval()
    assert (layer.initial_state(2).u == 0).all()
    assert (SRNNLayer(2, 3, init_state="zeros").initial_state(2).u == 0).all()
    always = SRNNLayer(2, 3, init_state="uniform_always").eval()  # random in evaluation too
    u = always.initial_state(50).u
    assert (u >= 0).all() and (u < 1).all() and u.std() > 0.2
    torch.manual_seed(3)
    first = always.initial_state(4).u
    torch.manual_seed(3)
    assert torch.equal(always.initial_state(4).u, first)  # from torch's global RNG


@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
def test_streaming_equals_one_call(neuron):
    torch.manual_seed(1)
    layer = SRNNLayer(I, 9, neuron=neuron, dtype=torch.float64)
    x = torch.rand(40, B, I, dtype=torch.float64) * 2
    state0 = layer.initial_state(B)
    s_all, st_all = layer(x, state0)
    s_a, st_a = layer(x[:23], state0)
    s_b, st_b = layer(x[23:], st_a)
    torch.testing.assert_close(torch.cat([s_a, s_b]), s_all, rtol=0, atol=0)
    for a, b in zip(st_b, st_all):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the scan itself too
    w, tm, ta = layer.w_rec, layer.tau_m, layer.tau_adp
    xp = layer.input(x)
    s1, st1 = srnn_scan(xp, w, tm, ta, state0, neuron=neuron)
    s2a, st2 = srnn_scan(xp[:5], w, tm, ta, state0, neuron=neuron)
    s2b, st2 = srnn_scan(xp[5:], w, tm, ta, st2, neuron=neuron)
    torch.testing.assert_close(torch.cat([s2a, s2b]), s1, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("readout", ["integrator", "membrane"])
def test_stream_in_chunks_of_any_length(readout, dtype):
    """stream over chunks that are not multiples of INTEGRATE_BLOCK, batch of B: the hidden
    spikes of one forward call, and its per-step logits up to the rounding stream documents."""
    torch.manual_seed(0)
    net = AdaptiveSRNN(I, [16], C, readout=readout, decode="per_step", dtype=dtype)
    with torch.no_grad():
        net.layers[0].input.weight.mul_(3.0)
    x = (torch.rand(400, B, I, dtype=dtype) < 0.2).to(dtype) * 2  # spike-like: no GEMM rounding upstream
    with torch.no_grad():
        torch.manual_seed(1)  # the same random initial membranes in both
        whole, hidden = net(x, return_spikes=True)
        torch.manual_seed(1)
        outs, spikes, state = [], [], None
        for a, b in ((0, 50), (50, 87), (87, 150), (150, 301), (301, 400)):
            o, state, s = net.stream(x[a:b], state, return_spikes=True)
            outs.append(o)
            spikes.append(s[0])
    assert hidden[0].sum() > 0 and torch.equal(torch.cat(spikes), hidden[0])
    err, bound = float((torch.cat(outs) - whole).abs().max()), INTEGRATE_BLOCK * torch.finfo(dtype).eps
    assert err <= bound * float(whole.abs().max()), f"{err:.2e} > {bound:.1e} x max |o_t|"


def test_stream_rejects_a_wrong_state():
    """Only the NetworkState of a previous stream() call of this network, for the same batch."""
    net = AdaptiveSRNN(I, [8, 6], C, decode="per_step")
    x = torch.rand(T, B, I)
    _, state = net.stream(x)
    _, other = AdaptiveSRNN(I, [8], C, decode="per_step").stream(x)  # one layer state, not two
    for bad in (state.layers[0], tuple(state), other):
        with pytest.raises(ValueError, match="state must be the NetworkState of a previous stream"):
            net.stream(x, bad)
    with pytest.raises(ValueError, match=r"state.u must be \[B, H\] = \[2, 8\]"):
        net.stream(x[:, :2], state)


def test_leaky_integrator_matches_loop():
    torch.manual_seed(2)
    y = torch.randn(150, 2, 3, dtype=torch.float64)
    tau = torch.tensor([2.0, 20.0, 200.0], dtype=torch.float64)
    a = torch.exp(-1.0 / tau)
    o, want = torch.zeros(2, 3, dtype=torch.float64), []
    for y_t in y:
        o = a * o + (1 - a) * y_t
        want.append(o)
    torch.testing.assert_close(leaky_integrate(y, tau, chunk=64), torch.stack(want), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leaky_integrate(y, tau, chunk=7), torch.stack(want), rtol=1e-12, atol=1e-12)


def test_tau_out_is_trained():
    net = AdaptiveSRNN(I, [8], C, decode="mean")
    net(torch.rand(T, B, I) * 3).sum().backward()
    assert net.tau_out.grad is not None and net.tau_out.grad.abs().sum() > 0


@pytest.mark.parametrize("neuron", ["adaptive", "lif"])
def test_membrane_readout_matches_stepwise_reference(neuron):
    """readout="membrane" rebuilds u_t from the output spikes; the reference run one step at a
    time gives u_t directly (its final state): values and gradients must agree in float64."""
    from srnn_fast.reference import srnn_scan_ref

    torch.manual_seed(0)
    net = AdaptiveSRNN(I, [8], C, neuron=neuron, readout="membrane", decode="per_step", dtype=torch.float64)
    x = torch.rand(T, B, I, dtype=torch.float64) * 3
    weights = torch.randn(T, B, C, dtype=torch.float64)

    torch.manual_seed(1)
    logits = net(x)
    grads = torch.autograd.grad((logits * weights).sum(), list(net.parameters()))

    torch.manual_seed(1)  # the same initial states, drawn in the same order
    h, _ = net.layers[0](x)
    out = net.output
    state = out.initial_state(B)
    x_proj = out.input(h)
    c = out.config
    us, spikes = [], 0.0
    for t in range(T):
        s, state = srnn_scan_ref(x_proj[t:t + 1], out.w_rec, out.tau_m, out.tau_adp, state, neuron=c.neuron,
                                 b0=c.b0, beta=c.beta, dt=c.dt, r_m=c.r_m, surrogate=c.surrogate)
        us.append(state.u)
        spikes += float(s.detach().sum())
    expected = torch.stack(us)
    assert 0 < spikes < T * B * C  # the output neurons spike and reset, so the test can fail
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-12)
    ref_grads = torch.autograd.grad((expected * weights).sum(), list(net.parameters()), allow_unused=True)
    for (name, _), g, r in zip(net.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-9, atol=1e-12, msg=name)


def test_dense_layers_zero_recurrence_and_small_starts():
    """dense_sizes: feed-forward spiking layers after the recurrent ones (in ``layers``, in the
    spikes returned, in streaming); rec_init="zeros"; init_state="uniform_b0": U(0, b0) always."""
    torch.manual_seed(0)
    kw = dict(readout="spiking", decode="per_step", dense_sizes=[5, 7], rec_init="zeros", init_state="uniform_b0",
              b0=0.05, dtype=torch.float64)
    net = AdaptiveSRNN(I, [8, 6], C, **kw)
    assert [(l.hidden_size, isinstance(l.w_rec, torch.nn.Parameter)) for l in net.layers] == [
        (8, True), (6, True), (5, False), (7, False)]
    assert net.layers[0].w_rec.count_nonzero() == 0 and net.output.input_size == 7
    assert not any("layers.2.w_rec" in k for k in net.state_dict())  # a dense layer has no recurrent weights
    for mode in (net.train, net.eval):
        mode()
        u = net.layers[2].initial_state(200).u
        assert (u >= 0).all() and (u < 0.05).all() and u.std() > 0.01
    with torch.no_grad():
        for layer in net.layers:
            layer.input.weight.mul_(3.0)
    x = torch.rand(80, B, I, dtype=torch.float64)
    torch.manual_seed(5)
    o, hidden = net(x, return_spikes=True)
    assert [h.shape for h in hidden] == [(80, B, n) for n in (8, 6, 5, 7)]
    assert all(h.sum() > 0 for h in hidden)  # every layer fires: the checks below compare something
    torch.manual_seed(5)
    o_a, state = net.stream(x[:64])
    o_b, _ = net.stream(x[64:], state)
    assert len(state.layers) == 4 and torch.equal(torch.cat([o_a, o_b]), o)
    # the fused backend through the whole network, float64: the reference's spikes and gradients
    ref = AdaptiveSRNN(I, [8, 6], C, backend="reference", **kw)
    ref.load_state_dict(net.state_dict())
    outs = []
    for model in (net, ref):
        torch.manual_seed(5)
        o = model(x)
        o.sum().backward()
        outs.append((o, {k: p.grad for k, p in model.named_parameters()}))
    assert torch.equal(outs[0][0], outs[1][0])
    for k, g in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][k], g, rtol=1e-9, atol=1e-12, msg=k)
    assert net.layers[0].w_rec.grad.count_nonzero() > 0  # zero recurrent weights still learn
    with pytest.raises(ValueError, match="rec_init"):
        SRNNLayer(2, 3, rec_init="identity")
