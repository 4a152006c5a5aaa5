"""Loss and steps: the loss and accuracy terms, one optimizer step (clipping, weight decay,
skipping a non-finite gradient), one training batch (whole-sequence or truncated BPTT), the
global batches of an epoch, and evaluation (loss, accuracy, firing rates)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import _all_sum
from .model import SPIKING, hidden_widths


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, grad_clip=None, weight_decay=0.0) -> bool:
    """Clip the gradients to norm ``grad_clip`` (if given), decay the weights by ``weight_decay``
    (``decay_weights``) and step; skip the step (False, no update, no decay, gradients dropped)
    when the gradient norm is not finite. Why: BPTT over long
    sequences can overflow float32 (|grad| ~ 1e44 measured for an adaptive ECG layer late in
    training), and one NaN step would put NaN into every weight through Adam's moments.
    With DDP the gradients are already averaged, so every rank takes the same decision."""
    # max_norm inf (grad_clip None or 0): the total norm, the gradients unchanged (scaled by exactly 1)
    norm = nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                    grad_clip or float("inf"))
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        return False
    if weight_decay:
        decay_weights(opt, weight_decay)
    opt.step()
    return True


@torch.no_grad()
def decay_weights(opt: torch.optim.Optimizer, weight_decay: float) -> None:
    """Decoupled weight decay (Loshchilov & Hutter, AdamW's): w <- w * (1 - lr * weight_decay)
    before the optimizer's step, at each parameter group's current lr, on the weight matrices
    (input, recurrent, dense, readout: ndim >= 2) that have a gradient; biases, thresholds and
    time constants (1-D) keep their values. Done here rather than by AdamW so that Adamax gets
    the same decay and a run can switch it on at resume with its optimizer state unchanged."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.ndim >= 2:
                p.mul_(1.0 - group["lr"] * weight_decay)


TBPTT_DECODERS = ("count", "mean", "last", "max")  # decoded from a running sum / the last step / a running max


def _detached(state):
    """A stream state (tensors in tuples and NamedTuples) with every tensor detached."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, tuple):
        items = [_detached(v) for v in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    return state


def truncated_bptt_batch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, k: int,
                         grad_clip, after_step, weight_decay=0.0) -> tuple:
    """One batch [B, T, F] of truncated BPTT (the method's PS-MNIST training): the sequence runs in
    chunks of ``k`` steps (``model.stream``); after each chunk an optimizer step on the cross
    entropy of the output decoded from step 0 to the chunk's end (for "count" the spike count
    so far). The network state and the running count / sum / max carry over detached, so no
    gradient reaches back past a chunk: the BPTT products span at most k steps. ``after_step()``
    runs after every step taken. Returns (loss_sum, count, correct) of the last chunk's logits
    (the whole sequence's, as forward decodes them), the number of steps tried and of those skipped."""
    decode, T = model.decode, x.shape[1]
    state, carried, steps, skipped = None, None, 0, 0
    for t0 in range(0, T, k):
        o, state = model.stream(x[:, t0:t0 + k], state)  # o [B, chunk, C]
        if decode == "last":
            part = o[:, -1]
        elif decode == "max":
            part = o.max(1).values if carried is None else torch.maximum(carried, o.max(1).values)
        else:  # count, mean: the running sum
            part = o.sum(1) if carried is None else carried + o.sum(1)
        logits = part / min(t0 + k, T) if decode == "mean" else part
        loss_sum, count, correct = loss_terms(logits, y)
        opt.zero_grad(set_to_none=True)
        (loss_sum / max(count.item(), 1)).backward()
        steps += 1
        if optimizer_step(model, opt, grad_clip, weight_decay):
            after_step()
        else:
            skipped += 1
        state, carried = _detached(state), part.detach()
    return loss_sum, count, correct, steps, skipped


def train_batch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, cfg: dict,
                after_step=lambda: None, net: nn.Module = None, world: int = 1) -> tuple:
    """One training batch as the trainer runs it: a BPTT step over the whole sequence (through
    ``net``, the DDP wrapper where there is one), or truncated BPTT with ``cfg["tbptt"]``.
    ``after_step()`` runs after every optimizer step taken. Returns (loss_sum, count, correct,
    optimizer steps tried, steps skipped for a non-finite gradient)."""
    if cfg.get("tbptt"):
        return truncated_bptt_batch(model, opt, x, y, cfg["tbptt"], cfg.get("grad_clip"), after_step,
                                    cfg.get("weight_decay", 0.0))
    loss_sum, count, correct = loss_terms((net or model)(x), y)
    # Share of the mean over the global batch; DDP averages gradients over ranks.
    global_count = _all_sum(count.to(torch.float64).reshape(1)).item()
    loss = loss_sum * (world / max(global_count, 1.0))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    taken = optimizer_step(model, opt, cfg.get("grad_clip"), cfg.get("weight_decay", 0.0))
    if taken:
        after_step()
    return loss_sum, count, correct, 1, int(not taken)


def loss_terms(logits: torch.Tensor, y: torch.Tensor):
    """(summed cross entropy, number of counted targets, number correct); label -1 is ignored."""
    C = logits.shape[-1]
    logits, y = logits.reshape(-1, C), y.reshape(-1)
    mask = y >= 0
    loss_sum = F.cross_entropy(logits, y, ignore_index=-1, reduction="sum")
    correct = ((logits.argmax(-1) == y) & mask).sum()
    return loss_sum, mask.sum(), correct


def global_batches(n: int, batch_size: int, world: int, gen: torch.Generator) -> list:
    """A fresh permutation cut into global batches; a last batch smaller than the number of ranks is dropped."""
    perm = torch.randperm(n, generator=gen).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size) if len(perm[i:i + batch_size]) >= world]


