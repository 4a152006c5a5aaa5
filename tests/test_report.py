"""The report on tiny run folders trained in the test through the training CLI."""
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from srnn_fast import report, train  # noqa: E402
from srnn_fast.energy import estimate_energy  # noqa: E402
from srnn_fast.train.checkpoints import _save_csv, _save_json  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 1-epoch ECG runs (adaptive, lif, lstm) on a tiny preprocessed .npz."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    x = (rng.random((10, 24, 4)) < 0.2).astype(np.float32)  # level-crossing spikes, 4 channels
    y = rng.integers(0, 6, (10, 24))
    y[:, :2] = -1
    np.savez(root / "ecg.npz", x=x, y=y)
    for model in ("adaptive", "lif", "lstm"):
        assert train.main(["--task", "ecg", "--npz", str(root / "ecg.npz"), "--model", model, "--epochs", "1",
                           "--hidden-sizes", "6", "--batch-size", "4", "--quiet", "--out",
                           str(root / "all" / f"ecg_{model}")]) == 0
    return root


def test_report_tables_and_figures(runs, tmp_path):
    out = tmp_path / "results"
    assert report.main([str(runs / "all"), "--out", str(out), "--measure"]) == 0
    text = (out / "REPORT.md").read_text()
    figs = out / "figures"
    names = ["pareto.png", "acc_vs_fr.png"] + [f"curve_ecg_{m}.png" for m in ("adaptive", "lif", "lstm")] + \
            [f"tau_ecg_{m}.png" for m in ("adaptive", "lif")]
    for name in names:
        data = (figs / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
        assert f"figures/{name}" in text
    assert not (figs / "tau_ecg_lstm.png").exists()  # an LSTM has no time constants

    # every run in the results table with its accuracy, Fr and parameter count from the folder
    for model, method in (("adaptive", "Adaptive SRNN"), ("lif", "LIF SRNN"), ("lstm", "LSTM")):
        run = runs / "all" / f"ecg_{model}"
        cfg = json.loads((run / "config.json").read_text())
        met = json.loads((run / "metrics.json").read_text())
        fr = met["epochs"][0]["fr"]
        row = next(l for l in text.splitlines() if l.startswith(f"| ECG (QTDB) | {method} | 4-6-6 | ")
                   and "accuracy" not in l and "nJ" not in l)
        assert f"| {100 * met['best_test_acc']:.2f} |" in row and f"| {met['params']:,} |" in row
        assert (f"| {fr:.4f} |" in row) if model != "lstm" else "| – |" in row
        assert cfg["seq_len"] == 24
        energy = estimate_energy(cfg, fr=fr, T=24) if fr is not None else estimate_energy(cfg, T=24)
        if model == "adaptive":
            unit = energy
        erow = [l for l in text.splitlines() if f"| {run.name} |" in l][1]
        assert f"| {energy / 1e3:.2f} |" in erow and f"| {energy / cfg['seq_len']:.1f} |" in erow
        assert f"| {energy / unit:.2f} |" in erow
    assert "Adaptive SRNN (unit)" in text
    assert "## Measured operations vs the formula" in text and "| layer0 (adaptive) | 4 | 6 |" in text
    assert "not measured" not in text


def test_measured_ops_repeat_with_random_initial_states(runs, tmp_path):
    """init_state="uniform_always" draws the initial membranes in evaluation too: the measured
    counts come out the same on every report (drawn under the run's seed), and differ from
    the counts from u = 0."""
    run_dir = tmp_path / "ecg_adaptive"
    shutil.copytree(runs / "all" / "ecg_adaptive", run_dir)
    costs = report.EnergyCosts()
    from_zero = report.load_run(run_dir, costs)
    _, trained = report.initial_and_trained(from_zero)
    zero_text = report.measure_run(from_zero, trained, None, 8, 4, costs)
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(cfg, init_state="uniform_always")))
    texts = []
    for k in range(2):
        run = report.load_run(run_dir, costs)
        _, trained = report.initial_and_trained(run)
        torch.rand(k + 1)  # the global RNG is somewhere else on each report
        texts.append(report.measure_run(run, trained, None, 8, 4, costs))
    assert texts[0] == texts[1] != zero_text


