"""The reference scan: hand-computed tiny cases, surrogates, gradients, finite differences."""
import math

import pytest
import torch

from srnn_fast import SRNNState
from srnn_fast.reference import SpikeFunction, srnn_scan_ref, surrogate_grad


def tiny_case():
    """T = 3, B = 1, H = 2 with decays chosen as alpha = 0.5, rho = 0.75 (dt = r_m = 1)."""
    x = torch.tensor([[[1.2, 0.1]], [[0.3, 0.9]], [[0.8, 0.2]]], dtype=torch.float64)
    w = torch.tensor([[0.0, 0.5], [0.25, 0.0]], dtype=torch.float64)
    tau_m = torch.full((2,), 1.0 / math.log(2.0), dtype=torch.float64)        # alpha = 1/2
    tau_adp = torch.full((2,), 1.0 / math.log(4.0 / 3.0), dtype=torch.float64)  # rho = 3/4
    return x, w, tau_m, tau_adp


# Worked by hand, step by step (b0 = 0.01; eta_0 = b0, u_0 = s_0 = 0):
#  adaptive (beta 1.8):
#   t1: eta = .0075, theta = .0235, I = (1.2, .1), u = (.6, .05), s = (1, 1)
#   t2: eta = .255625, theta = .470125, I = (.3+.5, .9+.25), u = (.3+.4-.470125, .025+.575-.470125)
#       = (.229875, .129875), v < 0, s = (0, 0)
#   t3: eta = .19171875, theta = .35509375, I = (.8, .2), u = (.5149375, .1649375), s = (1, 0)
#  lif (beta 0, theta = .01):
#   t1: u = (.6, .05), s = (1, 1); t2: u = (.69, .59), s = (1, 1)
#   t3: I = (.8+.5, .2+.25), u = (.345+.65-.01, .295+.225-.01) = (.985, .51), s = (1, 1)
#  relu (beta 0): s = relu(u - .01)
#   t1: u = (.6, .05), s = (.59, .04)
#   t2: eta = (.153125, .015625), I = (.32, 1.0475), u = (.3+.16-.0059, .025+.52375-.0004)
#       = (.4541, .54835), s = (.4441, .53835)
#   t3: eta = (.22586875, .14630625), I = (1.069175, .311025),
#       u = (.22705+.5345875-.004441, .274175+.1555125-.0053835) = (.7571965, .424304)
HAND = {
    "adaptive": dict(s=[[1, 1], [0, 0], [1, 0]], u=[0.5149375, 0.1649375], eta=[0.19171875, 0.19171875]),
    "lif": dict(s=[[1, 1], [1, 1], [1, 1]], u=[0.985, 0.51], eta=[0.44171875, 0.44171875]),
    "relu": dict(s=[[0.59, 0.04], [0.4441, 0.53835], [0.7471965, 0.414304]], u=[0.7571965, 0.424304],
                 eta=[0.22586875, 0.14630625]),
}


