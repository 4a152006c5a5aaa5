"""Whole-record segmentation (srnn_fast.segment): streaming equals one pass, the WFDB
annotations round-trip, the preprocessing is training's, bad records fail clearly and
leave nothing behind."""
import json
import sys
import types

import numpy as np
import pytest
import torch

import srnn_fast

wfdb = pytest.importorskip("wfdb")

from srnn_fast import segment as S  # noqa: E402
from srnn_fast import train as T  # noqa: E402
from srnn_fast.data import DataError, qtdb, synthetic  # noqa: E402
from srnn_fast.data.encoders import level_crossing  # noqa: E402

ECG_CONFIG = {"task": "ecg", "model": "lif", "input_size": 4, "hidden_sizes": [12], "num_classes": 6,
              "readout": "membrane", "decode": "per_step", "backend": "auto", "tau_out_init": [20.0, 5.0],
              "tau_m_init": [20.0, 5.0], "tau_adp_init": [150.0, 10.0], "b0": 0.01, "surrogate": "multi_gaussian",
              "init_state": "uniform", "dtype": "float32", "data": {"threshold": 0.1, "filter": "bandpass"}}


def make_run(folder, seed=0, **changes):
    """A run folder holding best.pt of an untrained network (the command only needs the weights and config)."""
    cfg = dict(ECG_CONFIG, **changes)
    torch.manual_seed(seed)
    net = T.build_model(cfg)
    with torch.no_grad():  # larger input weights, so that the hidden layer fires and the labels vary
        net.layers[0].input.weight.mul_(8.0)
    folder.mkdir(parents=True)
    torch.save({"config": cfg, "model": net.state_dict(), "epoch": 1}, folder / "best.pt")
    return folder


@pytest.fixture
def record(tmp_path):
    """A 20-beat synthetic record (4500 samples at 250 Hz) with q1c annotations; its stem."""
    synthetic.write_ecg_record(tmp_path / "rec", "r1", n_beats=20)
    return tmp_path / "rec" / "r1"


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("readout", ["membrane", "integrator"])
def test_chunked_stream_equals_one_pass_float64(backend, readout):
    if backend not in srnn_fast.available_backends():
        pytest.skip(f"the {backend} backend is not built here")
    cfg = dict(ECG_CONFIG, readout=readout, backend=backend, dtype="float64")
    net = T.build_model(cfg).eval()
    with torch.no_grad():
        net.layers[0].input.weight.mul_(8.0)
    rng = np.random.default_rng(0)
    x = (rng.random((1000, 4)) < 0.1).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(x).double()[None])[0]
    for chunk in (64, 192, 1024):
        parts = list(S.stream_chunks(net, x, chunk))
        assert [p[0] for p in parts] == list(range(0, 1000, chunk))
        streamed = torch.cat([p[1] for p in parts])
        assert torch.equal(streamed, whole), chunk  # bit for bit
        assert sum(float(s.sum()) for p in parts for s in p[2][:1]) > 0  # the hidden layer fires
    with pytest.raises(ValueError, match="multiple of 64"):
        next(S.stream_chunks(net, x, 100))


def test_lstm_streams_like_one_pass():
    cfg = dict(ECG_CONFIG, model="lstm", readout="linear", dtype="float64")
    net = T.build_model(cfg).eval()
    x = (np.random.default_rng(1).random((700, 4)) < 0.1).astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(x).double()[None])[0]
    streamed = torch.cat([p[1] for p in S.stream_chunks(net, x, 128)])
    torch.testing.assert_close(streamed, whole, rtol=1e-12, atol=1e-12)


def test_encoding_is_trainings(record):
    """encode() of a record at the training rate is the loader's filtered, normalised, encoded record."""
    raw, fs = qtdb.read_signal(record)
    cfg = {"data": {"threshold": 0.1, "filter": "bandpass"}}
    signal, _, _ = qtdb.load_record(record.parent, record.name, filter="bandpass")
    np.testing.assert_array_equal(S.encode(raw, fs, cfg), level_crossing(signal, 0.1).numpy())


def test_resampled_record_labels_every_sample(tmp_path, record):
    """A 500 Hz record is resampled to the network's 250 Hz; labels come back at 500 Hz."""
    raw, fs = qtdb.read_signal(record)
    up = np.repeat(raw, 2, axis=0)
    wfdb.wrsamp("r500", fs=500, units=["mV", "mV"], sig_name=["MLII", "V5"], p_signal=up, fmt=["212", "212"],
                write_dir=str(tmp_path))
    assert len(S.encode(up, 500.0, {"data": {}})) == len(raw)
    run = make_run(tmp_path / "run")
    model, cfg = S.load_run(run)
    s = S.segment_record(tmp_path / "r500", model, cfg, tmp_path / "out", plot=False)
    assert s["samples"] == len(up) and s["network_steps"] == len(raw) and s["fs"] == 500.0
    rows = (tmp_path / "out" / "r500_labels.csv").read_text().splitlines()
    assert len(rows) == 1 + len(up) and rows[0] == "sample,time_s,label,wave"
    assert rows[3].startswith("2,0.004,")


