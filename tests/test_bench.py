"""bench/run.py --quick runs end to end (CI): every contender measured or its failure
recorded, JSON and Markdown written. Nothing is asserted about speed."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import run as bench  # noqa: E402
import srnn_fast  # noqa: E402


def test_quick_run(tmp_path):
    assert bench.main(["--quick", "--shapes", "ecg", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["results"]["ecg"]
    installed = {p for p, (module, _) in bench.LIBRARY_PEERS.items() if bench._importable(module)}
    assert set(rows) == {"cpp", "reference", "compiled_step", "compiled_reference", "lstm", "gru", "rnn"} | installed
    for name in ("cpp", "reference", "lstm", "gru", "rnn"):
        assert rows[name]["fwd_ms"] > 0 and rows[name]["fwd_bwd_ms"] > 0 and rows[name]["saved_bytes"] > 0, name
    assert "--compile" in rows["compiled_reference"]["note"] and "--compile" in rows["compiled_step"]["note"]
    meta = report["meta"]
    assert meta["cpu_capability"] == srnn_fast.cpu_capability() and meta["cpu_model"]
    assert meta["cpu_capabilities_run"] == [meta["cpu_capability"]]
    peers = {r["peer"] for r in report["ratios"] if r["fused"] == "cpp"}
    assert peers == {"reference", "lstm", "gru", "rnn"} | installed
    assert "| ecg | cpp |" in (tmp_path / "results.md").read_text()
    # The second timing with subnormals flushed, and the work against the run's GEMM rate.
    if meta["flushed"]:
        assert all(rows[n]["fwd_bwd_ms_flushed"] > 0 for n in ("cpp", "reference", "lstm"))
        assert all("fwd_bwd_flushed" in r for r in report["ratios"])
    assert meta["gemm_gflops"] > 0
    fractions = {r["contender"]: r for r in report["gemm_fractions"]}
    assert {"cpp", "reference", "lstm"} <= set(fractions)
    assert fractions["cpp"]["gflop_fwd_bwd"] == fractions["reference"]["gflop_fwd_bwd"] > 0
    assert 0 < fractions["cpp"]["fwd_bwd"]


def test_every_cpu_build_and_the_scan_alone(tmp_path):
    """--cpu-capability all: one cpp contender per build, each against the same reference;
    --scan times the srnn_scan op (x_proj given) instead of the layer stacks."""
    from scan_cases import cpu_capabilities

    assert bench.main(["--quick", "--shapes", "ecg", "--device", "cpu", "--backends", "cpp,reference",
                       "--cpu-capability", "all", "--scan", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    names = [f"cpp-{c}" for c in cpu_capabilities()]
    assert set(report["results"]["ecg"]) == set(names) | {"reference"}
    assert {r["fused"] for r in report["ratios"]} == set(names)
    assert report["meta"]["what"] == "srnn_scan op" and report["meta"]["cpu_capabilities_run"] == cpu_capabilities()
    with pytest.raises(SystemExit) as exc:  # the message: tests/test_cli_errors.py
        bench.main(["--quick", "--cpu-capability", "avx1024", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_fused_backends_on_cpu_exclude_the_triton_interpreter():
    assert "triton" not in bench.fused_backends(torch.device("cpu"))
    assert "cpp" in bench.fused_backends(torch.device("cpu"))


@pytest.mark.slow
def test_quick_compiled_step(tmp_path):
    """torch.compile of the reference's step function, looped in Python, runs (in a child)."""
    assert bench.main(["--quick", "--shapes", "ecg", "--backends", "cpp,compiled_step", "--device", "cpu",
                       "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "results.json").read_text())["results"]["ecg"]["compiled_step"]
    assert "error" not in row, row
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["saved_bytes"] > 0


@pytest.mark.parametrize("peer", ["norse", "snntorch"])
def test_library_peer_where_installed(peer, tmp_path):
    """SPEC section 6: norse / snnTorch are benchmarked where installed (skipped here otherwise)."""
    pytest.importorskip(bench.LIBRARY_PEERS[peer][0])
    assert bench.main(["--quick", "--shapes", "ecg", "--backends", f"cpp,{peer}", "--device", "cpu",
                       "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "results.json").read_text())["results"]["ecg"][peer]
    assert "error" not in row, row
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0


def test_rounds_report_medians_over_rounds(tmp_path):
    """--rounds 3: every contender timed three times, the medians reported, each ratio the
    median of the three per-round ratios."""
    import statistics

    assert bench.main(["--quick", "--shapes", "ecg", "--device", "cpu", "--backends", "cpp,reference",
                       "--rounds", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["meta"]["rounds"] == 3
    for name, row in report["results"]["ecg"].items():
        for key in ("fwd_ms", "fwd_bwd_ms"):
            assert len(row[key + "_rounds"]) == 3, name
            assert row[key] == statistics.median(row[key + "_rounds"])
    (ratio,) = report["ratios"]
    assert ratio["rounds"] == 3
    ref, cpp = report["results"]["ecg"]["reference"], report["results"]["ecg"]["cpp"]
    per_round = [r / c for r, c in zip(ref["fwd_bwd_ms_rounds"], cpp["fwd_bwd_ms_rounds"])]
    assert ratio["fwd_bwd"] == pytest.approx(statistics.median(per_round))
    assert ratio["fwd_bwd_best"] == pytest.approx(min(ref["fwd_bwd_ms_rounds"]) / min(cpp["fwd_bwd_ms_rounds"]))
    assert "best rounds" in (tmp_path / "results.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--rounds", "0", "--out", str(tmp_path)])


def test_combine_ratios_takes_the_median_per_pair():
    rows = [[{"shape": "ecg", "fused": "cpp", "peer": "reference", "fwd": f, "fwd_bwd": b, "saved": 0.1}]
            for f, b in ((10.0, 30.0), (2.0, 20.0), (4.0, 25.0))]
    (row,) = bench.combine_ratios(rows)
    assert (row["fwd"], row["fwd_bwd"], row["rounds"]) == (4.0, 25.0, 3)


def test_flop_counts():
    """bench/flops.py on a two-layer stack: the dense terms by formula, the spike terms from the
    nonzeros of the layers' own outputs, the neuron terms per neuron and step."""
    import flops

    torch.manual_seed(0)
    T, B, sizes = 30, 3, [5, 7, 6]
    stack = bench.SRNNStack(sizes, "cpp")
    x = torch.rand(T, B, sizes[0]) + 0.1  # dense: every input nonzero
    got = flops.srnn_stack_flops(stack.layers, x)
    with torch.no_grad():
        s1, _ = stack.layers[0](x)
        s2, _ = stack.layers[1](s1)
    N, (I, H1, H2) = T * B, sizes
    nz = lambda s: int(torch.count_nonzero(s[:-1]))  # noqa: E731  (s_{t-1} for t >= 1)
    assert 0 < nz(s1) and 2 * int(torch.count_nonzero(s1)) < s1.numel()  # layer 2's input is sparse
    fwd_spike = nz(s1) * H1 + int(torch.count_nonzero(s1)) * H2 + N * H2 + nz(s2) * H2
    assert got["fwd"]["dense"] == 2 * N * I * H1 + N * H1
    assert got["fwd"]["spike"] == fwd_spike
    assert got["fwd"]["neuron"] == flops.NEURON_FWD * N * (H1 + H2)
    assert got["fwd_bwd"]["dense"] == 2 * (2 * N * I * H1 + N * H1) + 2 * N * (H1 * H1 + H2 * H2) + 2 * N * H2 * H1
    assert got["fwd_bwd"]["spike"] == 2 * fwd_spike
    assert got["fwd_bwd"]["total"] == sum(v for k, v in got["fwd_bwd"].items() if k != "total")
    assert flops.rnn_stack_flops("lstm", sizes, T, B)["fwd"]["total"] == 2 * N * 4 * (H1 * (I + H1) + H2 * (H1 + H2))


def test_subnormals_flushed_in_every_thread():
    """The flushed timings flush subnormals in all of torch's threads (torch.set_flush_denormal
    alone reaches only the calling thread), and only inside the block."""
    if not bench.can_flush_subnormals():
        pytest.skip("this CPU cannot flush subnormals")
    before = torch.get_num_threads()
    big = torch.full((1 << 20,), 1e-39)  # subnormal float32; torch's mul splits it over the threads
    try:
        torch.set_num_threads(2)
        with bench.subnormals_flushed():
            assert bool(((big * 1.0) == 0).all())
        assert bool(((big * 1.0) != 0).all())
    finally:
        torch.set_num_threads(before)


def test_floor_of_the_dense_products(tmp_path, capsys):
    """bench/floor.py: the dense products of each stack (the projection of a dense input and its
    recomputation, dW_in, W_rec^T dI, dL/dx past the first layer) timed by torch.mm, the fused
    stack on the same threads, and the table against issue 47's targets."""
    import floor

    shape = dict(bench.SHAPES["smnist"], **bench.QUICK)
    model = bench.build("cpp", shape["sizes"], torch.device("cpu"))
    N = shape["T"] * shape["B"]
    products = floor.dense_products(shape, bench.make_input(shape, torch.device("cpu")), model)
    assert products == {"fwd": [(N, 80, 120)],
                        "bwd": [(N, 80, 120), (80, N, 120), (N, 120, 120), (N, 100, 100), (N, 100, 120)]}
    shd = dict(bench.SHAPES["shd"], **bench.QUICK)  # spike input: no dense projection in layer 1
    products = floor.dense_products(shd, bench.make_input(shd, torch.device("cpu")),
                                    bench.build("cpp", shd["sizes"], torch.device("cpu")))
    assert (N, 700, 128) not in products["fwd"] and products["bwd"][0] == (N, 128, 128)
    out = tmp_path / "floor.json"
    assert floor.main(["--quick", "--rounds", "1", "--repeats", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| smnist | fwd+bwd |" in table and "(60%)" in table and "(40%)" in table
    rounds = json.loads(out.read_text())["rounds"]
    row = rounds[0]["smnist"]
    assert row["fwd_bwd_ms"] > 0 and row["floor_fwd_bwd_ms"] > row["floor_fwd_ms"] > 0
    with pytest.raises(SystemExit):
        floor.main(["--quick", "--shapes", "mnist"])
