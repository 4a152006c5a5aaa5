"""Input encoders: pure functions on tensors, each small enough to check by hand.

    level_crossing(x [T, C], threshold)           -> [T, 2C]  up/down spikes per channel (ECG)
    rbf_population(x [...], n)                    -> [..., n] Gaussian receptive fields (MNIST)
    poisson_population(x [...], n, rng)           -> [..., n] Bernoulli draws of the above
    pixel_windows(x [..., L], k)                  -> [..., ceil(L / k), k]
    sliding_windows(x [..., L], k)                -> [..., L, k]  window of k at every step
    bin_spikes(times, units, n_units, frame_ms, n_frames) -> [n_frames, n_units] (SHD)
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch


def level_crossing(x, threshold: float = 0.3) -> torch.Tensor:
    """Send-on-delta (level-crossing) encoding of each channel of ``x`` [T, C].

    Each channel keeps a reference level, initially x[0]. At step t, if
    ``x[t] - ref >= threshold`` the "up" output spikes, if ``ref - x[t] >= threshold`` the
    "down" output spikes, and in either case ref becomes x[t] (the level at the last event);
    otherwise nothing happens. At most one spike per channel and step; step 0 never spikes.

    Returns float32 [T, 2C] with channels interleaved: (up_0, down_0, up_1, down_1, ...).
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"level_crossing: x must be [T, C]; got shape {tuple(x.shape)}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"level_crossing: threshold must be a finite positive number; got {threshold!r}")
    T, C = x.shape
    out = np.zeros((T, 2 * C), dtype=np.float32)
    # The reference level depends on every earlier event, so this is a sequential loop; on
    # Python floats it runs ~10 M steps/s, enough for all of QTDB's annotated spans.
    for c, column in enumerate(x.T.tolist()):
        if not column:
            continue
        ref = column[0]
        up, down = out[:, 2 * c], out[:, 2 * c + 1]
        for t, v in enumerate(column):
            if v - ref >= threshold:
                up[t] = 1.0
                ref = v
            elif ref - v >= threshold:
                down[t] = 1.0
                ref = v
    return torch.from_numpy(out)


def rbf_centers(n: int) -> torch.Tensor:
    """The n receptive-field centres, evenly spaced over [0, 1] (both ends included)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"population size n must be an integer >= 2; got {n!r}")
    return torch.linspace(0.0, 1.0, n, dtype=torch.float64)


def rbf_population(x, n: int = 80, sigma: Optional[float] = None) -> torch.Tensor:
    """Gaussian receptive fields: ``out[..., j] = exp(-(x - c_j)^2 / (2 sigma^2))``.

    x holds intensities in [0, 1] (any shape); c_j = j / (n - 1); sigma defaults to the
    centre spacing 1 / (n - 1), so each value drives about 3 neighbouring units. Returns
    float32 [..., n] with values in (0, 1], exactly 1 where x sits on a centre.
    """
    centers = rbf_centers(n)
    sigma = 1.0 / (n - 1) if sigma is None else float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite positive number; got {sigma!r}")
    x = torch.as_tensor(x, dtype=torch.float64).unsqueeze(-1)
    return torch.exp(-((x - centers) ** 2) / (2 * sigma * sigma)).to(torch.float32)


def poisson_population(x, n: int = 80, rng=None, sigma: Optional[float] = None) -> torch.Tensor:
    """Binary spikes drawn independently with probability ``p = rbf_population(x, n, sigma)``:
    ``out = (u < p)`` with u uniform in [0, 1) from ``np.random.default_rng(rng)`` (pass a
    seed or a numpy Generator for reproducible draws). Returns float32 [..., n] in {0, 1}.
    """
    return bernoulli(rbf_population(x, n, sigma), rng)


def bernoulli(p, rng=None) -> torch.Tensor:
    """``(u < p)`` as float32, u uniform in [0, 1) from ``np.random.default_rng(rng)``.

    numpy, not torch: items are drawn one at a time, where torch's intra-op threads only
    add overhead (20-100x on a busy 2-core machine).
    """
    p = torch.as_tensor(p, dtype=torch.float32).numpy()
    u = np.random.default_rng(rng).random(p.shape, dtype=np.float32)
    return torch.from_numpy((u < p).astype(np.float32))


def _check_window(k) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"window k must be an integer >= 1; got {k!r}")


def pixel_windows(x, k: int) -> torch.Tensor:
    """Group the last axis (length L) into ceil(L / k) steps of k values, zero-padding the
    last step: ``out[..., s, j] = x[..., s * k + j]``."""
    _check_window(k)
    x = torch.as_tensor(x)
    L = x.shape[-1]
    steps = -(-L // k)
    pad = steps * k - L
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], steps, k)


def sliding_windows(x, k: int) -> torch.Tensor:
    """A window of ``k`` values at every position of the last axis (length L >= k), the last
    ``k`` values once the window would run past the end (the method's PS-MNIST input):
    ``out[..., t, j] = x[..., min(t, L - k) + j]``."""
    _check_window(k)
    x = torch.as_tensor(x)
    L = x.shape[-1]
    if L < k:
        raise ValueError(f"window k = {k} is longer than the sequence ({L} values)")
    start = torch.arange(L).clamp(max=L - k)
    return x[..., start.unsqueeze(1) + torch.arange(k)]


def bin_spikes(times, units, n_units: int, frame_ms: float, n_frames: int) -> torch.Tensor:
    """Binary frames from a list of events (SHD).

    Event i (time ``times[i]`` in seconds, channel ``units[i]``) falls in frame
    ``floor(times[i] * 1000 / frame_ms)``; events outside [0, n_frames) or with a channel
    outside [0, n_units) are dropped (the SHD window is cut at n_frames * frame_ms). A frame
    is 1 where a channel fired at least once in it. Returns float32 [n_frames, n_units].
    """
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    units = np.asarray(units).reshape(-1)
    if times.shape != units.shape:
        raise ValueError(f"times and units must have the same length; got {times.size} and {units.size}")
    frame = np.floor(times * (1000.0 / frame_ms))
    keep = (frame >= 0) & (frame < n_frames) & (units >= 0) & (units < n_units)
    out = np.zeros((n_frames, n_units), dtype=np.float32)
    out[frame[keep].astype(np.int64), units[keep].astype(np.int64)] = 1.0
    return torch.from_numpy(out)
