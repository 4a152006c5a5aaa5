"""Accuracy of a checkpoint on validation images when only the initial membranes change
(results/journal/mnist.md, "The gap, found"). Usage:

    SRNN_FAST_DATA=DATA python results/mnist/init_state_probe.py RUN/last.pt [N]
"""
import sys

import torch

from srnn_fast import train as T
from srnn_fast.train.model import _load_data
from srnn_fast._checks import SRNNState
from srnn_fast.modules import SRNNLayer


def main(path: str, n: int = 500) -> None:
    torch.set_num_threads(1)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = dict(ckpt["config"], device="cpu")
    _, _, info = _load_data(cfg)
    val = info["val"]
    model = T.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    idx = torch.randperm(len(val), generator=torch.Generator().manual_seed(1))[:n].tolist()
    x = torch.stack([val[i][0] for i in idx])
    y = torch.stack([val[i][1] for i in idx])

    def accuracy(draw) -> float:
        def initial_state(layer, batch):
            u = draw(batch, layer.hidden_size)
            return SRNNState(u, torch.full_like(u, layer.config.b0), torch.zeros_like(u))
        saved, SRNNLayer.initial_state = SRNNLayer.initial_state, initial_state
        try:
            with torch.no_grad():
                return (model(x).argmax(-1) == y).float().mean().item()
        finally:
            SRNNLayer.initial_state = saved

    print(f"{path} (epoch {ckpt['epoch']}), {n} validation images")
    print(f"u = 0: {accuracy(lambda b, h: torch.zeros(b, h)):.3f}")
    for seed in range(3):
        torch.manual_seed(seed)
        print(f"U(0, 1), seed {seed}: {accuracy(lambda b, h: torch.rand(b, h)):.3f}")
    for c in (0.25, 0.5):
        print(f"u = {c}: {accuracy(lambda b, h: torch.full((b, h), c)):.3f}")
    for seed in range(3):
        gen, per_neuron = torch.Generator().manual_seed(100 + seed), {}

        def shared(b, h):  # one draw per neuron, the same for every image
            if h not in per_neuron:
                per_neuron[h] = torch.rand(h, generator=gen)
            return per_neuron[h].expand(b, h).clone()
        print(f"one U(0, 1) draw per neuron, seed {seed}: {accuracy(shared):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 500)
