"""train_tau ("all" / "none" / "m" / "adp"): which time constants train. Frozen ones are
buffers under the same names (optimizers, checkpoints, torch.compile see the right
parameters), stay at their initial values, and leave every other gradient as the reference
computes it; the CLI's --train-tau writes the setting into the run and trains that way."""
import json

import pytest
import torch

import srnn_fast
from srnn_fast import AdaptiveSRNN, SRNNLayer
from srnn_fast import train as T
from srnn_fast.modules import TRAIN_TAU
from srnn_fast.data.synthetic import write_tiny

# The trainable time constants per setting: tau_out (integrator readout) goes with tau_m.
TRAINED = {"all": {"tau_m", "tau_adp"}, "none": set(), "m": {"tau_m"}, "adp": {"tau_adp"}}
HAVE_CPP = "cpp" in srnn_fast.available_backends()


def tau_names(names):
    return {n for n in names if n.rsplit(".", 1)[-1].startswith("tau")}


def expected_trained(train_tau, readout, layers=2):
    """Full names of the trainable time constants of an AdaptiveSRNN with ``layers``
    recurrent layers and this readout."""
    short = TRAINED[train_tau]
    names = {f"layers.{i}.{t}" for i in range(layers) for t in short}
    if readout == "integrator":
        names |= {"tau_out"} if "tau_m" in short else set()
    else:  # the spiking output layer is an SRNNLayer with the same setting
        names |= {f"output.{t}" for t in short}
    return names


@pytest.mark.parametrize("train_tau", TRAIN_TAU)
def test_layer_parameters_and_buffers(train_tau):
    layer = SRNNLayer(5, 7, train_tau=train_tau)
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    assert tau_names(params) == TRAINED[train_tau]
    assert tau_names(buffers) == {"tau_m", "tau_adp"} - TRAINED[train_tau]
    assert {"input.weight", "input.bias", "w_rec"} <= set(params)
    for name in ("tau_m", "tau_adp"):  # a frozen one is initialised like a trained one
        t = getattr(layer, name)
        assert t.shape == (7,) and t.requires_grad == (name in TRAINED[train_tau]) and (t >= 1.0).all()
    # The same keys (a module lists its parameters before its buffers, so not in the same order).
    assert sorted(layer.state_dict()) == sorted(SRNNLayer(5, 7).state_dict())
    assert ("train_tau" in repr(layer)) == (train_tau != "all")


@pytest.mark.parametrize("readout", ["integrator", "membrane", "spiking"])
@pytest.mark.parametrize("train_tau", TRAIN_TAU)
def test_network_parameters_buffers_and_state_dict(train_tau, readout):
    torch.manual_seed(0)
    net = AdaptiveSRNN(3, [8, 6], 4, readout=readout, decode="mean" if readout != "spiking" else "count",
                       train_tau=train_tau)
    params = dict(net.named_parameters())
    want = expected_trained(train_tau, readout)
    assert tau_names(params) == want
    all_taus = expected_trained("all", readout)
    assert tau_names(dict(net.named_buffers())) == all_taus - want
    # Same state_dict keys in every setting, so checkpoints load across settings (strict).
    torch.manual_seed(1)
    other = AdaptiveSRNN(3, [8, 6], 4, readout=readout, decode="mean" if readout != "spiking" else "count")
    assert sorted(net.state_dict()) == sorted(other.state_dict())
    net.load_state_dict(other.state_dict())
    for name, value in other.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
    frozen = next(iter(sorted(all_taus - want)), None)
    if frozen is not None:  # loading replaced the buffer's values in place: still a buffer
        assert frozen in dict(net.named_buffers()) and frozen not in dict(net.named_parameters())
    other.load_state_dict(net.state_dict())
    # The training CLI's parameter count and tau group follow the setting.
    groups = T.param_groups(net, 1e-3, 1e-2)
    tau_group = [g for g in groups if g["name"] == "tau"]
    assert sum(p.numel() for g in tau_group for p in g["params"]) == sum(params[n].numel() for n in want)


@pytest.mark.parametrize("bad", ["tau_m", "All", "", None, 1])
def test_bad_value_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="train_tau"):
        SRNNLayer(3, 4, train_tau=bad)
    with pytest.raises(ValueError, match="train_tau"):
        AdaptiveSRNN(3, [4], 2, train_tau=bad)