def test_annotations_round_trip_through_rdann(tmp_path, record):
    """Expert labels -> QTDB-style annotations -> wrann -> rdann -> the loader's rule: the same labels."""
    ann = wfdb.rdann(str(record), "q1c")
    raw, fs = qtdb.read_signal(record)
    labels = qtdb.segment_labels(ann.sample, ann.symbol, len(raw), fs)
    samples, symbols = S.labels_to_annotations(labels, raw[:, 0])
    assert set(symbols) == {"(", "p", ")", "N", "t"}
    path = tmp_path / "r1.srnn"
    S._write_annotations(path, "r1", samples, symbols, fs)
    back = wfdb.rdann(str(tmp_path / "r1"), "srnn")
    np.testing.assert_array_equal(back.sample, samples)
    assert back.symbol == symbols and back.fs == fs
    again = qtdb.segment_labels(back.sample, back.symbol, len(raw), fs)
    np.testing.assert_array_equal(again, labels)
    # the P and T peaks land on the synthetic bumps (noisy: within their width, 6 and 12 samples)
    for sym, width in (("p", 6), ("t", 12)):
        got = back.sample[[i for i, s in enumerate(back.symbol) if s == sym]]
        want = ann.sample[[i for i, s in enumerate(ann.symbol) if s == sym]]
        assert len(got) == len(want) and np.abs(got - want).max() <= width, sym


def test_annotation_edges_and_short_runs():
    lead = np.zeros(40)
    # starts inside a P wave (no onset), a QRS whose RS run reaches the end (no offset)
    labels = np.array([0] * 5 + [1] * 5 + [5] * 2 + [1] * 1 + [2] * 5 + [3] * 22)
    samples, symbols = S.labels_to_annotations(labels, lead)
    assert symbols == ["p", ")", "(", "N"] and list(samples) == [0, 5, 13, 18]
    cleaned = S.absorb_short_runs(labels, 3)
    np.testing.assert_array_equal(cleaned[10:13], [1, 1, 1])  # the 2-step TP flicker joins the PQ before it
    assert S.label_runs(cleaned)[:3] == [(0, 5, 0), (5, 13, 1), (13, 18, 2)]


