"""Non-spiking recurrent baselines (LSTM, GRU, vanilla RNN, Bi-LSTM) with the SRNN's contract.

``RNNBaseline(kind, input_size, hidden_sizes, output_size, decode=...)``: x [B, T, F] ->
logits [B, C] (``decode="last"``) or [B, T, C] (``decode="per_step"``). Layers of different
widths are stacked as separate single-layer torch modules (nn.LSTM stacks only equal widths).
"""
from __future__ import annotations

import torch
from torch import nn

KINDS = {"lstm": (nn.LSTM, False), "gru": (nn.GRU, False), "rnn": (nn.RNN, False), "bilstm": (nn.LSTM, True)}
DECODES = ("last", "per_step")


class RNNBaseline(nn.Module):
    """Stacked LSTM / GRU / tanh-RNN / bidirectional LSTM layers with a linear readout.

    For "bilstm" each layer has ``hidden`` units per direction and the readout sees both.
    ``decode="last"`` classifies from the final step (for "bilstm": the forward direction at
    t = T and the backward direction at t = 1, i.e. each direction after it saw the whole
    sequence); ``"per_step"`` gives logits at every step. ``forward(x, return_spikes=False)``
    accepts the flag of AdaptiveSRNN and returns an empty list of spike tensors.
    """

    def __init__(self, kind: str, input_size: int, hidden_sizes, output_size: int, *, decode: str = "last"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {', '.join(map(repr, DECODES))}; got {decode!r}")
        hidden_sizes = [hidden_sizes] if isinstance(hidden_sizes, int) else list(hidden_sizes)
        if not hidden_sizes or any(not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be a non-empty list of positive ints; got {hidden_sizes!r}")
        cls, self.bidirectional = KINDS[kind]
        self.kind, self.decode = kind, decode
        dirs = 2 if self.bidirectional else 1
        sizes = [input_size] + [h * dirs for h in hidden_sizes]
        self.layers = nn.ModuleList(cls(i, h, batch_first=True, bidirectional=self.bidirectional)
                                    for i, h in zip(sizes[:-1], hidden_sizes))
        self.output = nn.Linear(sizes[-1], output_size)

    def forward(self, x: torch.Tensor, return_spikes: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, T, input]; got {got}")
        h = x
        for layer in self.layers:
            h, _ = layer(h)  # [B, T, H * dirs]
        if self.decode == "per_step":
            logits = self.output(h)
        elif self.bidirectional:
            H = h.shape[-1] // 2
            logits = self.output(torch.cat([h[:, -1, :H], h[:, 0, H:]], dim=-1))
        else:
            logits = self.output(h[:, -1])
        return (logits, []) if return_spikes else logits

    def stream(self, x: torch.Tensor, state=None):
        """Logits at every step of x [B, T, F] and the state after the last step (one torch
        RNN state per layer); passing it to the next call continues the sequence. Only
        unidirectional kinds stream: a backward direction needs the sequence's end."""
        if self.bidirectional:
            raise ValueError(f"{self.kind!r} reads each sequence backwards too, so it cannot stream; "
                             "use lstm, gru or rnn")
        h, states = x, []
        for i, layer in enumerate(self.layers):
            h, st = layer(h, None if state is None else state[i])
            states.append(st)
        return self.output(h), tuple(states)