@pytest.mark.parametrize("train_tau", TRAIN_TAU)
def test_frozen_taus_unchanged_by_a_training_step(train_tau):
    torch.manual_seed(0)
    net = AdaptiveSRNN(3, [8], 4, decode="mean", train_tau=train_tau, init_state="zeros")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(T.param_groups(net, 1e-2, 1e-1))
    x, y = torch.rand(30, 5, 3), torch.randint(0, 4, (5,))
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    T.clamp_time_constants(net)
    want = expected_trained(train_tau, "integrator", layers=1)
    for name in expected_trained("all", "integrator", layers=1):
        changed = not torch.equal(net.state_dict()[name], before[name])
        assert changed == (name in want), f"{name}: changed={changed}, trains={name in want}"
    assert not torch.equal(net.layers[0].w_rec, before["layers.0.w_rec"])


def _grads(net, x, upstream):
    out = net(x)
    loss = (out * upstream).sum()
    names = [n.removeprefix("_orig_mod.") for n, _ in net.named_parameters()]  # (torch.compile's wrapper)
    return dict(zip(names, torch.autograd.grad(loss, list(net.parameters()))))


@pytest.mark.skipif(not HAVE_CPP, reason="extension not built")
@pytest.mark.parametrize("readout", ["integrator", "membrane"])
@pytest.mark.parametrize("neuron", ["adaptive", "lif"])
@pytest.mark.parametrize("train_tau", TRAIN_TAU)
def test_gradients_with_frozen_taus_match_the_reference(train_tau, neuron, readout):
    """float64: every remaining parameter's gradient from the fused CPU kernels equals the
    reference's (autograd through the per-step equations) to 1e-12."""
    torch.manual_seed(0)
    kw = dict(neuron=neuron, readout=readout, decode="per_step", train_tau=train_tau, init_state="zeros",
              dtype=torch.float64)
    ref = AdaptiveSRNN(4, [12, 9], 3, backend="reference", **kw)
    cpp = AdaptiveSRNN(4, [12, 9], 3, backend="cpp", **kw)
    cpp.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(70, 3, 4, generator=g, dtype=torch.float64) < 0.3).double() * 2.0  # spike-like input
    upstream = torch.randn(70, 3, 3, generator=g, dtype=torch.float64)
    want, got = _grads(ref, x, upstream), _grads(cpp, x, upstream)
    assert set(got) == set(want) and tau_names(got) == expected_trained(train_tau, readout)
    for name, r in want.items():
        lif_adaptation = neuron == "lif" and name.startswith("layers.") and name.endswith("tau_adp")
        assert (r.abs().max() > 0) != lif_adaptation, f"{name}: zero gradient, the case tests nothing"  # LIF: none
        torch.testing.assert_close(got[name], r, rtol=1e-12, atol=1e-12 * float(r.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(not HAVE_CPP, reason="extension not built")
def test_compiles_with_frozen_taus():
    """A network with frozen time constants still compiles as one graph (aot_eager checks the
    tracing and the ops' fake kernels) and matches eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = AdaptiveSRNN(3, [16], 4, backend="cpp", decode="mean", train_tau="none", init_state="zeros",
                       dtype=torch.float64)
    x = torch.randn(20, 2, 3, dtype=torch.float64)
    eager = _grads(net, x, torch.ones(2, 4, dtype=torch.float64))
    compiled = _grads(torch.compile(net, backend="aot_eager", fullgraph=True), x, torch.ones(2, 4, dtype=torch.float64))
    assert set(compiled) == set(eager) and not tau_names(eager)
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tiny("smnist", root)
    return root


def test_cli_frozen_taus_train_and_stay_initial(data_dir, tmp_path):
    out = tmp_path / "run"
    assert T.main(["--data-dir", str(data_dir), "--out", str(out), "--threads", "1", "--quiet", "--task", "smnist",
                   "--epochs", "1", "--batch-size", "16", "--window", "28", "--encoding", "window",
                   "--train-tau", "none"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_tau"] == "none"
    state = torch.load(out / "last.pt", weights_only=False)["model"]
    torch.manual_seed(cfg["seed"])  # train() seeds like this before build_model: the initial network
    initial = T.build_model(cfg).state_dict()
    taus = tau_names(state)
    assert taus and all(torch.equal(state[k], initial[k]) for k in taus)
    assert any(not torch.equal(state[k], initial[k]) for k in state if k not in taus)  # the rest trained
    net = T.build_model(cfg)
    assert not tau_names(dict(net.named_parameters()))
    assert cfg["params"] == sum(p.numel() for p in net.parameters())
    net.load_state_dict(state)


def test_cli_default_trains_all():
    parser = T.make_parser()
    cfg = T.config_from_args(parser.parse_args(["--task", "ecg"]), parser)
    assert cfg["train_tau"] == "all"