def test_command_writes_every_output(tmp_path, record, capsys):
    run = make_run(tmp_path / "run")
    # a peer: another network, with its own preprocessing (threshold, no filter)
    peer = make_run(tmp_path / "peer", seed=1, data={"threshold": 0.2, "filter": "none"})
    out = tmp_path / "out"
    assert S.main([str(record), "--checkpoint", str(run), "--out", str(out), "--quiet", "--compare-reference",
                   "--plot-seconds", "4", "--peer", str(peer)]) == 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "x real time" in printed and "uJ per s of signal" in printed
    assert sorted(p.name for p in out.iterdir()) == ["r1.json", "r1.png", "r1.srnn", "r1_labels.csv",
                                                      "scores.json", "scores.md"]
    summary = json.loads((out / "r1.json").read_text())
    n = summary["samples"]
    assert n == 4500 and set(summary["throughput"]) == {"cpp", "reference"}
    assert summary["reference_agreement"] > 0.99 and summary["energy_uj_per_s"] > 0
    assert summary["accuracy"]["srnn"][1] == (qtdb.load_record(record.parent, "r1")[1] >= 0).sum()
    # the peer scored as its own run would score it, on the same samples
    alone = S.segment_record(record, *S.load_run(peer), tmp_path / "peer_out", plot=False)["accuracy"]["srnn"]
    assert summary["accuracy"]["srnn peer"] == alone != summary["accuracy"]["srnn"]
    labels = np.loadtxt(out / "r1_labels.csv", delimiter=",", skiprows=1, usecols=2, dtype=int)
    assert len(labels) == n and len(np.unique(labels)) > 1
    back = wfdb.rdann(str(out / "r1"), "srnn")  # readable by WFDB tools, and it encodes the labels
    raw, fs = qtdb.read_signal(record)
    want = S.absorb_short_runs(labels, 5)
    rebuilt = qtdb.segment_labels(back.sample, back.symbol, n, fs, max_tp_s=1e9)
    assert (rebuilt >= 0).mean() > 0.3
    np.testing.assert_array_equal(rebuilt[rebuilt >= 0], want[rebuilt >= 0])
    assert (out / "r1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| r1 |" in (out / "scores.md").read_text()


def test_test_records_come_from_the_data_folder(tmp_path, record, monkeypatch):
    """--test-records adds the checkpoint's test records (its data_info) from DATA/qtdb, DATA
    from --data-dir or $SRNN_FAST_DATA, after the RECORD paths given."""
    for i, name in enumerate(("t1", "t2", "t3")):
        synthetic.write_ecg_record(tmp_path / "data" / "qtdb", name, n_beats=4, seed=i)
    run = make_run(tmp_path / "run", data_info={"test_records": ["t1", "t3"]})
    args = ["--checkpoint", str(run), "--quiet", "--no-plot", "--test-records"]
    scored = lambda out: [s["record"] for s in json.loads((out / "scores.json").read_text())]  # noqa: E731
    assert S.main(args + ["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "a")]) == 0
    assert scored(tmp_path / "a") == ["t1", "t3"]
    monkeypatch.setenv("SRNN_FAST_DATA", str(tmp_path / "data"))
    assert S.main(args + [str(record), "--out", str(tmp_path / "b")]) == 0
    assert scored(tmp_path / "b") == ["r1", "t1", "t3"]


def test_annotator_option(tmp_path, record, capsys):
    """--ann EXT scores against RECORD.EXT and is an error where that file is missing; the
    default q1c is scored where it exists, else nothing is; --ann '' scores nothing."""
    ann = wfdb.rdann(str(record), "q1c")
    first = slice(0, 40)  # the first 5 beats only: other expert labels than q1c's
    wfdb.wrann("r1", "man", ann.sample[first], symbol=ann.symbol[first], write_dir=str(record.parent))
    raw, fs = qtdb.read_signal(record)
    want = qtdb.segment_labels(ann.sample[first], ann.symbol[first], len(raw), fs)
    run = make_run(tmp_path / "run")
    base = [str(record), "--checkpoint", str(run), "--quiet", "--no-plot"]
    summary = lambda out: json.loads((out / "r1.json").read_text())  # noqa: E731
    assert S.main(base + ["--out", str(tmp_path / "q1c")]) == 0
    assert S.main(base + ["--out", str(tmp_path / "man"), "--ann", "man"]) == 0
    counted = summary(tmp_path / "man")["accuracy"]["srnn"][1]
    assert counted == (want >= 0).sum() < summary(tmp_path / "q1c")["accuracy"]["srnn"][1]
    expert = np.loadtxt(tmp_path / "man" / "r1_labels.csv", delimiter=",", skiprows=1, usecols=4, dtype=int)
    np.testing.assert_array_equal(expert, want)
    assert "expert annotations (man)" in (tmp_path / "man" / "scores.md").read_text()
    with pytest.raises(SystemExit) as e:
        S.main(base + ["--out", str(tmp_path / "pu0"), "--ann", "pu0"])
    assert e.value.code != 0 and "--ann pu0" in capsys.readouterr().err and not (tmp_path / "pu0").exists()
    for out, extra in (("none", ["--ann", ""]), ("no_q1c", [])):
        if out == "no_q1c":
            (record.parent / "r1.q1c").unlink()
        assert S.main(base + ["--out", str(tmp_path / out)] + extra) == 0
        assert summary(tmp_path / out)["accuracy"] == {} and not (tmp_path / out / "scores.md").exists()
        assert (tmp_path / out / "r1_labels.csv").read_text().split("\n", 1)[0] == "sample,time_s,label,wave"


@pytest.mark.parametrize("args,named", [
    (["--threads", "0"], "--threads"), (["--chunk", "100"], "--chunk"), (["--plot-seconds", "0"], "--plot-seconds"),
    (["--plot-start", "-1"], "--plot-start"), (["--min-run-ms", "-5"], "--min-run-ms"),
    (["--checkpoint", "nowhere"], "--checkpoint"), (["--neurokit"], "--neurokit"),
    (["--leads", "MLII"], "--leads"), (["--no-record"], "RECORD"), (["--no-record", "--test-records"], "--data-dir")],
    ids=["threads", "chunk", "plot-seconds", "plot-start", "min-run-ms", "checkpoint", "neurokit", "one-lead",
         "no-record", "test-records-without-data"])
def test_argument_errors_name_the_argument(tmp_path, record, monkeypatch, capsys, args, named):
    """Each bad argument: a non-zero exit, a message that names it, nothing written."""
    monkeypatch.setitem(sys.modules, "neurokit2", None)  # not installed
    monkeypatch.delenv("SRNN_FAST_DATA", raising=False)
    given = [] if "--no-record" in args else [str(record)]
    argv = given + ["--checkpoint", str(make_run(tmp_path / "run")), "--out", str(tmp_path / "out"), "--quiet"]
    with pytest.raises(SystemExit) as e:
        S.main(argv + [a for a in args if a != "--no-record"])
    assert e.value.code not in (0, None)
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _bad(tmp_path, record, case):
    folder = record.parent
    if case == "missing header":
        (folder / "r1.hea").unlink()
        return "r1.hea"
    if case == "missing signal":
        (folder / "r1.dat").unlink()
        return "r1.dat"
    if case == "truncated":
        dat = folder / "r1.dat"
        dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 2])
        return r"r1.*truncated"
    raw, fs = qtdb.read_signal(record)
    leads = raw[:, :1] if case == "one lead" else np.concatenate([raw, raw[:, :1]], axis=1)
    names = ["MLII", "V5", "V2"][:leads.shape[1]]
    wfdb.wrsamp("r1", fs=fs, units=["mV"] * len(names), sig_name=names, p_signal=leads, fmt=["212"] * len(names),
                write_dir=str(folder))
    return rf"r1\.hea.*{leads.shape[1]}"


@pytest.mark.parametrize("case", ["missing header", "missing signal", "truncated", "one lead", "three leads"])
def test_bad_records_fail_naming_the_file_and_write_nothing(tmp_path, record, case, capsys):
    run = make_run(tmp_path / "run")
    message = _bad(tmp_path, record, case)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        qtdb.read_signal(record)
    with pytest.raises(SystemExit) as e:
        S.main([str(record), "--checkpoint", str(run), "--out", str(out), "--quiet"])
    assert e.value.code == 1 and str(record.parent / "r1") in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())


