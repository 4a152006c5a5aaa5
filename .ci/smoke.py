"""Smoke test of an installed srnn_fast (.ci/package_check runs it in a fresh venv, from a
folder outside the source tree): the package imported is the installed one, its compiled
ops load, its MIT license came with it, and a small float64 scan on the C++ kernels equals the reference, on every CPU
build this machine runs. Exits non-zero on any failure."""
import importlib.metadata
import os
import pathlib

import torch

import srnn_fast
from srnn_fast import _ops
from srnn_fast.reference import srnn_scan_ref

here = pathlib.Path(srnn_fast.__file__).resolve().parent
# The tree's srnn_fast/ must not stand in for the installed one (an import from the tree
# would hide a file missing from the sdist or the wheel).
assert "site-packages" in here.parts, f"srnn_fast imported from {here}, not from an installed copy"
assert _ops.EXTENSION_ERROR is None, f"the compiled extension did not load: {_ops.EXTENSION_ERROR}"
for op in ("scan_fwd", "scan_bwd", "grad_w_rec", "layer_fwd", "layer_bwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"srnn_fast::{op}", "CPU"), f"no CPU kernel for {op}"
assert "cpp" in srnn_fast.available_backends(), srnn_fast.available_backends()
# The wheel carries its license: named in the metadata, its text installed with the package.
assert importlib.metadata.metadata("srnn_fast")["License-Expression"] == "MIT"
licenses = [f for f in importlib.metadata.files("srnn_fast") if f.name == "LICENSE"]
assert len(licenses) == 1 and "MIT License" in licenses[0].read_text(), licenses

# A small adaptive-neuron scan in float64, H not a multiple of 32 (partial spike-bit words).
T, B, H = 40, 3, 37
g = torch.Generator().manual_seed(0)
inputs = dict(x_proj=torch.randn(T, B, H, generator=g, dtype=torch.float64) * 1.5 + 0.4,
              w_rec=torch.randn(H, H, generator=g, dtype=torch.float64) * (0.6 / H ** 0.5),
              tau_m=5.0 + 25.0 * torch.rand(H, generator=g, dtype=torch.float64),
              tau_adp=40.0 + 160.0 * torch.rand(H, generator=g, dtype=torch.float64))
upstream = torch.randn(T, B, H, generator=g, dtype=torch.float64)


def run(fn, **kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    s, (u, eta, _) = fn(*leaves.values(), neuron="adaptive", **kw)
    grads = torch.autograd.grad((s * upstream).sum() + u.sum() + eta.sum(), list(leaves.values()))
    return s.detach(), u.detach(), dict(zip(leaves, grads))


s_ref, u_ref, g_ref = run(srnn_scan_ref)
assert 0.05 < float(s_ref.mean()) < 0.6, f"firing rate {float(s_ref.mean()):.3f}: the case tests little"
from srnn_fast import _C  # noqa: E402  (after the checks above, which say why it would fail)

builds, best = _C.supported_cpu_capabilities(), _C.cpu_capability()
for build in builds:
    _C.set_cpu_capability(build)
    s, u, grads = run(srnn_fast.srnn_scan, backend="cpp")
    assert torch.equal(s, s_ref), f"[{build}] spikes differ at {int((s != s_ref).sum())} places"
    torch.testing.assert_close(u, u_ref, rtol=1e-9, atol=1e-12)
    for k, gr in g_ref.items():
        torch.testing.assert_close(grads[k], gr, rtol=1e-9, atol=1e-9 * float(gr.abs().max()),
                                   msg=lambda m, k=k, b=build: f"[{b}] grad of {k}: {m}")

_C.set_cpu_capability(best)  # the report below shows the choice a user gets

print(srnn_fast.show_config(quiet=True))
print(f"smoke test passed in {os.getcwd()}: srnn_fast from {here}, cpp == reference (float64) "
      f"on CPU builds {', '.join(builds)}")
