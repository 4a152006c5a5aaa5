"""Every encoder on small signals checked by hand."""
import math

import numpy as np
import pytest
import torch

from srnn_fast.data.encoders import (bin_spikes, level_crossing, pixel_windows, poisson_population, rbf_population,
                                     sliding_windows)


def test_level_crossing_hand_signal():
    # ref starts at 0; 0.25 < 0.5 no event; 0.5 -> up (ref .5); .25 no; 0 -> down (ref 0);
    # 1 -> up (one spike although it rose by 2 thresholds; ref 1); .75 no; -.25 -> down.
    x = torch.tensor([[0.0, 0.25, 0.5, 0.25, 0.0, 1.0, 0.75, -0.25]]).T
    out = level_crossing(x, threshold=0.5)
    assert out.dtype == torch.float32 and out.shape == (8, 2)
    assert out[:, 0].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]  # up
    assert out[:, 1].tolist() == [0, 0, 0, 0, 1, 0, 0, 1]  # down


def test_level_crossing_channels_interleaved_and_independent():
    x = torch.tensor([[0.0, 5.0], [1.0, 5.0], [1.0, 4.0], [0.0, 4.5]])
    out = level_crossing(x, threshold=1.0)
    # columns: up_0, down_0, up_1, down_1; channel 1 starts at its own x[0] = 5.
    assert out.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]]


def test_level_crossing_threshold_changes_events():
    x = torch.tensor([[0.0, 0.3, 0.6]]).T
    assert level_crossing(x, 0.3).sum() == 2
    assert level_crossing(x, 0.5).tolist() == [[0, 0], [0, 0], [1, 0]]


@pytest.mark.parametrize("bad", [0, -0.1, float("nan")])
def test_level_crossing_rejects_bad_threshold(bad):
    with pytest.raises(ValueError, match="threshold"):
        level_crossing(torch.zeros(3, 1), bad)


def test_level_crossing_rejects_1d():
    with pytest.raises(ValueError, match=r"\[T, C\]"):
        level_crossing(torch.zeros(3), 0.3)


def test_rbf_population_hand_values():
    # n = 5: centres 0, .25, .5, .75, 1, sigma = .25; exp(-(k/4)^2 / (2/16)) = exp(-k^2/2).
    out = rbf_population(torch.tensor([0.5, 0.0]), n=5)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    e = [math.exp(-k * k / 2) for k in range(5)]
    torch.testing.assert_close(out[0], torch.tensor([e[2], e[1], e[0], e[1], e[2]]))
    torch.testing.assert_close(out[1], torch.tensor(e))


def test_rbf_population_sigma_and_shape():
    out = rbf_population(torch.full((3, 4), 0.5), n=3, sigma=0.5)  # centres 0, .5, 1
    assert out.shape == (3, 4, 3)
    torch.testing.assert_close(out[1, 2], torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5)]))
    with pytest.raises(ValueError, match="population size"):
        rbf_population(torch.zeros(2), n=1)


def test_poisson_population_extremes_rate_and_seed():
    # sigma tiny: x = 0 drives unit 0 with p = 1 and unit 1 with p = exp(-5000) = 0.
    out = poisson_population(torch.zeros(100), n=2, rng=0, sigma=0.01)
    assert out[:, 0].eq(1).all() and out[:, 1].eq(0).all()
    x = torch.full((20000,), 0.25)  # n = 3, centres 0, .5, 1, sigma .5: p = [e^-1/8, e^-1/8, e^-9/8]
    draws = poisson_population(x, n=3, rng=1)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    expected = torch.tensor([math.exp(-1 / 8), math.exp(-1 / 8), math.exp(-9 / 8)])
    torch.testing.assert_close(draws.mean(0), expected, atol=0.015, rtol=0)  # ~5 binomial std
    assert torch.equal(draws, poisson_population(x, n=3, rng=1))
    assert not torch.equal(draws, poisson_population(x, n=3, rng=2))
    assert torch.equal(poisson_population(x, n=3, rng=np.random.default_rng(1)), draws)


def test_pixel_windows_hand():
    out = pixel_windows(torch.arange(1, 8), 3)
    assert out.tolist() == [[1, 2, 3], [4, 5, 6], [7, 0, 0]]
    assert pixel_windows(torch.arange(6), 1).shape == (6, 1)
    assert pixel_windows(torch.zeros(2, 784), 4).shape == (2, 196, 4)
    assert pixel_windows(torch.zeros(784), 5).shape == (157, 5)
    with pytest.raises(ValueError, match="window"):
        pixel_windows(torch.zeros(4), 0)


def test_sliding_windows_hand():
    # a window at every step; the last k values once it would run past the end
    assert sliding_windows(torch.arange(1, 6), 3).tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [3, 4, 5], [3, 4, 5]]
    assert sliding_windows(torch.arange(5), 1).tolist() == [[0], [1], [2], [3], [4]]
    assert sliding_windows(torch.arange(4), 4).tolist() == [[0, 1, 2, 3]] * 4
    x = torch.rand(2, 784)
    out = sliding_windows(x, 4)
    assert out.shape == (2, 784, 4) and torch.equal(out[1, 10], x[1, 10:14]) and torch.equal(out[0, 783], x[0, 780:])
    with pytest.raises(ValueError, match="window"):
        sliding_windows(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="longer than the sequence"):
        sliding_windows(torch.zeros(3), 4)


def test_bin_spikes_hand():
    times = [0.0, 0.0039, 0.004, 0.0125, 0.0126, 0.999, 1.0, -0.1, 0.5]
    units = [0, 1, 1, 699, 699, 5, 3, 2, 700]
    out = bin_spikes(times, units, n_units=700, frame_ms=4, n_frames=250)
    assert out.shape == (250, 700) and out.dtype == torch.float32
    expected = torch.zeros(250, 700)
    # 0 and 3.9 ms -> frame 0; 4 ms -> frame 1; 12.5 and 12.6 ms -> frame 3 once (binary);
    # 999 ms -> frame 249; 1 s and negative times and channel 700 are dropped.
    for frame, unit in [(0, 0), (0, 1), (1, 1), (3, 699), (249, 5)]:
        expected[frame, unit] = 1
    assert torch.equal(out, expected)
    ten = bin_spikes(times, units, 700, 10, 100)
    assert ten.sum() == 4 and ten[0, 1] == 1 and ten[1, 699] == 1 and ten[99, 5] == 1
    with pytest.raises(ValueError, match="same length"):
        bin_spikes([0.1], [1, 2], 700, 4, 250)