def test_three_leads_with_two_chosen(tmp_path, record):
    _bad(tmp_path, record, "three leads")
    run = make_run(tmp_path / "run")
    assert S.main([str(record), "--checkpoint", str(run), "--out", str(tmp_path / "out"), "--quiet", "--no-plot",
                   "--leads", "V5,0"]) == 0
    with pytest.raises(SystemExit):
        S.main([str(record), "--checkpoint", str(run), "--out", str(tmp_path / "o2"), "--leads", "V9,0"])


def test_an_error_while_writing_leaves_nothing_behind(tmp_path, record, monkeypatch):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(S, "_write_plot", fail)
    with pytest.raises(OSError, match="disk full"):
        S.main([str(record), "--checkpoint", str(run), "--out", str(out), "--quiet"])
    assert list(out.iterdir()) == []  # neither the finished .srnn / .csv nor any temporary


def test_neurokit_points_map_through_the_loader_rule(monkeypatch):
    """NeuroKit2's per-beat points become ( p ) ( N ) ( t ) annotations and then the loader's labels."""
    nan = float("nan")
    waves = {"ECG_P_Onsets": [10, 210], "ECG_P_Peaks": [20, 220], "ECG_P_Offsets": [30, 230],
             "ECG_R_Onsets": [45, 245], "ECG_R_Offsets": [65, 265], "ECG_T_Onsets": [90, nan],
             "ECG_T_Peaks": [110, 310], "ECG_T_Offsets": [140, 340], "ECG_Q_Peaks": [50, 250]}
    fake = types.SimpleNamespace(ecg_clean=lambda x, sampling_rate: x,
                                 ecg_peaks=lambda x, sampling_rate: (None, {"ECG_R_Peaks": np.array([55, 255])}),
                                 ecg_delineate=lambda x, r, sampling_rate, method: (None, waves))
    monkeypatch.setitem(sys.modules, "neurokit2", fake)
    labels = S.neurokit_labels(np.zeros(400), 250.0)
    want = np.full(400, -1, np.int8)
    for (a, b), lab in zip([(10, 30), (30, 45), (45, 55), (55, 65), (65, 140), (140, 210), (210, 230), (230, 245),
                            (245, 255), (255, 265), (265, 340)], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]):
        want[a:b] = lab
    np.testing.assert_array_equal(labels, want)


def test_neurokit_missing_says_which_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "neurokit2", None)
    with pytest.raises(ImportError, match=r"srnn_fast\[delineate\]"):
        S.neurokit_labels(np.zeros(10), 250.0)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        S.load_run(tmp_path / "nothing")
    run = make_run(tmp_path / "run", task="shd", decode="mean")
    with pytest.raises(ValueError, match="not an ECG run"):
        S.load_run(run)


def test_score_table_counts_unlabelled_samples_as_wrong():
    assert S.accuracy(np.array([0, 0, -1, 5, 5]), np.array([0, 1, 1, 5, -1])) == (2, 4, 1)
    table = S._table([{"record": "a", "accuracy": {"srnn": [3, 4, 0], "neurokit2": [2, 4, 1]}},
                      {"record": "b", "accuracy": {"srnn": [1, 4, 0], "neurokit2": [4, 4, 0]}}], ["srnn", "neurokit2"])
    assert "| a | 4 | 75.0 | 50.0 (25 % unlabelled) |" in table
    assert "| **all** | 8 | **50.0** | **75.0** (12 % unlabelled) |" in table
