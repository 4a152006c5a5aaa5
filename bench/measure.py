"""Measurement helpers shared by bench/run.py and tests/test_memory.py."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int,
                before: Callable[[], None] = lambda: None) -> float:
    """Median wall time of fn() in seconds, after ``warmup`` untimed calls; ``before`` runs
    untimed ahead of every call (e.g. clearing gradients)."""
    for _ in range(warmup):
        before()
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saved_bytes(fn: Callable[[], object], exclude=()) -> int:
    """Bytes autograd keeps for backward while fn() runs: every tensor saved by any node
    (torch.autograd.graph.saved_tensors_hooks), counted once per storage, whole storage
    (a view saved by several ops, or slices of one tensor saved by several steps, count once).
    Storages of the tensors in ``exclude`` (the caller's inputs and parameters, which exist
    with or without the graph) are not counted."""
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in exclude if t is not None}
    storages = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if key not in skip:
            storages[key] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()  # held until counted: the graph keeps every saved storage alive meanwhile
    total = sum(storages.values())
    del out
    return total
