"""The training CLI: a smoke run per task on tiny synthetic data, exact resume, DDP = one process, CLI errors."""
import copy
import json
import os
import subprocess
import sys

import pytest
from conftest import HAVE_WFDB
import torch
from torch import nn

from srnn_fast import train as T
from srnn_fast.train import steps as train_steps
from srnn_fast.baselines import RNNBaseline
from srnn_fast.data.synthetic import write_tiny

ECG = pytest.param("ecg", marks=pytest.mark.wfdb)  # reads the tiny QTDB records
TASKS = (ECG, "smnist", "psmnist", "shd")
# Small but real-layout runs: a few steps, small batches, single thread.
TINY = {"ecg": ["--seq-len", "120"], "smnist": ["--window", "28", "--encoding", "window"],
        "psmnist": ["--window", "28", "--encoding", "window"], "shd": ["--frame-ms", "10"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for task in ("ecg", "smnist", "shd") if HAVE_WFDB else ("smnist", "shd"):
        write_tiny(task, root)
    return root


def run(args, data_dir, out):
    return T.main(["--data-dir", str(data_dir), "--out", str(out), "--threads", "1", "--quiet"] + args)


@pytest.mark.parametrize("model", ["adaptive", "lstm"])
@pytest.mark.parametrize("task", TASKS)
def test_smoke_run_folder_complete(task, model, data_dir, tmp_path):
    out = tmp_path / "run"
    assert run(["--task", task, "--model", model, "--epochs", "1", "--batch-size", "16"] + TINY[task],
               data_dir, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.csv",
                                                      "metrics.json"]
    cfg = json.loads((out / "config.json").read_text())
    for key in ("task", "model", "hidden_sizes", "input_size", "num_classes", "neuron", "seed", "lr", "lr_tau",
                "epochs", "batch_size", "backend", "device", "data", "params"):
        assert key in cfg, key
    assert cfg["hidden_sizes"] == T.PRESETS[task]["hidden_sizes"]
    m = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1]
    e = m["epochs"][0]
    assert 0.0 <= e["test_acc"] <= 1.0 and 0.0 <= e["train_acc"] <= 1.0 and e["loss"] > 0
    if model == "adaptive":
        assert len(e["fr_layers"]) == len(cfg["hidden_sizes"]) and 0.0 <= e["fr"] <= 1.0
    else:
        assert e["fr"] is None and e["fr_layers"] is None
    assert m["params"] == cfg["params"] and m["best_epoch"] == 1
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,loss,train_acc,val_acc,val_loss,test_acc")
    # The report helper reloads checkpoints through build_model(config).
    ckpt = torch.load(out / "best.pt", weights_only=False)
    net = T.build_model(cfg)
    net.load_state_dict(ckpt["model"])
    assert sum(p.numel() for p in net.parameters()) == cfg["params"]
    x = torch.zeros(2, cfg["seq_len"], cfg["input_size"])
    logits = net(x)
    assert logits.shape == ((2, cfg["seq_len"], cfg["num_classes"]) if task == "ecg" else (2, cfg["num_classes"]))


@pytest.mark.skipif(not HAVE_WFDB, reason="needs wfdb for the tiny QTDB records")
def test_validation_split_chooses_the_epoch(data_dir, tmp_path):
    """--val-fraction holds out training records; the best epoch is the best on them."""
    out = tmp_path / "run"
    assert run(["--task", "ecg", "--epochs", "3", "--batch-size", "8", "--val-fraction", "0.3", "--test-fraction",
                "0.3"] + TINY["ecg"], data_dir, out) == 0
    cfg = json.loads((out / "config.json").read_text())
    info = cfg["data_info"]
    assert info["val_records"] and not set(info["val_records"]) & set(info["train_records"] + info["test_records"])
    assert cfg["n_val"] > 0 and "val" not in info
    m = json.loads((out / "metrics.json").read_text())
    assert m["selected_on"] == "val"
    best = max(m["epochs"], key=lambda e: (e["val_acc"], -e["epoch"]))
    assert m["best_epoch"] == best["epoch"] and m["best_test_acc"] == best["test_acc"]
    assert m["best_val_acc"] == best["val_acc"]


def test_mnist_validation_chooses_the_epoch_and_test_chooses_nothing(data_dir, tmp_path):
    """The method's protocol: --val-fraction holds out training images; the epoch is the best on
    them, and best_test_acc is the test accuracy *at* that epoch, whatever the test set says."""
    out = tmp_path / "run"
    assert run(["--task", "smnist", "--epochs", "4", "--batch-size", "16", "--val-fraction", "0.25"] + TINY["smnist"],
               data_dir, out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["n_train"], cfg["n_val"], cfg["n_test"]) == (48, 16, 32) and cfg["data"]["val_fraction"] == 0.25
    m = json.loads((out / "metrics.json").read_text())
    assert m["selected_on"] == "val"
    best = max(m["epochs"], key=lambda e: (e["val_acc"], -e["epoch"]))
    assert m["best_epoch"] == best["epoch"] and m["best_test_acc"] == best["test_acc"]
    assert torch.load(out / "best.pt", weights_only=False)["epoch"] == best["epoch"]


def _config(argv):
    parser = T.make_parser()
    return T.config_from_args(parser.parse_args(argv), parser)


def test_mnist_presets_resolve_to_the_methods_networks():
    from srnn_fast.data.mnist import rbf_density_gain

    for task in ("smnist", "psmnist"):
        small = _config(["--task", task])
        assert small["preset"] == task and small["hidden_sizes"] == [120, 100]
        assert small["data"] == {"encoding": "rbf", "population": 80, "gain": rbf_density_gain(80)}
        large = _config(["--task", task, "--preset", "mnist_256_128"])
        assert large["preset"] == "mnist_256_128" and large["hidden_sizes"] == [256, 128]
        assert large["data"] == {"encoding": "rbf", "population": 40, "gain": rbf_density_gain(40)}
        for cfg in (small, large):
            assert (cfg["readout"], cfg["decode"], cfg["neuron"]) == ("spiking", "count", "adaptive")
            assert cfg["lr_milestones"] == [25, 50, 100, 150] and cfg["lr_gamma"] == 0.5 and cfg["epochs"] == 200
            assert cfg["grad_clip"] == T.PRESETS[task]["grad_clip"] is not None
    # flags override a preset; a StepLR asked for replaces its milestones
    cfg = _config(["--task", "smnist", "--preset", "mnist_256_128", "--hidden-sizes", "64", "--population", "20",
                   "--lr-step", "10"])
    assert cfg["hidden_sizes"] == [64] and cfg["data"]["population"] == 20
    assert cfg["lr_step"] == 10 and cfg["lr_milestones"] is None
    assert _config(["--task", "ecg"])["b0"] == 0.01 and _config(["--task", "ecg", "--b0", "0.2"])["b0"] == 0.2
    assert _config(["--task", "smnist", "--grad-clip", "none"])["grad_clip"] == 0.0  # 0: no clipping
    # random initial membranes in evaluation too for MNIST (the method's code); flags override
    assert _config(["--task", "psmnist"])["init_state"] == "uniform_always"
    assert _config(["--task", "smnist", "--preset", "mnist_256_128"])["init_state"] == "uniform_always"
    assert _config(["--task", "ecg"])["init_state"] == "uniform"
    assert _config(["--task", "psmnist", "--init-state", "zeros"])["init_state"] == "zeros"


def test_lr_milestones_schedule():
    net = nn.Linear(2, 2)
    lrs = {}
    for cfg in ({"lr_milestones": [2, 4], "lr_step": 1, "lr_gamma": 0.5}, {"lr_milestones": None, "lr_step": 3,
                                                                          "lr_gamma": 0.5}):
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        sched = T.make_scheduler(opt, cfg)
        lrs[bool(cfg["lr_milestones"])] = []
        for _ in range(6):  # the lr of epochs 1..6
            lrs[bool(cfg["lr_milestones"])].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    assert lrs[True] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert lrs[False] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]


