"""Training CLI for the four tasks of the method, SRNNs and baselines: ``python -m srnn_fast.train``.

    python -m srnn_fast.train --task ecg --model adaptive --data-dir DATA --out runs/ecg_adaptive
    torchrun --nproc_per_node 2 -m srnn_fast.train --task ecg ...      (DDP: gloo on CPU, nccl on GPUs)
    python -m srnn_fast.train --resume runs/ecg_adaptive --epochs 200    (continue, bit-exact)

Presets (``PRESETS``, ``--preset``; by default the task's own) give the networks of the
method: ECG 4 -> 36 -> 6 with a per-step integrator readout; S-MNIST / PS-MNIST 80 (RBF
population) -> 120 -> 100 -> 10 with a spiking readout and spike-count decoding, and
``--preset mnist_256_128``: 40 -> 256 -> 128 -> 10, ``--preset psmnist_64_256``: 4 binarised
pixels (a sliding window) -> 64 -> 256 -> 10, ``--preset psmnist_64_256_256``: the method's
whole PS-MNIST setup, the same with a dense spiking layer of 256 before the readout, zero
recurrent weights at the start and Adamax with a linear decay; SHD 700 -> 128 -> 128 -> 20
with the mean of the readout integrator. Every value can be overridden by a flag (e.g. ``--readout
membrane``: the method's ECG readout, an adaptive spiking output layer whose membrane is the
logit). Adam (or ``--optimizer adamax``) with two parameter groups (time constants tau_* at
``--lr-tau``, everything else at ``--lr``; after each step every tau is projected to >= dt), a
per-epoch decay (StepLR, MultiStepLR with ``--lr-milestones``, or a linear decay to 0 with
``--lr-linear N``).

The best epoch (best.pt, ``best_test_acc`` = its test accuracy) is chosen on a validation
set when the run has one (``--val-fraction``: ECG records, or MNIST images, held out of the
training set), else on the test set (optimistic; ``metrics.json`` says which in ``selected_on``).
With ``--ema DECAY`` the evaluated and checkpointed weights are an exponential moving average
of the trained ones (``WeightEMA``); best.pt and last.pt then hold both (``ema`` and ``model``).
``--resume RUN --ema DECAY`` switches it on for a run trained without it: the average starts
from the resumed weights and ``config.json`` records ``ema_from_epoch``; the epochs before
were evaluated on the raw weights, and the best epoch is still the best on validation.
``--weight-decay W``: decoupled weight decay (AdamW's) of the weight matrices, w <- w (1 - lr W)
before each step (``decay_weights``); ``--resume RUN --weight-decay W`` switches it on from the
next epoch (``weight_decay_from_epoch``). ``--resume RUN --out NEW`` forks a run: NEW starts as a
copy of RUN at the checkpoint's epoch (its metrics and best.pt) and continues with the flags
given, RUN is left as it was (``forked_from`` in NEW's config).
A step whose gradient norm is not finite (BPTT overflowing float32) is skipped and counted
(``skipped_steps`` per epoch, also on the epoch's line); an epoch without one finite step
stops the run with an error (``optimizer_step``). ``--tbptt K`` (truncated BPTT, one process):
a batch takes an optimizer step after every K time steps, on the output decoded so far, with
the state carried on detached (``truncated_bptt_batch``); evaluation runs whole sequences.

Per-step tasks (ECG) report ``test_acc`` over every labelled test step and also
``test_acc_full`` over the test sequences labelled at every step after their context: the
method's ECG test file holds only such sequences (a window crossing a gap in the annotations,
where beats are unusual or skipped, is not in it).

A run folder holds config.json, metrics.json, metrics.csv, best.pt and last.pt, each written to a
temporary file and renamed; an epoch's files commit as a whole, with last.pt (which holds the
epoch's metrics too) as the commit point, so a run killed at any write resumes to the files an
uninterrupted run writes (``checkpoints``). ``build_model(config)`` rebuilds the network from
config.json. Each epoch records its wall time (``time_s``, training + evaluation) and the
process's CPU time (``cpu_time_s``; on a shared machine the steadier figure). The firing rate
Fr (spikes per neuron per step over the test set, per hidden layer and overall) is reported
for spiking hidden layers (adaptive, lif); it is null for the non-spiking relu SRNN and the
baselines.

Multi-process: every global batch (``--batch-size`` samples) is split across the ranks
(rank r takes rows r, r + W, ...), and each rank's loss is its share of the mean over the
whole global batch (for ECG: over all labelled steps of the global batch), so DDP's gradient
average equals the one-process gradient. Each rank seeds its global RNG with seed + rank
after the model is built, so the random initial membranes (init_state="uniform") differ
between ranks and between a 1- and a 2-process run; with init_state="zeros" the runs agree.
Evaluation runs under its own fixed seed (seed + rank; the training RNG is left untouched),
so with init_state="uniform_always" a checkpoint scores the same every time it is evaluated.

The package, along the trainer's sections: ``model`` (presets, ``build_model``, optimizer and
schedule), ``cli`` (the command line, ``main``), ``distributed`` (ranks, sums, RNG state),
``steps`` (loss, optimizer steps, batches, evaluation), ``loop`` (``train``, ``WeightEMA``) and
``checkpoints`` (the run folder's files, ``evaluate_checkpoint``, ``fork_run``).
"""
from .checkpoints import METRIC_FIELDS, evaluate_checkpoint, find_checkpoint, fork_run, load_checkpoint
from .cli import config_from_args, keep_freed_memory, main, make_parser
from .loop import WeightEMA, train
from .model import (ALL_DATA_OPTIONS, BASELINES, DATA_OPTIONS, LATER_SETTINGS, OPTIMIZERS, PRESET_KEYS, PRESETS,
                    SPIKING, SRNN_MODELS, TASKS, build_model, clamp_time_constants, hidden_widths, make_optimizer,
                    make_scheduler, param_groups)
from .steps import (TBPTT_DECODERS, decay_weights, evaluate, evaluation_rng, global_batches, loss_terms,
                    optimizer_step, train_batch, truncated_bptt_batch)

__all__ = ["ALL_DATA_OPTIONS", "BASELINES", "DATA_OPTIONS", "LATER_SETTINGS", "METRIC_FIELDS", "OPTIMIZERS", "PRESETS",
           "PRESET_KEYS", "SPIKING", "SRNN_MODELS", "TASKS", "TBPTT_DECODERS", "WeightEMA", "build_model",
           "clamp_time_constants", "config_from_args", "decay_weights", "evaluate", "evaluate_checkpoint",
           "evaluation_rng", "find_checkpoint", "fork_run", "global_batches", "hidden_widths", "keep_freed_memory",
           "load_checkpoint", "loss_terms", "main", "make_optimizer", "make_parser", "make_scheduler", "optimizer_step",
           "param_groups", "train", "train_batch", "truncated_bptt_batch"]