@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
def test_hand_computed(neuron):
    s, (u, eta, s_T) = srnn_scan_ref(*tiny_case(), neuron=neuron)
    want = HAND[neuron]
    torch.testing.assert_close(s[:, 0], torch.tensor(want["s"], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(u[0], torch.tensor(want["u"], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(eta[0], torch.tensor(want["eta"], dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(s_T, s[-1])


def test_reset_uses_previous_spike_and_current_threshold():
    # One neuron that spiked at t-1: u_t = alpha u + (1-alpha) I - theta_t * 1 * dt, with theta_t
    # computed from eta_t (already updated by that spike), not from eta_{t-1}.
    x = torch.zeros(1, 1, 1, dtype=torch.float64)
    w = torch.zeros(1, 1, dtype=torch.float64)
    tau = torch.ones(1, dtype=torch.float64)
    state = SRNNState(*(torch.tensor([[v]], dtype=torch.float64) for v in (0.0, 0.1, 1.0)))
    _, (u, eta, _) = srnn_scan_ref(x, w, tau, tau, state, b0=0.0, beta=2.0)
    rho = math.exp(-1.0)
    eta_1 = rho * 0.1 + (1 - rho)
    assert eta.item() == pytest.approx(eta_1, abs=1e-14)
    assert u.item() == pytest.approx(-2.0 * eta_1, abs=1e-14)


SURROGATE_AT_ZERO = {
    # gamma / (sqrt(2 pi) sigma) with gamma = sigma = 0.5
    "gaussian": 0.3989422804014327,
    # 0.5 * (1.15 * 0.79788456 - 2 * 0.15 * exp(-0.25 / 18) / (sqrt(2 pi) * 3))
    "multi_gaussian": 0.5 * (1.15 * 0.7978845608028654 - 0.3 * math.exp(-0.25 / 18) / (math.sqrt(2 * math.pi) * 3)),
}


@pytest.mark.parametrize("surrogate,integral", [("gaussian", 0.5), ("multi_gaussian", 0.5 * 0.85)])
def test_surrogate_values_and_integrals(surrogate, integral):
    x = torch.linspace(-40, 40, 400001, dtype=torch.float64)
    g = surrogate_grad(x, surrogate, 0.5, 0.5)
    assert float(torch.trapezoid(g, x)) == pytest.approx(integral, rel=1e-9)
    assert float(surrogate_grad(torch.zeros((), dtype=torch.float64), surrogate, 0.5, 0.5)) == \
        pytest.approx(SURROGATE_AT_ZERO[surrogate], rel=1e-12)
    # symmetric, and it is what the spike function's backward returns
    assert torch.allclose(g, g.flip(0))
    v = torch.tensor([-0.7, 0.0, 0.3], dtype=torch.float64, requires_grad=True)
    spikes = SpikeFunction.apply(v, surrogate, 0.5, 0.5)
    assert spikes.tolist() == [0.0, 0.0, 1.0]  # H(0) = 0
    (grad,) = torch.autograd.grad(spikes.sum(), v)
    torch.testing.assert_close(grad, surrogate_grad(v.detach(), surrogate, 0.5, 0.5))


def test_multi_gaussian_has_negative_side_lobes():
    g = surrogate_grad(torch.tensor([0.0, 1.5, -1.5], dtype=torch.float64), "multi_gaussian", 0.5, 0.5)
    assert g[0] > 0 and g[1] < 0 and g[2] < 0


def test_gradients_reach_everything():
    from srnn_fast import AdaptiveSRNN

    torch.manual_seed(0)
    net = AdaptiveSRNN(3, [8, 6], 4, decode="mean", backend="reference")
    out = net(torch.rand(30, 5, 3) * 3)
    out.square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # and the initial state
    layer = net.layers[0]
    state = SRNNState(*(torch.rand(5, 8, requires_grad=True) for _ in range(3)))
    s, _ = layer(torch.rand(30, 5, 3) * 3, state)
    s.sum().backward()
    for name, t in zip(("u", "eta", "s"), state):
        assert t.grad is not None and t.grad.abs().sum() > 0, name


def _fd_case(seed, H=3):
    g = torch.Generator().manual_seed(seed)
    T, B = 6, 2
    x = torch.randn(T, B, H, generator=g, dtype=torch.float64) * 2
    w = torch.randn(H, H, generator=g, dtype=torch.float64) * 0.3
    tau_m = 5 + 20 * torch.rand(H, generator=g, dtype=torch.float64)
    tau_adp = 50 + 100 * torch.rand(H, generator=g, dtype=torch.float64)
    state = [torch.rand(B, H, generator=g, dtype=torch.float64) for _ in range(2)]
    state.append((torch.rand(B, H, generator=g, dtype=torch.float64) < 0.5).double())
    return [t.requires_grad_() for t in (x, w, tau_m, tau_adp, *state)]


@pytest.mark.parametrize("neuron", ["adaptive", "lif", "relu"])
def test_gradient_equals_finite_differences(neuron):
    """With a narrow surrogate (sigma 0.02) and no membrane within ~0.3 of threshold the
    surrogate terms vanish, so autograd's gradient is the true one; relu is smooth anyway."""
    for seed in range(50):
        inputs = _fd_case(seed)

        def f(*args, gamma=0.5):
            s, st = srnn_scan_ref(*args[:4], SRNNState(*args[4:]), neuron=neuron, sigma=0.02, gamma=gamma)
            return s, st.u, st.eta

        outs = f(*inputs)
        # no spike near threshold <=> the surrogate gain does not change the gradient
        g_on = torch.autograd.grad(sum(o.sum() for o in outs), inputs)
        g_off = torch.autograd.grad(sum(o.sum() for o in f(*inputs, gamma=0.0)), inputs)
        if neuron == "relu" or all(torch.allclose(a, b, rtol=0, atol=1e-13) for a, b in zip(g_on, g_off)):
            break
    else:
        pytest.fail("no seed without a membrane near threshold")
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