def test_linear_decay_schedule_and_adamax():
    """--lr-linear N: epoch k (from 0) at lr (1 - k / N), the method's LambdaLR, 0 from epoch N on;
    it scales both parameter groups and takes precedence over the step schedules."""
    net = nn.Linear(2, 2)
    cfg = {"optimizer": "adamax", "lr": 8e-3, "lr_tau": 2e-2, "lr_linear": 4, "lr_milestones": [1], "lr_step": 1,
           "lr_gamma": 0.5}
    opt = T.make_optimizer(net, cfg)
    assert type(opt) is torch.optim.Adamax
    sched = T.make_scheduler(opt, cfg)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([8e-3, 6e-3, 4e-3, 2e-3, 0.0, 0.0], abs=1e-15)
    assert type(T.make_optimizer(net, {"lr": 1e-2, "lr_tau": 2e-2})) is torch.optim.Adam  # configs before the key


def test_psmnist_method_preset():
    """psmnist_64_256_256: the method's PS-MNIST script (recurrent 64 -> 256, dense 256, zero
    recurrent weights, U(0, b0) starts, the multi-Gaussian surrogate, Adamax 8e-3 with a linear decay
    over 200 epochs, batch 300,
    truncated BPTT every 100 steps, no clipping); flags still override it."""
    cfg = _config(["--task", "psmnist", "--preset", "psmnist_64_256_256"])
    assert (cfg["hidden_sizes"], cfg["dense_sizes"], cfg["rec_init"], cfg["init_state"]) == (
        [64, 256], [256], "zeros", "uniform_b0")
    assert (cfg["optimizer"], cfg["lr"], cfg["lr_linear"], cfg["lr_milestones"], cfg["batch_size"]) == (
        "adamax", 8e-3, 200, None, 300)
    assert (cfg["tbptt"], cfg["grad_clip"], cfg["b0"], cfg["tau_adp_init"]) == (100, None, 0.01, [200.0, 25.0])
    assert cfg["surrogate"] == "multi_gaussian" and _config(["--task", "psmnist"])["surrogate"] == "gaussian"
    assert cfg["data"] == {"encoding": "sliding", "window": 4}
    other = _config(["--task", "psmnist", "--preset", "psmnist_64_256_256", "--lr-milestones", "10",
                     "--optimizer", "adam", "--dense-sizes", "32,16", "--rec-init", "orthogonal",
                     "--surrogate", "gaussian"])
    assert (other["lr_linear"], other["lr_milestones"], other["optimizer"]) == (None, [10], "adam")
    assert other["surrogate"] == "gaussian"
    assert (other["dense_sizes"], other["rec_init"]) == ([32, 16], "orthogonal")
    no_dense = _config(["--task", "psmnist", "--preset", "psmnist_64_256_256", "--dense-sizes", "none"])
    assert no_dense["dense_sizes"] == []
    assert _config(["--task", "smnist", "--lr-linear", "30"])["lr_milestones"] is None
    assert _config(["--task", "ecg", "--model", "lstm"])["dense_sizes"] == []
    model = T.build_model(dict(cfg, input_size=4, num_classes=10))
    assert [(l.hidden_size, isinstance(l.w_rec, nn.Parameter)) for l in model.layers] == [
        (64, True), (256, True), (256, False)]
    assert all(l.w_rec.count_nonzero() == 0 for l in model.layers) and model.output.input_size == 256
    assert sum(p.numel() for p in model.parameters()) == (4 * 64 + 64 + 64 * 64 + 2 * 64 + 64 * 256 + 256 + 256 * 256
                                                         + 2 * 256 + 256 * 256 + 256 + 2 * 256 + 256 * 10 + 10 + 2 * 10)