def test_ema_runs_are_measured_with_the_averaged_weights(runs, tmp_path):
    ckpt = torch.load(runs / "all" / "ecg_adaptive" / "best.pt", weights_only=False)
    averaged = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    run_dir = tmp_path / "ecg_adaptive"
    shutil.copytree(runs / "all" / "ecg_adaptive", run_dir)
    torch.save(dict(ckpt, ema=averaged), run_dir / "best.pt")
    _, trained = report.initial_and_trained(report.load_run(run_dir, report.EnergyCosts()))
    for k, v in trained.state_dict().items():
        assert torch.equal(v, averaged[k]), k


def test_initial_time_constants_are_the_runs(runs):
    """The init histogram rebuilds the model as the training CLI seeded it: after one epoch
    of 2 Adam steps (lr_tau 0.03) no time constant may have moved by more than ~2 * 0.03."""
    r = report.load_run(runs / "all" / "ecg_adaptive", report.EnergyCosts())
    init, trained = report.initial_and_trained(r)
    for name in ("tau_m", "tau_adp"):
        diff = (report._taus(init, name) - report._taus(trained, name)).abs()
        assert diff.max() < 0.1 and diff.max() > 0, name
    torch.manual_seed(123)  # a different seed gives different time constants: the check can fail
    other = train.build_model(dict(r.config, backend="auto"))
    assert (report._taus(other, "tau_m") - report._taus(trained, "tau_m")).abs().max() > 0.1


def test_report_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------
# --ablation: groups of runs, written by hand in the trainer's format (its own writers)
# ---------------------------------------------------------------------------------------
def fake_run(root, name, model="adaptive", hidden=(36,), train_tau="all", seed=0, val=(0.5, 0.6), test=(0.4, 0.5),
             fr=(0.1, 0.2), task="ecg", **extra):
    """A run folder as srnn_fast.train writes it (config.json, metrics.json, metrics.csv),
    with the given per-epoch validation / test accuracies and Fr; val=None: no validation."""
    out = root / name
    out.mkdir(parents=True)
    cfg = {"task": task, "model": model, "hidden_sizes": list(hidden), "readout": "membrane", "decode": "per_step",
           "epochs": len(test), "neuron": model if model in ("adaptive", "lif", "relu") else None, "seed": seed,
           "data_seed": seed, "data": {"val_fraction": 0.2}, "input_size": 4, "num_classes": 6, "seq_len": 100,
           "params": 1000, **extra}
    if train_tau is not None:  # runs from before --train-tau have no such key
        cfg["train_tau"] = train_tau
    epochs = []
    for i, (t, f) in enumerate(zip(test, fr)):
        e = {"epoch": i + 1, "loss": 1.0, "train_acc": 0.5, "test_acc": t, "test_loss": 1.0, "test_acc_full": None,
             "fr": f, "fr_layers": None if f is None else [f] * (len(hidden) + len(extra.get("dense_sizes") or ())),
             "time_s": 1.0, "cpu_time_s": 1.0, "lr": 0.01,
             "skipped_steps": 0}
        if val is not None:
            e.update(val_acc=val[i], val_loss=1.0)
        epochs.append(e)
    scores = [e["val_acc"] if val is not None else e["test_acc"] for e in epochs]
    best = scores.index(max(scores))  # the first best, as training keeps it
    metrics = {"epochs": epochs, "best_test_acc": epochs[best]["test_acc"], "best_epoch": best + 1,
               "wall_time_s": 1.0, "params": 1000, "selected_on": "val" if val is not None else "test"}
    if val is not None:
        metrics["best_val_acc"] = val[best]
    _save_json(out / "config.json", cfg)
    _save_json(out / "metrics.json", metrics)
    _save_csv(out / "metrics.csv", epochs)
    return out