@contextlib.contextmanager
def evaluation_rng(seed: int, device: torch.device = None):
    """Evaluation's random draws (init_state="uniform_always") under a fixed ``seed``: the same
    weights draw the same initial states every time, and the caller's RNG stream (training's)
    is restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def evaluate(model: nn.Module, dataset, cfg: dict, device, dtype, rank: int, world: int) -> dict:
    """Test loss, accuracy and firing rates over the whole test set (each rank a shard, summed)."""
    model.eval()
    spiking = cfg["model"] in SPIKING
    L = len(hidden_widths(cfg))
    context = cfg["data"].get("context") or 0
    # [loss_sum, count, correct, count and correct in fully labelled sequences,
    #  spikes per layer..., neuron-steps per layer...]
    sums = torch.zeros(5 + 2 * L, dtype=torch.float64)
    idx = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=cfg["batch_size"])
    with torch.no_grad(), evaluation_rng(cfg.get("seed", 0) + rank, device):
        for x, y in loader:
            x, y = x.to(device, dtype), y.to(device)
            logits, hidden = model(x, return_spikes=True)
            loss_sum, count, correct = loss_terms(logits, y)
            sums[:3] += torch.stack([loss_sum.double().cpu(), count.double().cpu(), correct.double().cpu()])
            if y.dim() == 2:  # per-step labels: also score the sequences labelled at every step after the context
                full = (y[:, context:] >= 0).all(1)
                _, count, correct = loss_terms(logits[full], y[full])
                sums[3:5] += torch.stack([count.double().cpu(), correct.double().cpu()])
            if spiking:
                for i, s in enumerate(hidden):
                    sums[5 + i] += s.double().sum().cpu()
                    sums[5 + L + i] += s.numel()
    sums = _all_sum(sums.to(device)).cpu()
    count = max(sums[1].item(), 1.0)
    out = {"test_loss": sums[0].item() / count, "test_acc": sums[2].item() / count,
           "test_acc_full": sums[4].item() / sums[3].item() if sums[3] > 0 else None, "fr": None, "fr_layers": None}
    if spiking:
        out["fr_layers"] = (sums[5:5 + L] / sums[5 + L:]).tolist()
        out["fr"] = (sums[5:5 + L].sum() / sums[5 + L:].sum()).item()
    return out
