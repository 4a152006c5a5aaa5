"""The report on tiny run folders trained in the test through the training CLI."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
from srnn_fast import report, train  # noqa: E402
from srnn_fast.energy import estimate_energy  # noqa: E402

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
