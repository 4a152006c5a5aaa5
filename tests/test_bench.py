"""bench/run.py --quick runs end to end (CI): every contender measured or its failure
recorded, JSON and Markdown written. Nothing is asserted about speed."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import run as bench  # noqa: E402


def test_quick_run(tmp_path):
    assert bench.main(["--quick", "--shapes", "ecg", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    rows = report["results"]["ecg"]
    installed = {p for p, (module, _) in bench.LIBRARY_PEERS.items() if bench._importable(module)}
    assert set(rows) == {"cpp", "reference", "compiled_step", "compiled_reference", "lstm", "gru", "rnn"} | installed
    for name in ("cpp", "reference", "lstm", "gru", "rnn"):
        assert rows[name]["fwd_ms"] > 0 and rows[name]["fwd_bwd_ms"] > 0 and rows[name]["saved_bytes"] > 0, name
    assert "skipped" in rows["compiled_reference"]["note"] and "skipped" in rows["compiled_step"]["note"]
    peers = {r["peer"] for r in report["ratios"] if r["fused"] == "cpp"}
    assert peers == {"reference", "lstm", "gru", "rnn"} | installed
    assert "| ecg | cpp |" in (tmp_path / "results.md").read_text()


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