@pytest.mark.parametrize("preset,input_size", [("mnist_256_128", 40), ("psmnist_64_256", 4),
                                               ("psmnist_64_256_256", 4)])
def test_mnist_preset_trains_on_tiny_data(data_dir, tmp_path, preset, input_size):
    """The larger MNIST presets end to end (a few images): a step changes every parameter group."""
    out = tmp_path / "run"
    assert run(["--task", "psmnist", "--preset", preset, "--epochs", "1", "--batch-size", "8",
                "--limit", "16", "--val-fraction", "0.25"], data_dir, out) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["input_size"] == input_size and cfg["params"] == sum(
        p.numel() for p in T.build_model(cfg).parameters())
    trained = torch.load(out / "last.pt", weights_only=False)["model"]
    torch.manual_seed(cfg["seed"])
    init = T.build_model(cfg).state_dict()
    changed = [k for k in init if not torch.equal(init[k], trained[k])]
    assert sorted(changed) == sorted(init), set(init) - set(changed)
    m = json.loads((out / "metrics.json").read_text())
    assert m["selected_on"] == "val" and m["epochs"][0]["skipped_steps"] == 0


def test_time_constants_stay_above_dt_after_a_large_step():
    cfg = {"model": "adaptive", "input_size": 3, "hidden_sizes": [5], "num_classes": 2, "readout": "integrator",
           "decode": "per_step", "backend": "reference", "tau_out_init": [20.0, 5.0], "tau_m_init": [2.0, 0.5],
           "tau_adp_init": [150.0, 10.0], "b0": 0.01, "surrogate": "gaussian", "init_state": "zeros"}
    net = T.build_model(cfg)
    opt = torch.optim.SGD(T.param_groups(net, 1.0, 100.0), lr=1.0)
    for name, p in net.named_parameters():
        p.grad = torch.ones_like(p)  # a step of -100 on every tau
    opt.step()
    taus = {n: p for n, p in net.named_parameters() if n.rsplit(".", 1)[-1].startswith("tau")}
    before = {n: p.clone() for n, p in taus.items()}
    assert min(p.min().item() for p in before.values()) < 0
    T.clamp_time_constants(net)
    for name, p in taus.items():  # negative ones at the floor dt = 1, the rest untouched
        assert torch.equal(p, before[name].clamp(min=1.0)), name
    assert net(torch.rand(2, 7, 3)).isfinite().all()


@pytest.mark.skipif(not HAVE_WFDB, reason="needs wfdb for the tiny QTDB records")
def test_evaluate_checkpoint_with_other_data_options(data_dir, tmp_path, capsys):
    """--evaluate RUN reproduces the best epoch's test accuracy, and takes data overrides."""
    out = tmp_path / "run"
    run(["--task", "ecg", "--epochs", "2", "--batch-size", "8"] + TINY["ecg"], data_dir, out)
    m = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert T.main(["--evaluate", str(out)]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plain["epoch"] == m["best_epoch"] and plain["test_acc"] == m["best_test_acc"]
    assert T.main(["--evaluate", str(out), "--context", "40"]) == 0
    ctx = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ctx["data"]["context"] == 40 and 0.0 <= ctx["test_acc"] <= 1.0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        T.main(["--evaluate", str(out), "--window", "4"])
    assert exc.value.code == 1 and "error: --evaluate: data option(s) ['window'] do not apply" in capsys.readouterr().err


def _params(path):
    return torch.load(path, weights_only=False)["model"]


@pytest.mark.parametrize("args", [
    pytest.param(["--task", "ecg", "--batch-size", "8"] + TINY["ecg"], marks=pytest.mark.wfdb),
    # Adamax, the linear decay (LambdaLR), truncated BPTT, a dense layer and U(0, b0) starts
    ["--task", "psmnist", "--preset", "psmnist_64_256_256", "--limit", "12", "--batch-size", "6",
     "--hidden-sizes", "8,12", "--dense-sizes", "10", "--lr-linear", "3", "--tbptt", "300"]],
    ids=["ecg", "psmnist_64_256_256"])
def test_resume_is_bit_exact(data_dir, tmp_path, args):
    run(args + ["--epochs", "3"], data_dir, tmp_path / "full")
    run(args + ["--epochs", "2"], data_dir, tmp_path / "part")
    assert T.main(["--resume", str(tmp_path / "part"), "--epochs", "3", "--quiet"]) == 0
    full, part = _params(tmp_path / "full" / "last.pt"), _params(tmp_path / "part" / "last.pt")
    assert full.keys() == part.keys()
    for k in full:
        assert torch.equal(full[k], part[k]), k
    # Resuming must not be a no-op: epoch 3 changed the parameters of epoch 2.
    m = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3]
    m_full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert [e["test_acc"] for e in m["epochs"]] == [e["test_acc"] for e in m_full["epochs"]]


