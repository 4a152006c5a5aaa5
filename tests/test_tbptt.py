"""Truncated BPTT (train.truncated_bptt_batch, --tbptt): what each optimizer step's gradient is."""
import copy
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from srnn_fast import train as T
from srnn_fast.data.synthetic import write_tiny
from srnn_fast.modules import AdaptiveSRNN
from srnn_fast.train.steps import _detached

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import epoch_time  # noqa: E402

B, STEPS, C = 4, 12, 3


def _net(decode="count"):
    torch.manual_seed(0)
    readout = "spiking" if decode == "count" else "integrator"
    net = AdaptiveSRNN(2, [6, 5], C, readout=readout, decode=decode, batch_first=True, backend="reference",
                       dtype=torch.float64, b0=0.01, init_state="uniform_always")
    x = torch.rand(B, STEPS, 2, dtype=torch.float64) * 3
    return net, x, torch.tensor([0, 1, 2, 1])


def _grads(net):
    return [p.grad.clone() for p in net.parameters()]


def _mean_ce(logits, y):
    return F.cross_entropy(logits, y)


def _decoded(o, decode):  # o [B, T, C]
    return {"count": o.sum(1), "mean": o.mean(1), "last": o[:, -1], "max": o.max(1).values}[decode]


@pytest.mark.parametrize("decode", T.TBPTT_DECODERS)
def test_each_step_backpropagates_through_its_chunk_only(decode):
    net, x, y = _net(decode)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # weights unchanged: every step's gradient at the same point
    seen = []
    torch.manual_seed(7)  # the random initial membranes
    loss_sum, count, correct, steps, skipped = T.truncated_bptt_batch(net, opt, x, y, 5, None,
                                                                       lambda: seen.append(_grads(net)))
    assert (steps, skipped) == (3, 0) and len(seen) == 3 and count.item() == B  # chunks of 5, 5, 2 steps
    # the last chunk's logits are the whole sequence's, as forward decodes them
    torch.manual_seed(7)
    full = net(x)
    torch.testing.assert_close(loss_sum / B, _mean_ce(full, y), rtol=1e-12, atol=0)
    assert correct.item() == (full.argmax(-1) == y).sum().item()

    def reference_grads(t_cut, t_end):
        """The gradient of the loss at t_end with the state (and the decoded part) before t_cut held
        fixed; t_cut = 0: plain BPTT over the first t_end steps."""
        net.zero_grad()
        torch.manual_seed(7)
        o, state = x.new_zeros(B, 0, C), None
        if t_cut:
            o, state = net.stream(x[:, :t_cut])
        o1, _ = net.stream(x[:, t_cut:t_end], _detached(state))
        _mean_ce(_decoded(torch.cat([o.detach(), o1], 1), decode), y).backward()
        return _grads(net)

    for step, (t_cut, t_end) in enumerate([(0, 5), (5, 10), (10, 12)]):
        for got, want in zip(seen[step], reference_grads(t_cut, t_end)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    # the truncation cuts: full BPTT through all 12 steps gives another gradient
    net.zero_grad()
    torch.manual_seed(7)
    _mean_ce(net(x), y).backward()
    assert any(not torch.allclose(a, b) for a, b in zip(seen[-1], _grads(net)))


def test_one_chunk_is_plain_bptt():
    net, x, y = _net()
    twin = copy.deepcopy(net)
    opt = torch.optim.Adam(T.param_groups(net, 1e-2, 2e-2))
    opt_twin = torch.optim.Adam(T.param_groups(twin, 1e-2, 2e-2))
    torch.manual_seed(3)
    T.truncated_bptt_batch(net, opt, x, y, STEPS, 1.0, lambda: T.clamp_time_constants(net))
    torch.manual_seed(3)
    loss_sum, count, _ = T.loss_terms(twin(x), y)
    (loss_sum / count).backward()
    assert T.optimizer_step(twin, opt_twin, 1.0)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_tbptt_options_are_checked(capsys):
    parser = T.make_parser()
    for argv, message in ((["--task", "smnist", "--model", "lstm", "--tbptt", "50"], "SRNN models"),
                          (["--task", "ecg", "--tbptt", "50"], "sequence-level decoder"),
                          (["--task", "smnist", "--tbptt", "0"], "tbptt")):
        with pytest.raises(SystemExit):
            T.config_from_args(parser.parse_args(argv), parser)
        assert message in capsys.readouterr().err
    cfg = T.config_from_args(parser.parse_args(["--task", "smnist", "--tbptt", "100"]), parser)
    assert cfg["tbptt"] == 100 and T.config_from_args(parser.parse_args(["--task", "smnist"]), parser)["tbptt"] is None


def test_epoch_time_times_the_truncated_steps(tmp_path):
    """bench/epoch_time.py times the trainer's own train_batch: the preset's truncated BPTT too."""
    write_tiny("smnist", tmp_path)
    out = tmp_path / "epoch.json"
    assert epoch_time.main(["--task", "psmnist", "--preset", "psmnist_64_256", "--data-dir", str(tmp_path),
                            "--limit", "8", "--batch-size", "4", "--batches", "1", "--threads", "1", "--quiet",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["preset"] == "psmnist_64_256" and set(result["backends"]) == {"cpp", "reference"}
    assert all(r["cpu"]["train_step_s"] > 0 for r in result["backends"].values())


def test_epoch_time_can_start_from_trained_weights(tmp_path):
    """--weights RUN: every backend starts from the run's weights (a network of another size is refused)."""
    write_tiny("smnist", tmp_path)
    common = ["--task", "psmnist", "--preset", "psmnist_64_256", "--data-dir", str(tmp_path), "--limit", "8",
              "--batch-size", "4", "--threads", "1", "--quiet"]
    assert T.main(common + ["--epochs", "1", "--hidden-sizes", "8,12", "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "epoch.json"
    assert epoch_time.main(common + ["--hidden-sizes", "8,12", "--batches", "1", "--backends", "cpp",
                                     "--weights", str(tmp_path / "run"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["weights"] == str(tmp_path / "run") and result["weights_epoch"] == 1
    with pytest.raises(RuntimeError, match="size mismatch"):
        epoch_time.main(common + ["--hidden-sizes", "8,16", "--batches", "1", "--backends", "cpp",
                                  "--weights", str(tmp_path / "run")])


def test_epoch_time_ftz_backend_flushes_only_its_own_steps(tmp_path, monkeypatch, capsys):
    """A backend named 'NAME+ftz' trains with subnormals flushed (torch.set_flush_denormal), the others do not, and
    flushing is off again afterwards; an unknown backend, and '+ftz' on a CPU that cannot flush, are refused."""
    def flushing():
        return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0

    seen = []
    real_train_batch = T.train_batch
    monkeypatch.setattr(T, "train_batch", lambda *a: (seen.append(flushing()), real_train_batch(*a))[1])
    write_tiny("smnist", tmp_path)
    common = ["--task", "psmnist", "--preset", "psmnist_64_256", "--hidden-sizes", "8,12", "--data-dir",
              str(tmp_path), "--limit", "8", "--batch-size", "4", "--threads", "1", "--quiet", "--batches", "1"]
    assert epoch_time.main(common + ["--backends", "reference,reference+ftz"]) == 0
    assert seen == [False, True] * 2  # warm-up batch and timed batch, the backends taking turns
    assert not flushing()
    with pytest.raises(SystemExit):
        epoch_time.main(common + ["--backends", "cpp,nosuch+ftz"])
    assert "unknown backend 'nosuch'" in capsys.readouterr().err
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: False)  # a CPU that cannot flush
    with pytest.raises(SystemExit):
        epoch_time.main(common + ["--backends", "cpp,reference+ftz"])
    assert "'+ftz' needs flush-to-zero" in capsys.readouterr().err
