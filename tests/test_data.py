"""Loaders: the QTDB label rule, splits, the npz format, MNIST/SHD files, errors on bad files."""
import gzip
import io
import os
import pathlib
import urllib.error

import numpy as np
import pytest
from conftest import HAVE_WFDB
import torch

from srnn_fast.data import DataError, build_datasets, download, mnist, qtdb, resolve_data_dir, shd, synthetic
from srnn_fast.data.common import split_by_group
from srnn_fast.data.encoders import bin_spikes, level_crossing

P, PQ, QR, RS, ST, TP = range(6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for task in ("ecg", "smnist", "shd") if HAVE_WFDB else ("smnist", "shd"):
        synthetic.write_tiny(task, root)
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SRNN_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_annotated(folder, name, n, annotations):
    """A 2-lead wfdb record of n samples with q1c annotations [(symbol, sample)]."""
    import wfdb

    t = np.arange(n)
    signal = np.stack([np.sin(t / 9.0), np.cos(t / 13.0)], axis=1)
    wfdb.wrsamp(name, fs=250, units=["mV", "mV"], sig_name=["MLII", "V5"], p_signal=signal, fmt=["212", "212"],
                write_dir=str(folder))
    wfdb.wrann(name, "qxc", np.array([s for _, s in annotations]), symbol=[a for a, _ in annotations],
               write_dir=str(folder))
    (folder / f"{name}.qxc").replace(folder / f"{name}.q1c")
    return signal


# ---- the label rule -------------------------------------------------------------------

@pytest.mark.wfdb
def test_label_rule_on_wfdb_record(tmp_path):
    ann = [("(", 100), ("p", 110), (")", 120), ("(", 130), ("N", 140), (")", 150), ("t", 200), (")", 230),
           # beat 2, with a U wave after T (no boundary)
           ("(", 300), ("p", 310), (")", 320), ("(", 330), ("N", 340), (")", 350), ("(", 380), ("t", 400),
           (")", 430), ("(", 440), ("u", 450), (")", 460),
           # beat 3: P wave without onset -> the TP before it and its P are unlabeled
           ("p", 510), (")", 520), ("(", 530), ("N", 540), (")", 550), ("t", 600), (")", 630),
           # beat 4 after 260 samples > 1 s: the TP before it is unlabeled; no T after it
           ("(", 890), ("p", 900), (")", 910), ("(", 920), ("V", 930), (")", 940)]
    write_annotated(tmp_path, "rec", 1000, ann)
    signal, labels, fs = qtdb.load_record(tmp_path, "rec")
    expected = np.full(1000, -1)
    for lo, hi, label in [(100, 120, P), (120, 130, PQ), (130, 140, QR), (140, 150, RS), (150, 230, ST),
                          (230, 300, TP), (300, 320, P), (320, 330, PQ), (330, 340, QR), (340, 350, RS),
                          (350, 430, ST), (520, 530, PQ), (530, 540, QR), (540, 550, RS), (550, 630, ST),
                          (890, 910, P), (910, 920, PQ), (920, 930, QR), (930, 940, RS)]:
        expected[lo:hi] = label
    np.testing.assert_array_equal(labels, expected)
    assert fs == 250 and signal.shape == (1000, 2)
    np.testing.assert_allclose(signal.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(signal.std(0), 1, atol=1e-9)


def test_label_rule_tp_limit_and_missing_offsets():
    # QRS without offset: RS runs to nothing -> unlabeled; TP limit scales with fs and max_tp_s.
    syms = ["(", "p", ")", "(", "N", "t", ")", "(", "p", ")"]
    samples = [0, 5, 10, 20, 30, 60, 80, 100, 105, 110]
    labels = qtdb.segment_labels(samples, syms, 120, fs=100)
    assert labels[:10].tolist() == [P] * 10 and labels[10:20].tolist() == [PQ] * 10
    assert labels[20:30].tolist() == [QR] * 10 and (labels[30:80] == -1).all()
    assert (labels[80:100] == TP).all() and (labels[100:110] == P).all() and (labels[110:] == -1).all()
    short = qtdb.segment_labels(samples, syms, 120, fs=100, max_tp_s=0.19)
    assert (short[80:100] == -1).all()


def test_windows_rule():
    labels = np.full(100, -1)
    labels[10:70] = 0
    # stride 20 from the first label (10) while the window fits before the last (70), plus
    # one ending at 70; kept if half of it is labelled.
    assert qtdb.window_starts(labels, 30, 20, 0.5) == [10, 30, 40]
    assert qtdb.window_starts(labels, 30, 30, 1.0) == [10, 40]
    assert qtdb.window_starts(labels, 101, 30, 0.5) == []
    labels[:] = -1
    labels[95:] = 1  # region at the very end: the window is pulled back inside the record
    assert qtdb.window_starts(labels, 10, 10, 0.5) == [90]


# ---- ECG data sets --------------------------------------------------------------------

@pytest.mark.wfdb
def test_ecg_from_tiny_records(tiny):
    train, test, info = build_datasets("ecg", tiny, seed=0, seq_len=500)
    assert info["input_size"] == 4 and info["num_classes"] == 6 and info["seq_len"] == 500
    assert info["class_names"] == ["P", "PQ", "QR", "RS", "ST", "TP"]
    x, y = train[0]
    assert x.shape == (500, 4) and x.dtype == torch.float32 and y.shape == (500,) and y.dtype == torch.int64
    assert set(x.unique().tolist()) == {0.0, 1.0} and y.min() >= -1 and y.max() <= 5
    loader = torch.utils.data.DataLoader(train, batch_size=3)
    xb, yb = next(iter(loader))
    assert xb.shape == (3, 500, 4) and yb.shape == (3, 500)
    # The first window of a record starts at its first annotation (P onset of beat 0) and
    # its inputs are the level-crossing code of the normalised record from there.
    name = info["train_records"][0]
    signal, labels, _ = qtdb.load_record(tiny / "qtdb", name)
    start = 300 + synthetic.BEAT["p_on"]
    np.testing.assert_array_equal(y.numpy(), labels[start:start + 500])
    assert torch.equal(x, level_crossing(signal[start:start + 500], 0.3))


@pytest.mark.wfdb
def test_ecg_context_precedes_each_window(tiny):
    """context=C: the same labelled steps, preceded by C unlabelled steps of the record's
    own signal (zero-padded before the start of the record)."""
    plain = qtdb.preprocess(tiny / "qtdb", 500)
    ctx = qtdb.preprocess(tiny / "qtdb", 500, context=400)
    assert ctx["x"].shape == (len(plain["x"]), 900, 4) and ctx["y"].shape == (len(plain["x"]), 900)
    assert (ctx["y"][:, :400] == -1).all()
    np.testing.assert_array_equal(ctx["y"][:, 400:], plain["y"])
    np.testing.assert_array_equal(ctx["record"], plain["record"])
    signal, _, _ = qtdb.load_record(tiny / "qtdb", plain["record"][0])
    start = 300 + synthetic.BEAT["p_on"]  # the first window; its context starts 90 steps before the record
    pad = 400 - start
    assert pad > 0 and (ctx["x"][0, :pad] == 0).all()
    np.testing.assert_array_equal(ctx["x"][0, pad:], level_crossing(signal[:start + 500], 0.3).numpy())
    second = ctx["x"][1]  # a later window: all 400 context steps come from the record
    assert second[:400].any()
    train, _, info = build_datasets("ecg", tiny, seed=0, seq_len=500, context=400)
    assert info["seq_len"] == 900 and train[0][0].shape == (900, 4)
    with pytest.raises(ValueError, match="context"):
        build_datasets("ecg", tiny, seq_len=500, context=-1)


@pytest.mark.wfdb  # and with it scipy
def test_bandpass_removes_baseline_and_noise_keeps_waves():
    """filter="bandpass": a slow baseline wander and 50 Hz mains are removed, a QRS-like
    pulse and a P-like wave keep their shape."""
    fs = 250.0
    t = np.arange(5000) / fs
    beats = np.zeros_like(t)
    for c in np.arange(0.5, 20, 0.8):  # one beat every 0.8 s: a P wave (0.1 s) then a QRS (0.04 s)
        beats += 0.15 * np.exp(-0.5 * ((t - c) / 0.025) ** 2) + 1.0 * np.exp(-0.5 * ((t - c - 0.16) / 0.01) ** 2)
    wander, mains = 0.8 * np.sin(2 * np.pi * 0.3 * t), 0.1 * np.sin(2 * np.pi * 50 * t)
    raw = np.stack([beats + wander + mains, -beats + 0.5 * wander], axis=1)
    out = qtdb.bandpass(raw, fs)
    assert out.shape == raw.shape
    inner = slice(250, -250)  # away from the ends of the filters
    for lead, sign in ((0, 1), (1, -1)):
        err = out[inner, lead] - sign * beats[inner]
        # what is left of the 0.8 / 0.1 amplitude wander / mains, and how much of the waves
        assert np.abs(err - err.mean()).max() < 0.12 and np.corrcoef(out[inner, lead], beats[inner])[0, 1] * sign > 0.98


@pytest.mark.wfdb
def test_ecg_filter_option(tiny, cache):
    plain = build_datasets("ecg", tiny, seq_len=500)[0]
    filtered = build_datasets("ecg", tiny, seq_len=500, filter="bandpass")[0]
    assert filtered.x.shape == plain.x.shape and not torch.equal(filtered.x, plain.x)
    assert len(list(cache.glob("qtdb-*.npz"))) == 2  # its own cache file
    name = sorted(p.name[:-4] for p in (tiny / "qtdb").glob("*.q1c"))[0]
    signal, _, _ = qtdb.load_record(tiny / "qtdb", name, filter="bandpass")
    assert abs(signal.mean()) < 1e-9 and np.allclose(signal.std(axis=0), 1.0)
    with pytest.raises(ValueError, match="filter must be one of 'none', 'bandpass'; got 'lowpass'"):
        build_datasets("ecg", tiny, seq_len=500, filter="lowpass")


def test_distort_gain_stretch_noise():
    rng = np.random.default_rng(0)
    n = 2000
    signal = np.stack([np.sin(np.arange(n) / 20.0), np.cos(np.arange(n) / 30.0)], axis=1)
    labels = (np.arange(n) // 100 % 6).astype(np.int8)
    out, lab = qtdb.distort(signal, labels, np.random.default_rng(0), noise=0.0)
    factor = len(out) / n
    assert 0.9 <= factor <= 1.1 and len(lab) == len(out) and lab.dtype == np.int8
    # Stretch: each label segment is ~100 * factor samples long; gains per lead in [0.6, 1.6].
    runs = np.diff(np.flatnonzero(np.diff(lab.astype(int)) != 0))
    assert np.abs(runs - 100 * factor).max() <= 1.5
    gains = np.abs(out).max(axis=0) / np.abs(signal).max(axis=0)
    assert ((gains > 0.59) & (gains < 1.61)).all() and abs(gains[0] - gains[1]) > 1e-3
    noisy, _ = qtdb.distort(signal, labels, np.random.default_rng(0))  # same draws, plus noise
    assert 0.02 < (noisy - out).std() < 0.04
    again, _ = qtdb.distort(signal, labels, np.random.default_rng(0))
    np.testing.assert_array_equal(again, noisy)


@pytest.mark.wfdb
def test_ecg_augment_only_the_training_records(tiny):
    plain_train, plain_test, info = build_datasets("ecg", tiny, seq_len=500)
    train, test, info_aug = build_datasets("ecg", tiny, seq_len=500, augment=2)
    assert torch.equal(test.x, plain_test.x) and torch.equal(test.y, plain_test.y)
    assert info_aug["train_records"] == info["train_records"]
    assert torch.equal(train.x[:len(plain_train)], plain_train.x)  # the records first, then the copies
    extra = train.x[len(plain_train):]
    assert len(extra) >= len(plain_train)  # 2 copies, each ~ as many windows as the record (+-10 % length)
    assert not any(torch.equal(e, p) for e in extra for p in plain_train.x)
    again = build_datasets("ecg", tiny, seq_len=500, augment=2)[0]
    assert torch.equal(again.x, train.x)  # seeded by the data seed
    other = build_datasets("ecg", tiny, seq_len=500, augment=2, seed=0, test_fraction=0.5)[0]
    assert len(other) < len(train)
    with pytest.raises(ValueError, match="augment"):
        build_datasets("ecg", tiny, seq_len=500, augment=-1)


def test_ecg_augment_needs_raw_records(tmp_path):
    qtdb.save_npz(tmp_path / "e.npz", np.zeros((4, 10, 4), np.uint8), np.zeros((4, 10), np.int8))
    with pytest.raises(ValueError, match="augment needs the raw QTDB records"):
        build_datasets("ecg", npz=tmp_path / "e.npz", augment=1)


@pytest.mark.wfdb
def test_split_by_record(tiny):
    for seed in range(4):
        train, test, info = build_datasets("ecg", tiny, seed=seed, seq_len=500)
        assert not set(info["train_records"]) & set(info["test_records"])
        assert len(info["train_records"]) == 3 and len(info["test_records"]) == 1
        assert len(train) + len(test) == len(qtdb.preprocess(tiny / "qtdb", 500)["x"])
    again = build_datasets("ecg", tiny, seed=3, seq_len=500)[2]
    assert again["test_records"] == info["test_records"]
    mask = split_by_group(np.array(["a", "a", "b", "c", "c", "c"]), 0.5, seed=0)
    for group in "abc":  # all of a record's sequences on one side
        assert len(set(mask[np.array(list("aabccc")) == group])) == 1


@pytest.mark.wfdb
def test_ecg_npz_round_trip(tiny, tmp_path):
    arrays = qtdb.preprocess(tiny / "qtdb", 500, threshold=0.2)
    path = tmp_path / "ecg.npz"
    qtdb.save_npz(path, **arrays)
    assert sorted(os.listdir(tmp_path)) == ["ecg.npz"]  # no temporary left behind
    train, test, info = build_datasets("ecg", npz=path, seed=1)
    direct_train, direct_test, direct_info = build_datasets("ecg", tiny, seed=1, seq_len=500, threshold=0.2)
    assert info["test_records"] == direct_info["test_records"]
    assert torch.equal(train.x, direct_train.x) and torch.equal(test.y, direct_test.y)
    assert len(build_datasets("ecg", npz=path, seq_len=500)[0]) == len(train)
    with pytest.raises(ValueError, match="seq_len=1301 does not match"):
        build_datasets("ecg", npz=path, seq_len=1301)
    # Without record names every sequence is its own group.
    qtdb.save_npz(path, arrays["x"][:5], arrays["y"][:5])
    train, test, _ = build_datasets("ecg", npz=path, test_fraction=0.2)
    assert (len(train), len(test)) == (4, 1)


def test_ecg_npz_errors(tmp_path):
    x, y = np.zeros((2, 10, 4), np.uint8), np.zeros((2, 10), np.int8)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x)
    with pytest.raises(DataError, match=r"bad\.npz.*'y'"):
        qtdb.load_npz(bad)
    np.savez(bad, x=x[:, :, :2], y=y)
    with pytest.raises(DataError, match=r"bad\.npz.*\[N, T, 4\]"):
        qtdb.load_npz(bad)
    np.savez(bad, x=x, y=y + 6)
    with pytest.raises(DataError, match=r"bad\.npz.*-1\.\.5"):
        qtdb.load_npz(bad)
    qtdb.save_npz(bad, x, y)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=r"bad\.npz.*truncated"):
        qtdb.load_npz(bad)
    with pytest.raises(DataError, match=r"missing\.npz"):
        build_datasets("ecg", npz=tmp_path / "missing.npz")


@pytest.mark.wfdb
def test_ecg_cache_reused_and_damaged_cache_rebuilt(tiny, cache):
    first = build_datasets("ecg", tiny, seq_len=500)[0]
    files = list(cache.glob("qtdb-*.npz"))
    assert len(files) == 1
    files[0].write_bytes(b"garbage")
    again = build_datasets("ecg", tiny, seq_len=500)[0]
    assert torch.equal(first.x, again.x)
    assert qtdb.load_npz(files[0])["x"].shape[1] == 500
    build_datasets("ecg", tiny, seq_len=400)
    assert len(list(cache.glob("qtdb-*.npz"))) == 2  # other settings, other file


@pytest.mark.wfdb
def test_qtdb_errors(tmp_path):
    folder = tmp_path / "qtdb"
    folder.mkdir()
    with pytest.raises(DataError, match=r"no QTDB records"):
        build_datasets("ecg", tmp_path)
    synthetic.write_ecg_record(folder, "r1")
    dat = folder / "r1.dat"
    dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 2])
    with pytest.raises(DataError, match=r"r1.*truncated"):
        qtdb.load_record(folder, "r1")
    (folder / "r1.hea").unlink()
    with pytest.raises(DataError, match=r"r1\.hea"):
        qtdb.load_record(folder, "r1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"QTDB folder .*empty.qtdb does not exist"):
        build_datasets("ecg", tmp_path / "empty")


# ---- MNIST --------------------------------------------------------------------------

@pytest.mark.parametrize("encoding,window,shape", [("rbf", None, (784, 80)), ("poisson", None, (784, 80)),
                                                   ("analog", None, (784, 1)), ("window", 4, (196, 4)),
                                                   ("sliding", 4, (784, 4))])
def test_mnist_encodings(tiny, encoding, window, shape):
    train, test, info = build_datasets("smnist", tiny, encoding=encoding, window=window)
    assert (len(train), len(test)) == (64, 32)
    assert (info["seq_len"], info["input_size"], info["num_classes"]) == (*shape, 10)
    x, y = train[5]
    assert x.shape == shape and x.dtype == torch.float32 and y.dtype == torch.int64 and y.item() == 5
    pixels = mnist.read_idx(tiny / "mnist" / "train-images-idx3-ubyte.gz")[5].reshape(-1) / 255.0
    if encoding == "analog":
        np.testing.assert_allclose(x[:, 0].numpy(), pixels, rtol=1e-6)
    if encoding == "window":
        np.testing.assert_allclose(x[1].numpy(), pixels[4:8], rtol=1e-6)
    if encoding == "sliding":  # binarised at pixel / 255 > 0.1, a window moved by one pixel
        binary = (pixels > 0.1).astype(np.float32)
        assert set(x.unique().tolist()) == {0.0, 1.0}
        np.testing.assert_array_equal(x[100].numpy(), binary[100:104])
        np.testing.assert_array_equal(x[783].numpy(), binary[780:])
    if encoding == "poisson":
        assert torch.equal(x, train[5][0]) and not torch.equal(x, train[6][0])
        assert set(x.unique().tolist()) <= {0.0, 1.0}
        assert not torch.equal(x, build_datasets("smnist", tiny, encoding=encoding, seed=1)[0][5][0])


def test_psmnist_permutation_fixed(tiny):
    s_train = build_datasets("smnist", tiny, encoding="analog")[0]
    p_train, _, info = build_datasets("psmnist", tiny, encoding="analog", seed=7)
    order = mnist.permutation(0)
    assert sorted(order.tolist()) == list(range(784)) and not torch.equal(order, torch.arange(784))
    assert torch.equal(order, mnist.permutation(0)) and not torch.equal(order, mnist.permutation(1))
    assert torch.equal(p_train[3][0], s_train[3][0][order])
    other = build_datasets("psmnist", tiny, encoding="analog", permutation_seed=1)[0]
    assert not torch.equal(other[3][0], p_train[3][0])
    assert len(build_datasets("psmnist", tiny, limit=10)[0]) == 10


@pytest.mark.parametrize("task", ["smnist", "psmnist"])
def test_mnist_validation_split_by_image(tiny, task):
    """val_fraction holds out a seeded quarter of the training images: disjoint from the rest,
    together all of them, the test images untouched; the same data seed gives the same split."""
    full, test_full, _ = build_datasets(task, tiny, encoding="analog")
    train, test, info = build_datasets(task, tiny, encoding="analog", val_fraction=0.25)
    val = info["val"]
    assert (len(train), len(val), len(test)) == (48, 16, 32)
    assert torch.equal(test.images, test_full.images)
    rows = {bytes(r.numpy()): int(y) for r, y in zip(full.images, full.labels)}
    held = [bytes(r.numpy()) for r in val.images]
    kept = [bytes(r.numpy()) for r in train.images]
    assert len(rows) == 64 and sorted(held + kept) == sorted(rows)  # a partition of the 64 images
    assert all(rows[bytes(r.numpy())] == int(y) for r, y in zip(val.images, val.labels))  # labels travel along
    assert torch.equal(val[3][0], full[[bytes(r.numpy()) for r in full.images].index(held[3])][0])  # same encoding
    again = build_datasets(task, tiny, encoding="analog", val_fraction=0.25)[2]["val"]
    other = build_datasets(task, tiny, encoding="analog", val_fraction=0.25, seed=1)[2]["val"]
    assert torch.equal(again.images, val.images) and not torch.equal(other.images, val.images)
    assert "val" not in build_datasets(task, tiny, encoding="analog")[2]
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction must be in"):
            build_datasets(task, tiny, val_fraction=bad)


def test_mnist_gain_and_the_methods_rbf_densities(tiny):
    plain = build_datasets("smnist", tiny)[0]
    train = build_datasets("smnist", tiny, gain=mnist.rbf_density_gain(80))[0]
    x, pixels = train[7][0], plain.images[7].double() / 255.0
    # the method's input: Gaussian densities N(p; c_j, sigma), sigma = centre spacing 1/79
    centres = torch.linspace(0, 1, 80, dtype=torch.float64)
    density = torch.distributions.Normal(centres, 1 / 79).log_prob(pixels[:, None]).exp()
    torch.testing.assert_close(x.double(), density, rtol=1e-5, atol=1e-5)
    assert 31 < x.max() < 32
    torch.testing.assert_close(build_datasets("smnist", tiny, encoding="analog", gain=2.0)[0][7][0],
                               2 * build_datasets("smnist", tiny, encoding="analog")[0][7][0])
    for bad in (0.0, float("nan"), True):
        with pytest.raises(ValueError, match="gain must be a finite positive number"):
            build_datasets("smnist", tiny, gain=bad)


def test_mnist_raw_and_file_errors(tiny, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    raw = gzip.decompress((tiny / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (folder / "t10k-labels-idx1-ubyte").write_bytes(raw)  # uncompressed is accepted
    assert mnist.read_idx(folder / "t10k-labels-idx1-ubyte").tolist() == [i % 10 for i in range(32)]
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*does not exist"):
        build_datasets("smnist", tmp_path)
    bad = folder / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02")[:-6])
    with pytest.raises(DataError, match=r"bad\.gz.*truncated"):
        mnist.read_idx(bad)
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02"))
    with pytest.raises(DataError, match=r"bad\.gz holds 10 bytes.*needs 11"):
        mnist.read_idx(bad)
    bad.write_bytes(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x01")
    with pytest.raises(DataError, match=r"bad\.gz.*magic"):
        mnist.read_idx(bad)


# ---- SHD ----------------------------------------------------------------------------

@pytest.mark.parametrize("frame_ms,steps", [(4, 250), (10, 100)])
def test_shd_frames(tiny, frame_ms, steps):
    import h5py

    train, test, info = build_datasets("shd", tiny, frame_ms=frame_ms)
    assert (len(train), len(test)) == (40, 20)
    assert (info["seq_len"], info["input_size"], info["num_classes"]) == (steps, 700, 20)
    x, y = test[7]
    assert x.shape == (steps, 700) and y.item() == 7
    with h5py.File(tiny / "shd" / "shd_test.h5") as f:
        times, units = f["spikes/times"][7], f["spikes/units"][7]
    assert times.max() > 1.0  # the file runs past the window, which is cut
    assert torch.equal(x, bin_spikes(times, units, 700, frame_ms, steps))
    assert 0 < x.sum() < len(times)
    assert len(build_datasets("shd", tiny, limit=3)[1]) == 3


def test_shd_file_errors(tiny, tmp_path):
    import h5py

    folder = tmp_path / "shd"
    folder.mkdir()
    with pytest.raises(DataError, match=r"shd_train\.h5 does not exist"):
        build_datasets("shd", tmp_path)
    (folder / "shd_train.h5.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"gunzip"):
        build_datasets("shd", tmp_path)
    with h5py.File(folder / "shd_train.h5", "w") as f:
        f.create_dataset("labels", data=np.zeros(3, np.uint16))
    with pytest.raises(DataError, match=r"shd_train\.h5 lacks spikes/times, spikes/units"):
        build_datasets("shd", tmp_path)
    data = (tiny / "shd" / "shd_train.h5").read_bytes()
    (folder / "shd_train.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"shd_train\.h5.*truncated"):
        shd.load_split(folder / "shd_train.h5")


# ---- options, folders, download -----------------------------------------------------

def test_options_and_data_dir(tiny, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown option.*frame"):
        build_datasets("smnist", tiny, frame_ms=4)
    with pytest.raises(ValueError, match="task"):
        build_datasets("timit", tiny)
    with pytest.raises(ValueError, match="frame_ms"):
        build_datasets("shd", tiny, frame_ms=5)
    with pytest.raises(ValueError, match="encoding"):
        build_datasets("smnist", tiny, encoding="latency")
    for encoding in ("window", "sliding"):
        with pytest.raises(ValueError, match="window"):
            build_datasets("smnist", tiny, encoding=encoding)
    with pytest.raises(ValueError, match="window must be at most 784"):
        build_datasets("psmnist", tiny, encoding="sliding", window=785)
    with pytest.raises(ValueError, match="test_fraction"):
        build_datasets("ecg", tiny, test_fraction=1.0)
    monkeypatch.delenv("SRNN_FAST_DATA", raising=False)
    with pytest.raises(DataError, match="SRNN_FAST_DATA"):
        resolve_data_dir()
    monkeypatch.setenv("SRNN_FAST_DATA", str(tiny))
    assert resolve_data_dir() == tiny and resolve_data_dir(tmp_path) == tmp_path
    with pytest.raises(DataError, match="nowhere"):
        resolve_data_dir(tmp_path / "nowhere")


def test_download_offline_and_bad_content(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"offline, place .*shd_train\.h5.*" + str(tmp_path / "shd")):
        download.download("shd", tmp_path)
    with pytest.raises(DataError, match=r"offline, place the \.hea, \.dat and \.q1c files of the 105"):
        download.download("qtdb", tmp_path)
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not mnist"))
    with pytest.raises(DataError, match=r"download of .*t10k-images-idx3-ubyte\.gz failed its check"):
        download.download("mnist", tmp_path)
    for task in ("qtdb", "shd", "mnist"):  # nothing half-written left behind
        assert list((tmp_path / task).iterdir()) == []


def test_download_shd_gunzips_checks_and_renames(tiny, tmp_path, monkeypatch):
    payload = gzip.compress((tiny / "shd" / "shd_test.h5").read_bytes())
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    download.download("shd", tmp_path)
    assert sorted(p.name for p in (tmp_path / "shd").iterdir()) == ["shd_test.h5", "shd_train.h5"]
    assert len(build_datasets("shd", tmp_path)[0]) == 20
    cut = payload[: len(payload) // 2]  # a download cut short
    monkeypatch.setattr(download.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(cut))
    (tmp_path / "shd" / "shd_train.h5").unlink()
    with pytest.raises(DataError, match=r"cannot download .*shd_train\.h5\.gz"):
        download.download("shd", tmp_path)
    assert sorted(p.name for p in (tmp_path / "shd").iterdir()) == ["shd_test.h5"]


def test_download_verifies_present_files(tiny, tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes((tiny / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz does not match"):
        download.download("mnist", tmp_path, verify_only=True)


# ---- the real data, when present ----------------------------------------------------

REAL = os.environ.get("SRNN_FAST_DATA")
needs_real = pytest.mark.skipif(not (REAL and (pathlib.Path(REAL) / "qtdb" / "sel100.q1c").is_file()
                                     and (pathlib.Path(REAL) / "mnist").is_dir()),
                                reason="real data not found: set $SRNN_FAST_DATA to a folder with qtdb/ and mnist/")


@pytest.mark.wfdb
@needs_real
def test_real_qtdb_three_records():
    names = ["sel100", "sel102", "sele0106"]
    for name in names:
        for ext in ("hea", "dat", "q1c"):
            download.check_qtdb_file(pathlib.Path(REAL) / "qtdb" / f"{name}.{ext}")
    train, test, info = build_datasets("ecg", records=names, test_fraction=0.34)
    assert set(info["train_records"]) | set(info["test_records"]) == set(names)
    y = torch.cat([train.y, test.y])
    counts = torch.bincount(y[y >= 0], minlength=6)
    assert (counts > 0).all() and (y >= 0).float().mean() > 0.8
    assert 0.01 < train.x.mean() < 0.2  # level crossings happen, but sparsely


@needs_real
def test_real_mnist_counts():
    train, test, info = build_datasets("smnist", encoding="analog")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(test.labels).tolist()[:2] == [980, 1135]