def test_weight_ema_update():
    net = torch.nn.Linear(3, 2)
    ema = T.WeightEMA(net, 0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    for k, w in net.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[k], 0.9 * before[k] + 0.1 * w, rtol=0, atol=1e-7)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="ema decay must be in"):
        T.WeightEMA(net, 1.0)


def test_weight_ema_is_the_per_tensor_lerp_bit_for_bit():
    """WeightEMA (torch's AveragedModel) updates as the hand-written average that the committed
    runs' checkpoints hold: avg.lerp_(w, 1 - decay) on every state_dict entry, starting from the
    weights it is made from, frozen time constants (buffers) included; its state_dict has the
    network's own keys."""
    from srnn_fast.modules import AdaptiveSRNN

    torch.manual_seed(0)
    net = AdaptiveSRNN(3, [5], 2, train_tau="none", dense_sizes=[4])
    ema = T.WeightEMA(net, 0.998)
    by_hand = {k: v.clone() for k, v in net.state_dict().items()}
    assert ema.state_dict().keys() == by_hand.keys() and any("tau" in k for k, _ in net.named_buffers())
    for _ in range(5):
        with torch.no_grad():
            for v in net.state_dict().values():
                v.add_(torch.randn_like(v))
        ema.update(net)
        for k, w in net.state_dict().items():
            by_hand[k].lerp_(w, 1 - 0.998)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, by_hand[k]), k
        assert not torch.equal(v, net.state_dict()[k]), k