@pytest.fixture
def ablation_runs(tmp_path):
    root = tmp_path / "runs"
    for seed, (a, b) in enumerate([(0.70, 0.80), (0.72, 0.84), (0.74, 0.82)]):
        fake_run(root, f"ad_s{seed}", seed=seed, val=(0.6, 0.7), test=(a, b), fr=(0.1, 0.15))
        fake_run(root, f"ad_none_s{seed}", train_tau="none", seed=seed, val=(0.6, 0.5), test=(a - 0.1, b),
                 fr=(0.2, 0.2))
    fake_run(root, "ad_legacy", train_tau=None, val=(0.6, 0.7), test=(0.7, 0.76), fr=(0.1, 0.15))  # no train_tau: all
    fake_run(root, "ad_m", train_tau="m", val=(0.7, 0.6), test=(0.65, 0.6))
    fake_run(root, "ad_64", hidden=(64,), val=(0.6, 0.7), test=(0.7, 0.9), fr=(0.05, 0.06))
    fake_run(root, "lif_s0", model="lif", val=(0.6, 0.7), test=(0.7, 0.86), fr=(0.3, 0.4))
    fake_run(root, "lif_s1", model="lif", seed=1, val=(0.6, 0.7), test=(0.7, 0.88), fr=(0.3, 0.41))
    fake_run(root, "lstm", model="lstm", train_tau=None, val=(0.6, 0.7), test=(0.7, 0.81), fr=(None, None))
    return root


