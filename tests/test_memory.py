"""What the fused kernels save for backward, against what the reference's autograd graph
keeps, counted with saved-tensor hooks (bench/measure.py: once per storage, without the
caller's input and parameters, which exist with or without a graph).

The reference loop keeps six [B, H] tensors per step (eta_{t-1}, s_{t-1}, u_{t-1}, I_t,
theta_t, u_t - theta_t: 24 B per neuron-step in float32). The fused scan op (x_proj given)
saves the membrane u_t (4 B) and the spike bits: about 1/5.7 of that. The fused layer
(SRNNLayer on "cpp": projection inside the kernel) saves the spike bits plus u and eta every
CKPT_EVERY steps and recomputes the rest from the layer input: about 1/50.
"""
import os
import sys

import pytest
import torch

import srnn_fast
from scan_cases import make_case
from srnn_fast.layer import CKPT_EVERY

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from measure import saved_bytes  # noqa: E402

pytestmark = pytest.mark.skipif("cpp" not in srnn_fast.available_backends(), reason="extension not built")


def scan_saved(backend, inputs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    state = srnn_fast.SRNNState(leaves["u0"], leaves["eta0"], leaves["s0"])
    return saved_bytes(lambda: srnn_fast.srnn_scan(leaves["x_proj"], leaves["w_rec"], leaves["tau_m"],
                                                    leaves["tau_adp"], state, backend=backend),
                       exclude=leaves.values())


def layer_saved(backend, T, B, I, H):
    torch.manual_seed(0)
    layer = srnn_fast.SRNNLayer(I, H, backend=backend)
    x = (torch.rand(T, B, I) < 0.05).float()
    return saved_bytes(lambda: layer(x), exclude=[x, *layer.parameters()])


@pytest.mark.parametrize("T,B,H", [(1301, 8, 36), (250, 8, 128)], ids=["ecg-T1301-H36", "shd-T250-H128"])
def test_scan_saved_bytes_against_reference(T, B, H):
    inputs, _ = make_case(T, B, H, dtype=torch.float32)
    fused, ref = scan_saved("cpp", inputs), scan_saved("reference", inputs)
    words = (H + 31) // 32
    big = 4 * (T * B * H + T * B * words)  # u_seq + spike bits
    assert big <= fused <= big + 4 * (8 * H)  # plus [H] vectors (alpha, rho, what exp saves)
    assert ref >= 6 * 4 * T * B * H
    assert fused / ref < 0.18, f"saved {fused} B vs the reference's {ref} B"


@pytest.mark.parametrize("T,B,I,H", [(1301, 8, 4, 36), (250, 8, 700, 128), (784, 8, 80, 120)],
                         ids=["ecg", "shd", "smnist"])
def test_layer_saved_bytes_at_most_an_eighth(T, B, I, H):
    fused, ref = layer_saved("cpp", T, B, I, H), layer_saved("reference", T, B, I, H)
    words = (H + 31) // 32
    chunks = -(-T // CKPT_EVERY)
    design = 4 * (T * B * words + 2 * chunks * B * H)  # spike bits + u, eta checkpoints
    # plus the initial state (u0 is drawn per call) and [H] vectors (alpha, rho, exp's saves)
    assert design <= fused <= design + 4 * (3 * B * H + 8 * H), fused
    assert ref >= 6 * 4 * T * B * H
    assert fused * 8 <= ref, f"saved {fused} B vs the reference's {ref} B"
    assert fused * 30 <= ref, f"ratio {fused / ref:.3f}: the design gives about 1/50"


def test_relu_saves_activations():
    """relu activations are real-valued: the layer saves s itself instead of bits."""
    T, B, I, H = 50, 4, 6, 40
    torch.manual_seed(0)
    layer = srnn_fast.SRNNLayer(I, H, neuron="relu", backend="cpp")
    x = torch.rand(T, B, I)
    got = saved_bytes(lambda: layer(x), exclude=[x, *layer.parameters()])
    big = 4 * (T * B * H + 2 * -(-T // CKPT_EVERY) * B * H)  # s + checkpoints
    assert big <= got <= big + 4 * (3 * B * H + 8 * H)