@pytest.mark.skipif(not HAVE_WFDB, reason="needs wfdb for the tiny QTDB records")
def test_ema_run_evaluates_resumes_and_reloads_the_average(data_dir, tmp_path, capsys):
    """--ema: the averaged weights are what is evaluated and checkpointed; resume stays exact."""
    args = ["--task", "ecg", "--batch-size", "8", "--ema", "0.5", "--model", "lif"] + TINY["ecg"]
    run(args + ["--epochs", "3"], data_dir, tmp_path / "full")
    run(args + ["--epochs", "2"], data_dir, tmp_path / "part")
    assert T.main(["--resume", str(tmp_path / "part"), "--epochs", "3", "--quiet"]) == 0
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    part = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    for key in ("model", "ema"):
        for k in full[key]:
            assert torch.equal(full[key][k], part[key][k]), (key, k)
    assert not all(torch.equal(full["model"][k], full["ema"][k]) for k in full["model"])
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert [e["test_acc"] for e in m["epochs"]] == [
        e["test_acc"] for e in json.loads((tmp_path / "part" / "metrics.json").read_text())["epochs"]]
    capsys.readouterr()
    assert T.main(["--evaluate", str(tmp_path / "full")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["epoch"] == m["best_epoch"] and out["test_acc"] == m["best_test_acc"]


def test_resume_can_switch_ema_on(data_dir, tmp_path, monkeypatch, capsys):
    """--resume RUN --ema DECAY on a run without an average: training stays bit-exact, the average
    starts from the resumed weights and is checkpointed, the config records from which epoch."""
    args = ["--task", "smnist", "--batch-size", "16"] + TINY["smnist"]
    run(args + ["--epochs", "3"], data_dir, tmp_path / "full")
    run(args + ["--epochs", "2"], data_dir, tmp_path / "part")
    resumed = _params(tmp_path / "part" / "last.pt")
    starts = []
    init = T.WeightEMA.__init__
    monkeypatch.setattr(T.WeightEMA, "__init__", lambda self, model, decay: (
        starts.append({k: v.clone() for k, v in model.state_dict().items()}), init(self, model, decay))[-1])
    assert T.main(["--resume", str(tmp_path / "part"), "--epochs", "3", "--ema", "0.5", "--quiet"]) == 0
    assert len(starts) == 1 and all(torch.equal(starts[0][k], resumed[k]) for k in resumed)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    part = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert "ema" not in full and part["ema"].keys() == part["model"].keys()
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k
    assert not all(torch.equal(part["model"][k], part["ema"][k]) for k in part["model"])
    cfg = json.loads((tmp_path / "part" / "config.json").read_text())
    assert (cfg["ema"], cfg["ema_from_epoch"]) == (0.5, 3) and part["config"]["ema_from_epoch"] == 3
    # Resuming again continues the saved average (no --ema needed); another decay is refused.
    assert T.main(["--resume", str(tmp_path / "part"), "--epochs", "4", "--quiet"]) == 0
    assert len(starts) == 2 and json.loads((tmp_path / "part" / "config.json").read_text())["ema_from_epoch"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        T.main(["--resume", str(tmp_path / "part"), "--epochs", "5", "--ema", "0.9"])
    assert "already averages its weights with decay 0.5" in capsys.readouterr().err


def test_weight_decay_is_adamws_on_the_weight_matrices():
    """decay_weights + Adam == AdamW with decay on the matrices and none on the 1-D parameters,
    bit for bit; a skipped step (non-finite gradient) decays nothing."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    adamw, plain = copy.deepcopy(ours), copy.deepcopy(ours)
    opts = [(ours, torch.optim.Adam(ours.parameters(), lr=0.1), 0.5),
            (adamw, torch.optim.AdamW([{"params": [p for p in adamw.parameters() if p.ndim >= 2], "weight_decay": 0.5},
                                       {"params": [p for p in adamw.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                                      lr=0.1), 0.0),
            (plain, torch.optim.Adam(plain.parameters(), lr=0.1), 0.0)]
    x = torch.randn(5, 3, dtype=torch.float64)
    for step in range(3):
        for net, opt, wd in opts:
            opt.zero_grad()
            net(x).square().sum().backward()
            assert T.optimizer_step(net, opt, None, wd)
        if step == 0:  # one step: only the matrices differ from undecayed Adam
            for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
                assert torch.equal(p, q) == (p.ndim < 2), name
    for (name, p), q in zip(ours.named_parameters(), adamw.parameters()):
        assert torch.equal(p, q), name
    before = [p.clone() for p in ours.parameters()]
    opt = opts[0][1]
    opt.zero_grad()
    ours(x).square().sum().backward()
    ours[0].weight.grad[0, 0] = float("inf")
    assert not T.optimizer_step(ours, opt, None, 0.5)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), before))


def test_resume_can_fork_a_run_with_weight_decay(data_dir, tmp_path, capsys):
    """--resume RUN --out NEW --weight-decay W: NEW continues RUN's history (metrics, best epoch)
    with the decay from the next epoch; RUN is untouched; a fork without new flags is RUN's own
    continuation, bit for bit."""
    args = ["--task", "smnist", "--batch-size", "16"] + TINY["smnist"]
    run(args + ["--epochs", "3"], data_dir, tmp_path / "full")
    run(args + ["--epochs", "2"], data_dir, tmp_path / "base")
    base, fork, same = tmp_path / "base", tmp_path / "fork", tmp_path / "same"
    files = {p.name: p.read_bytes() for p in base.iterdir()}
    assert T.main(["--resume", str(base), "--out", str(fork), "--epochs", "3", "--weight-decay", "0.5", "--quiet"]) == 0
    assert T.main(["--resume", str(base / "last.pt"), "--out", str(same), "--epochs", "3", "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in base.iterdir()} == files
    full, decayed, plain = (_params(d / "last.pt") for d in (tmp_path / "full", fork, same))
    assert all(torch.equal(full[k], plain[k]) for k in full)
    assert not all(torch.equal(full[k], decayed[k]) for k in full if full[k].ndim >= 2)
    cfg = json.loads((fork / "config.json").read_text())
    assert (cfg["weight_decay"], cfg["weight_decay_from_epoch"]) == (0.5, 3)
    assert cfg["forked_from"] == {"run": str(base), "epoch": 2}
    assert json.loads((same / "config.json").read_text())["weight_decay"] == 0.0
    m_base = json.loads((base / "metrics.json").read_text())
    m_fork = json.loads((fork / "metrics.json").read_text())
    assert [e["epoch"] for e in m_fork["epochs"]] == [1, 2, 3] and m_fork["epochs"][:2] == m_base["epochs"]
    assert (fork / "best.pt").exists() and m_fork["best_epoch"] >= m_base["best_epoch"]
    # Continuing the fork keeps its decay; another decay, or forking onto a run, is refused.
    assert T.main(["--resume", str(fork), "--epochs", "4", "--quiet"]) == 0
    assert json.loads((fork / "config.json").read_text())["weight_decay_from_epoch"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        T.main(["--resume", str(fork), "--epochs", "5", "--weight-decay", "0.1"])
    assert "already decays its weights by 0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["--resume", str(base), "--out", str(fork), "--epochs", "5"])
    assert "already holds a run" in capsys.readouterr().err
    half = tmp_path / "half"  # a fork stopped before its first checkpoint is started again
    half.mkdir()
    (half / "config.json").write_text("{}")
    assert T.main(["--resume", str(base), "--out", str(half), "--epochs", "3", "--quiet"]) == 0
    assert all(torch.equal(full[k], v) for k, v in _params(half / "last.pt").items())


def test_weight_decay_reaches_truncated_bptt(data_dir, tmp_path, monkeypatch):
    """A new run with --weight-decay records it and decays at every truncated-BPTT step."""
    calls = []
    decay = T.decay_weights
    monkeypatch.setattr(train_steps, "decay_weights", lambda opt, wd: (calls.append(wd), decay(opt, wd))[-1])
    assert run(["--task", "psmnist", "--preset", "psmnist_64_256_256", "--limit", "12", "--batch-size", "6",
                "--hidden-sizes", "8,12", "--dense-sizes", "10", "--tbptt", "300", "--epochs", "1",
                "--weight-decay", "0.25"], data_dir, tmp_path / "run") == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    steps = json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"][0]
    assert cfg["weight_decay"] == 0.25 and "weight_decay_from_epoch" not in cfg
    assert calls == [0.25] * (2 * 3)  # 12 images / batch 6 = 2 batches, 784 steps / 300 = 3 chunks each
    assert steps["skipped_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("task", [ECG, "shd"])
def test_ddp_two_processes_equal_one(task, data_dir, tmp_path):
    # float64 and zero initial membranes: the only difference left is the split of each global
    # batch over ranks, which the loss weighting must make irrelevant (ECG: the ranks hold
    # different numbers of labelled steps).
    args = ["--task", task, "--epochs", "2", "--batch-size", "12", "--dtype", "float64", "--init-state", "zeros",
            "--threads", "1", "--quiet", "--data-dir", str(data_dir)] + TINY[task]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "srnn_fast.train", "--out", str(tmp_path / "two")] + args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert T.main(["--out", str(tmp_path / "one")] + args) == 0
    one, two = _params(tmp_path / "one" / "last.pt"), _params(tmp_path / "two" / "last.pt")
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-10, atol=1e-12, msg=k)


def test_loss_terms_ignore_unlabelled_steps():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [9.0, 0.0]]])  # [B=1, T=3, C=2]
    y = torch.tensor([[0, 0, -1]])
    loss_sum, count, correct = T.loss_terms(logits, y)
    assert count.item() == 2 and correct.item() == 1
    expected = torch.nn.functional.cross_entropy(logits[0, :2], y[0, :2], reduction="sum")
    torch.testing.assert_close(loss_sum, expected)


class _FixedLogits(nn.Module):
    """Stands in for a network: returns the given per-step logits of each input row (x[:, 0, 0] = row)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, return_spikes=False):
        return self.logits[x[:, 0, 0].long()], []


def test_evaluate_scores_fully_labelled_sequences_apart():
    # 3 sequences of 2 context steps (-1) + 4 steps; predictions: class 0 everywhere.
    y = torch.tensor([[-1, -1, 0, 0, 1, 1],     # fully labelled after the context: 2 of 4 right
                      [-1, -1, 0, 0, 0, -1],    # a gap: 3 of 3 right, not in test_acc_full
                      [-1, -1, 0, 1, 1, 1]])    # fully labelled: 1 of 4 right
    logits = torch.zeros(3, 6, 2)
    logits[..., 0] = 1.0
    x = torch.zeros(3, 6, 4)
    x[:, 0, 0] = torch.arange(3.0)
    data = torch.utils.data.TensorDataset(x, y)
    cfg = {"model": "lstm", "hidden_sizes": [1], "batch_size": 2, "data": {"context": 2}}
    out = T.evaluate(_FixedLogits(logits), data, cfg, torch.device("cpu"), torch.float32, 0, 1)
    assert out["test_acc"] == pytest.approx(6 / 11)
    assert out["test_acc_full"] == pytest.approx(3 / 8)
    # Without context the -1 steps at the start break every sequence: none is fully labelled.
    cfg["data"] = {"context": 0}
    assert T.evaluate(_FixedLogits(logits), data, cfg, torch.device("cpu"), torch.float32, 0, 1)["test_acc_full"] is None
    # Per-sequence labels (MNIST, SHD): not applicable.
    data = torch.utils.data.TensorDataset(x, torch.tensor([0, 1, 0]))
    out = T.evaluate(_FixedLogits(logits[:, -1]), data, cfg, torch.device("cpu"), torch.float32, 0, 1)
    assert out["test_acc"] == pytest.approx(2 / 3) and out["test_acc_full"] is None


def test_evaluate_random_initial_states_are_repeatable_and_leave_training_rng():
    """init_state="uniform_always": evaluation draws random membranes (they change the output)
    under its own fixed seed, so two evaluations agree and the training RNG does not move."""
    cfg = {"model": "adaptive", "input_size": 3, "hidden_sizes": [6], "num_classes": 2, "readout": "integrator",
           "decode": "mean", "backend": "reference", "tau_out_init": [20.0, 5.0], "tau_m_init": [20.0, 5.0],
           "tau_adp_init": [150.0, 10.0], "b0": 0.01, "surrogate": "gaussian", "init_state": "uniform_always",
           "batch_size": 4, "data": {}, "seed": 0}
    torch.manual_seed(0)
    net = T.build_model(cfg).double()
    data = torch.utils.data.TensorDataset(torch.rand(10, 12, 3) * 0.2, torch.randint(0, 2, (10,)))
    dev = torch.device("cpu")
    before = torch.get_rng_state()
    first = T.evaluate(net, data, cfg, dev, torch.float64, 0, 1)
    assert torch.equal(torch.get_rng_state(), before)
    assert T.evaluate(net, data, cfg, dev, torch.float64, 0, 1) == first
    other = T.evaluate(net, data, dict(cfg, seed=1), dev, torch.float64, 0, 1)
    assert other["test_loss"] != first["test_loss"]  # the seed draws other states: they are random
    for layer in net.modules():
        if hasattr(layer, "init_state"):
            layer.init_state = "uniform"  # evaluation from u = 0: not what uniform_always scored
    assert T.evaluate(net, data, cfg, dev, torch.float64, 0, 1)["test_loss"] != first["test_loss"]


def test_global_batches_split_and_drop():
    g = torch.Generator().manual_seed(0)
    batches = T.global_batches(10, 4, 3, g)
    assert [len(b) for b in batches] == [4, 4]  # the last batch of 2 < 3 ranks is dropped
    assert len(set(sum(batches, []))) == 8


def test_tau_learning_rate_group():
    net = T.build_model({"model": "adaptive", "input_size": 4, "hidden_sizes": [8], "num_classes": 3,
                         "readout": "integrator", "decode": "mean", "backend": "reference", "tau_out_init": [20, 5],
                         "tau_m_init": [20, 5], "tau_adp_init": [150, 10], "b0": 0.01, "surrogate": "gaussian",
                         "init_state": "uniform"})
    groups = T.param_groups(net, 1e-2, 3e-2)
    assert [g["lr"] for g in groups] == [1e-2, 3e-2]
    assert len(groups[1]["params"]) == 3  # tau_m, tau_adp, tau_out


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "bilstm"])
def test_baselines_shapes_and_direction(kind):
    torch.manual_seed(0)
    net = RNNBaseline(kind, 4, [6, 5], 3)
    x = torch.randn(2, 7, 4)
    assert net(x).shape == (2, 3)
    per_step = RNNBaseline(kind, 4, [6], 3, decode="per_step")
    assert per_step(x).shape == (2, 7, 3)
    # The classification output depends on the first step for every kind (bilstm via its
    # backward direction at t = 1, the others through the recurrence).
    x2 = x.clone()
    x2[:, 0] += 1
    assert not torch.allclose(net(x), net(x2))