def _group_row(text, method, tau, hidden):
    rows = [l for l in text.splitlines() if l.startswith(f"| ECG (QTDB) | {method} | {tau} | {hidden} |")]
    assert len(rows) == 1, (method, tau, hidden, rows)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_ablation_groups_tables_and_figures(ablation_runs, tmp_path):
    out = tmp_path / "results"
    assert report.main(["--ablation", str(ablation_runs), "--out", str(out)]) == 0
    text = (out / "ABLATION.md").read_text()
    # adaptive, all trained, 36: three seeds plus the run from before --train-tau
    row = _group_row(text, "Adaptive SRNN", "all", "36")
    accs = [80, 84, 82, 76]
    mean, sd = np.mean(accs), np.std(accs, ddof=1)
    assert row[4:8] == ["4", f"{mean:.2f} ± {sd:.2f}", "76.00", "84.00"]
    assert row[8] == f"{0.15:.4f} ± {0.0:.4f}" and row[9] == "2, 2, 2, 2"
    assert row[10] == "ad_legacy, ad_s0, ad_s1, ad_s2"
    # frozen taus: validation picked epoch 1 in every run, so its test accuracies count
    row = _group_row(text, "Adaptive SRNN", "none", "36")
    frozen = [60, 62, 64]
    assert row[4:6] == ["3", f"{np.mean(frozen):.2f} ± {np.std(frozen, ddof=1):.2f}"] and row[9] == "1, 1, 1"
    assert _group_row(text, "Adaptive SRNN", "m", "36")[4:6] == ["1", "65.00"]  # one run: no sd
    assert _group_row(text, "Adaptive SRNN", "all", "64")[4] == "1"
    assert _group_row(text, "LIF SRNN", "all", "36")[4] == "2"
    assert _group_row(text, "LSTM", "–", "36")[8] == "–"  # a baseline: no train_tau, no Fr
    assert "Skipped" not in text
    for name in ("ablation_neuron.png", "ablation_tau.png", "ablation_size.png"):
        data = (out / "figures" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
        assert f"(figures/{name})" in text


def test_ablation_at_epoch(ablation_runs, tmp_path):
    root = tmp_path / "more"
    fake_run(root, "long", val=(0.5, 0.7, 0.7, 0.9), test=(0.4, 0.6, 0.65, 0.8), fr=(0.1, 0.2, 0.3, 0.4))
    r = report.load_run(root / "long", report.EnergyCosts())
    assert (report.select_epoch(r).epoch, report.select_epoch(r).acc) == (4, 0.8)
    sel = report.select_epoch(r, at_epoch=3)  # epochs 2 and 3 tie on validation: the earlier, as training picks
    assert (sel.epoch, sel.acc, sel.fr, sel.val_acc) == (2, 0.6, 0.2, 0.7)
    assert report.select_epoch(r, at_epoch=1).epoch == 1
    with pytest.raises(ValueError, match="only 4 epochs"):
        report.select_epoch(r, at_epoch=5)
    fake_run(root, "no_val", val=None, test=(0.4, 0.6))
    with pytest.raises(ValueError, match="no val_acc"):
        report.select_epoch(report.load_run(root / "no_val", report.EnergyCosts()), at_epoch=1)

    out = tmp_path / "results"
    assert report.main(["--ablation", str(ablation_runs), "--at-epoch", "1", "--out", str(out)]) == 0
    row = _group_row((out / "ABLATION.md").read_text(), "Adaptive SRNN", "all", "36")
    assert row[4:6] == ["4", f"{np.mean([70, 72, 74, 70]):.2f} ± {np.std([70, 72, 74, 70], ddof=1):.2f}"]
    assert row[9] == "1, 1, 1, 1" and "epochs 1-1" in (out / "ABLATION.md").read_text()


@pytest.mark.parametrize("argv, code, message", [  # 2: a wrong flag (argparse's); 1: what the runs lack
    (["--at-epoch", "3"], 2, "--at-epoch applies to --ablation"),
    (["--ablation", "--at-epoch", "0"], 2, "--at-epoch must be a positive epoch number"),
    (["--ablation", "--at-epoch", "3"], 1, "has only 2 epochs"),
])
def test_ablation_cli_errors(argv, code, message, ablation_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main([str(ablation_runs), "--out", str(tmp_path / "out")] + argv)
    assert exc.value.code == code and message in capsys.readouterr().err


def test_ablation_skips_figures_without_a_comparison(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "a0")
    fake_run(root, "a1", seed=1, lr=0.1)
    out = tmp_path / "results"
    report.write_ablation([root], out)
    text = (out / "ABLATION.md").read_text()
    assert text.count("Skipped: no task has") == 3
    assert not list((out / "figures").glob("ablation_*.png"))
    assert "Adaptive SRNN, train_tau all, 36: lr" in text  # the group mixes learning rates: said


def test_ablation_on_trained_runs(runs, tmp_path):
    """The runs the training CLI wrote (no validation split): grouped by model; --at-epoch
    needs validation and says so."""
    out = tmp_path / "results"
    assert report.main(["--ablation", str(runs / "all"), "--out", str(out)]) == 0
    text = (out / "ABLATION.md").read_text()
    for model, method, tau in (("adaptive", "Adaptive SRNN", "all"), ("lif", "LIF SRNN", "all"),
                               ("lstm", "LSTM", "–")):
        met = json.loads((runs / "all" / f"ecg_{model}" / "metrics.json").read_text())
        row = _group_row(text, method, tau, "6")
        assert row[4:6] == ["1", f"{100 * met['best_test_acc']:.2f}"] and row[10] == f"ecg_{model}"
    assert (out / "figures" / "ablation_neuron.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="no val_acc"):
        report.write_ablation([runs / "all"], out, at_epoch=1)


def _learning_curve(tmp_path, monkeypatch, epochs, best_epoch):
    """The learning-curve figure of a run with these metrics rows, chosen on validation."""
    run = report.Run(tmp_path, "r", {"task": "smnist", "model": "adaptive", "hidden_sizes": [4], "input_size": 2,
                                     "num_classes": 10},
                     {"epochs": epochs, "best_epoch": best_epoch, "selected_on": "val"})
    figs = []
    monkeypatch.setattr(report, "_save", lambda plt, fig, path: figs.append(fig))
    report.plot_learning_curve(run, tmp_path / "curve.png")
    return figs[0]


def test_learning_curve_shows_validation_and_the_chosen_epoch(tmp_path, monkeypatch):
    epochs = [{"epoch": k, "loss": 1.0 / k, "train_acc": 0.5 + 0.1 * k, "test_acc": 0.4 + 0.1 * k,
               "test_loss": 1.2 / k, "val_acc": [0.6, 0.8, 0.7][k - 1], "val_loss": 0.9 / k, "fr": 0.1}
              for k in (1, 2, 3)]
    loss_ax, acc_ax = _learning_curve(tmp_path, monkeypatch, epochs, best_epoch=2).axes[:2]
    val = next(l for l in acc_ax.get_lines() if l.get_label() == "validation")
    assert list(val.get_ydata()) == pytest.approx([60, 80, 70])
    assert [l.get_label() for l in loss_ax.get_lines()] == ["train", "test", "validation"]
    chosen = next(l for l in acc_ax.get_lines() if l.get_label().startswith("chosen"))
    assert chosen.get_label() == "chosen (val): epoch 2" and list(chosen.get_xdata()) == [2, 2]


def test_learning_curve_zooms_on_the_later_epochs(tmp_path, monkeypatch):
    epochs = [{"epoch": k, "loss": 1.0 / k, "train_acc": 0.9 + 0.005 * k, "test_acc": 0.8 + 0.01 * k,
               "test_loss": 1.2 / k, "val_acc": 0.81 + 0.01 * k, "val_loss": 0.9 / k, "fr": 0.1} for k in range(1, 13)]
    fig = _learning_curve(tmp_path, monkeypatch, epochs, best_epoch=11)
    zoom = next(ax for ax in fig.axes if ax.get_title().startswith("accuracy, epochs"))
    assert zoom.get_title() == "accuracy, epochs 5-12"  # from 40 % of the run on
    val = next(l for l in zoom.get_lines() if l.get_label() == "validation")
    assert list(val.get_xdata()) == list(range(5, 13))
    assert list(val.get_ydata()) == pytest.approx([100 * (0.81 + 0.01 * k) for k in range(5, 13)])
    assert any(l.get_label() == "chosen (val): epoch 11" for l in zoom.get_lines())
    acc_ax = fig.axes[1]  # the full-scale panel's legend holds Fr too (one legend, below)
    assert "Fr (test)" in [t.get_text() for t in acc_ax.get_legend().get_texts()]


def test_report_says_which_runs_are_evaluated_on_a_weight_average(runs, tmp_path):
    """A run switched to --ema at resume: the report names it, the decay and the first averaged epoch."""
    run_dir = tmp_path / "all" / "ecg_adaptive"
    shutil.copytree(runs / "all" / "ecg_adaptive", run_dir)
    assert train.main(["--resume", str(run_dir), "--epochs", "2", "--ema", "0.5", "--quiet"]) == 0
    out = tmp_path / "results"
    assert report.main([str(tmp_path / "all"), "--out", str(out)]) == 0
    text = (out / "REPORT.md").read_text()
    assert "ecg_adaptive (decay 0.5, from epoch 2; the epochs before on the trained weights)" in text
    assert (out / "figures" / "curve_ecg_adaptive.png").read_bytes().startswith(PNG)


def test_report_names_weight_decay_and_forks(runs, tmp_path):
    """A run forked with --weight-decay: the report gives the decay, from which epoch, and the fork's origin."""
    base = tmp_path / "base" / "ecg_adaptive"
    shutil.copytree(runs / "all" / "ecg_adaptive", base)
    fork = tmp_path / "all" / "ecg_adaptive_wd"
    assert train.main(["--resume", str(base), "--out", str(fork), "--epochs", "2", "--weight-decay", "0.1",
                       "--quiet"]) == 0
    out = tmp_path / "results"
    assert report.main([str(tmp_path / "all"), "--out", str(out)]) == 0
    text = (out / "REPORT.md").read_text()
    assert "(`--weight-decay`): ecg_adaptive_wd (0.1, from epoch 2)." in text
    assert "ecg_adaptive_wd from ecg_adaptive at epoch 1." in text


def test_dense_layers_group_apart_and_new_settings_default_for_old_runs(tmp_path):
    """A network with dense layers is its own group (hidden 36-16d); a run that records the
    settings added later at their defaults groups with older runs without being flagged."""
    root = tmp_path / "runs"
    fake_run(root, "old")
    fake_run(root, "new", seed=1, dense_sizes=[], rec_init="orthogonal", optimizer="adam", lr_linear=None)
    fake_run(root, "dense", dense_sizes=[16])
    assert report.load_run(root / "dense", report.EnergyCosts()).network == "4-36-16d-6"
    out = tmp_path / "results"
    report.write_ablation([root], out)
    text = (out / "ABLATION.md").read_text()
    assert _group_row(text, "Adaptive SRNN", "all", "36")[4] == "2"
    assert _group_row(text, "Adaptive SRNN", "all", "36-16d")[4] == "1"
    assert "differ in more than seed" not in text


def test_runs_from_before_train_tau_group_with_newer_ones_unflagged(tmp_path):
    """A run whose config predates --train-tau trained all time constants: it groups with a newer
    run that records train_tau "all", and the pair is not flagged as differing."""
    root = tmp_path / "runs"
    fake_run(root, "pre_tau", train_tau=None)
    fake_run(root, "new", seed=1)
    out = tmp_path / "results"
    report.write_ablation([root], out)
    text = (out / "ABLATION.md").read_text()
    assert _group_row(text, "Adaptive SRNN", "all", "36")[4] == "2"
    assert "differ in more than seed" not in text