@pytest.mark.parametrize("argv, message", [
    ([], "--task is required"),
    (["--task", "mnist"], "invalid choice"),
    (["--task", "ecg", "--lr", "-1"], "expected a positive float"),
    (["--task", "ecg", "--hidden-sizes", "a,b"], "comma-separated layer widths"),
    (["--task", "ecg", "--tau-m-init", "20"], "MEAN,STD"),
    (["--task", "smnist", "--seq-len", "100"], "--seq-len does not apply to --task smnist"),
    (["--task", "shd", "--frame-ms", "5"], "invalid choice"),
    (["--task", "ecg", "--ema", "1"], "expected a number in (0, 1); got '1'"),
    (["--task", "smnist", "--val-fraction", "1.5"], "expected a number in (0, 1); got '1.5'"),
    (["--task", "ecg", "--lr-milestones", "50,25"], "expected increasing positive epochs"),
    (["--task", "ecg", "--grad-clip", "-1"], "expected a positive norm, or 0 / none"),
    (["--task", "ecg", "--lr-step", "5", "--lr-milestones", "25"], "three schedules: give one"),
    (["--task", "ecg", "--lr-linear", "50", "--lr-step", "5"], "three schedules: give one"),
    (["--task", "ecg", "--lr-linear", "0"], "expected a positive int"),
    (["--task", "ecg", "--optimizer", "sgd"], "invalid choice"),
    (["--task", "ecg", "--dense-sizes", "16", "--model", "gru"], "--dense-sizes applies to the SRNN models"),
    (["--task", "ecg", "--dense-sizes", "0"], "layer widths must be positive"),
    (["--task", "ecg", "--rec-init", "zeros", "--model", "lstm"], "--rec-init applies to the SRNN models"),
    (["--task", "ecg", "--rec-init", "identity"], "invalid choice"),
    (["--task", "ecg", "--preset", "mnist_256_128"], "--preset mnist_256_128 is for --task smnist / psmnist"),
    (["--task", "ecg", "--train-tau", "m", "--model", "lstm"], "--train-tau applies to the SRNN models"),
    (["--task", "ecg", "--train-tau", "tau_m"], "invalid choice"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["--resume", str(tmp_path)])
    assert exc.value.code == 1 and f"error: --resume: no checkpoint at {tmp_path / 'last.pt'}" in capsys.readouterr().err


def test_cli_data_error_is_one_line(tmp_path, capsys):
    # a missing data folder ends the CLI with its message and exit code 1, not a traceback
    with pytest.raises(SystemExit) as exc:
        T.main(["--task", "ecg", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "error: data folder" in err and "nowhere" in err and "Traceback" not in err


def test_optimizer_step_skips_non_finite_gradients():
    # A non-finite gradient (float32 BPTT overflow) must not reach the weights or Adam's moments.
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    for clip in (None, 1.0):
        net.weight.grad = torch.full_like(net.weight, float("nan"))
        net.bias.grad = torch.ones_like(net.bias)
        assert T.optimizer_step(net, opt, clip) is False
        assert all(torch.equal(a, p) for a, p in zip(before, net.parameters())) and not opt.state
        net.weight.grad = torch.full_like(net.weight, 1e30)  # finite, but its norm overflows float32
        assert T.optimizer_step(net, opt, clip) is False and not opt.state
    net.weight.grad, net.bias.grad = torch.ones_like(net.weight), torch.ones_like(net.bias)
    assert T.optimizer_step(net, opt, 1.0) is True
    # the step sees the gradients as they are (clip 0: none) or scaled to norm 1 (8 entries of 100: norm 100 sqrt(8))
    grads = [torch.full_like(p, 100.0) for p in net.parameters()]
    for clip, scale in ((0.0, 1.0), (1.0, 1.0 / (100.0 * 8 ** 0.5))):
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        seen = []
        opt.step = lambda: seen.extend(p.grad.clone() for p in net.parameters())
        assert T.optimizer_step(net, opt, clip) is True
        del opt.step
        for g, s in zip(grads, seen):
            torch.testing.assert_close(s, g * scale)
    assert not torch.equal(before[0], net.weight) and torch.isfinite(net.weight).all()


def test_training_survives_and_reports_non_finite_steps(data_dir, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = T.loss_terms

    def loss_terms(logits, y, poison=lambda n: n == 2):  # the second step's loss is inf
        loss_sum, count, correct = real(logits, y)
        calls["n"] += 1
        return (loss_sum * float("inf") if poison(calls["n"]) else loss_sum), count, correct

    monkeypatch.setattr(train_steps, "loss_terms", loss_terms)
    out = tmp_path / "run"
    args = ["--task", "smnist", "--model", "lif", "--epochs", "1", "--batch-size", "16"] + TINY["smnist"]
    assert run(args, data_dir, out) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"][0]["skipped_steps"] == 1
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "skipped_steps" in (out / "metrics.csv").read_text().splitlines()[0]
    # every step non-finite: a clear error, not NaN weights
    monkeypatch.setattr(train_steps, "loss_terms", lambda logits, y: loss_terms(logits, y, poison=lambda n: True))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(args, data_dir, tmp_path / "run2")
    assert exc.value.code == 1 and "every optimizer step of epoch 1 had a non-finite gradient" in capsys.readouterr().err


@pytest.mark.skipif(not HAVE_WFDB, reason="needs wfdb for the tiny QTDB records")
def test_bring_your_own_split_npz(data_dir, tmp_path, capsys):
    """--npz TRAIN --test-npz TEST: all of TRAIN trains, all of TEST tests (also for --evaluate)."""
    import numpy as np

    from srnn_fast.data import qtdb

    arrays = qtdb.preprocess(data_dir / "qtdb", seq_len=120)
    names = sorted(set(arrays["record"]))
    held = np.isin(arrays["record"], names[:1])
    train_npz, test_npz, other_npz = tmp_path / "train.npz", tmp_path / "test.npz", tmp_path / "other.npz"
    qtdb.save_npz(train_npz, arrays["x"][~held], arrays["y"][~held], arrays["record"][~held])
    qtdb.save_npz(test_npz, arrays["x"][held], arrays["y"][held], arrays["record"][held])
    qtdb.save_npz(other_npz, arrays["x"][held][:2], arrays["y"][held][:2])  # no record names
    out = tmp_path / "run"
    assert T.main(["--task", "ecg", "--epochs", "1", "--batch-size", "8", "--npz", str(train_npz), "--test-npz",
                   str(test_npz), "--threads", "1", "--quiet", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_train"] == (~held).sum() and cfg["n_test"] == held.sum()
    assert cfg["data_info"]["test_records"] == names[:1] and cfg["data_info"]["train_records"] == names[1:]
    capsys.readouterr()
    assert T.main(["--evaluate", str(out), "--test-npz", str(other_npz)]) == 0
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other["data"]["test_npz"] == str(other_npz)
    model = T.build_model(cfg)
    model.load_state_dict(torch.load(out / "best.pt", weights_only=False)["model"])
    ev = T.evaluate(model, qtdb.build_ecg(None, npz=train_npz, test_npz=other_npz)[1], cfg, torch.device("cpu"),
                    torch.float32, 0, 1)
    assert other["test_acc"] == ev["test_acc"]  # scored on the two sequences of other.npz
    with pytest.raises(ValueError, match="holds sequences of training records"):
        qtdb.build_ecg(None, npz=train_npz, test_npz=train_npz)


@pytest.mark.skipif(not sys.platform.startswith("linux") or __import__("platform").libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc malloc")
def test_keep_freed_memory_reuses_large_blocks():
    # 64 MB tensors allocated and freed in a loop, as a training step's buffers are: with
    # glibc's defaults each one is a fresh mmap (a page fault per 4 KB); after
    # keep_freed_memory they come from the heap's freed blocks. Counted once the loop is in
    # its steady state (the first rounds may grow the heap: small allocations can split a
    # freed block).
    code = """
import resource, sys, torch
from srnn_fast import train
kept = train.keep_freed_memory() if sys.argv[1] == "keep" else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    x = torch.ones(16 << 20); del x
f0 = faults()
for _ in range(5):
    x = torch.ones(16 << 20); del x
print(kept, faults() - f0)
"""
    pages = (64 << 20) // 4096
    out = {}
    for mode in ("keep", "default"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        kept, faults = res.stdout.split()
        out[mode] = (kept == "True", int(faults))
    assert out["keep"][0] and not out["default"][0]
    assert out["keep"][1] < 5 * pages // 100, out
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not (os.path.exists(thp) and "[always]" in open(thp).read()):  # huge pages fault per 2 MB
        assert out["default"][1] > 5 * pages // 2, out  # the test can tell: the default does fault
