"""The builds of the CPU kernels per instruction set (csrc/cpu_isa.h) and the choice among
them: srnn_fast.cpu_capability(), SRNN_FAST_CPU_CAPABILITY, and that the builds agree."""
import os
import subprocess
import sys

import pytest
import torch

import srnn_fast
from scan_cases import cpu_capabilities, cpu_capability, fused, make_case

pytestmark = pytest.mark.usefixtures("cpp_extension")
CAPABILITIES = ("avx512", "avx2", "default")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the choice is made once per process)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("SRNN_FAST_CPU_CAPABILITY", "_SRNN_FAST_TEST_CPU_MAX")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_capability_is_the_best_supported():
    supported = cpu_capabilities()
    assert supported and set(supported) <= set(CAPABILITIES) and supported[-1] == "default"
    assert list(supported) == [c for c in CAPABILITIES if c in supported]  # best first
    p = run_python("import srnn_fast; print(srnn_fast.cpu_capability())")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == supported[0]


def test_detection_matches_the_cpu_flags():
    """On x86-64, the builds offered follow /proc/cpuinfo (x86-64-v3 -> avx2, v4 -> avx512)."""
    flags = cpu_flags()
    if "avx2" not in flags:
        pytest.skip("no x86-64 AVX2 flags in /proc/cpuinfo")
    supported = cpu_capabilities()
    assert ("avx2" in supported) == ({"avx2", "fma", "bmi1", "bmi2", "popcnt"} <= flags)
    assert ("avx512" in supported) == ({"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags and "avx2" in supported)


@pytest.mark.parametrize("name", CAPABILITIES)
def test_environment_variable_forces_a_build(name):
    if name not in cpu_capabilities():
        pytest.skip(f"this CPU cannot run the {name} build")
    code = ("import torch, srnn_fast; "
            "s, _ = srnn_fast.srnn_scan(torch.randn(5, 2, 7), torch.randn(7, 7), torch.full((7,), 20.), "
            "torch.full((7,), 100.), backend='cpp'); print(srnn_fast.cpu_capability())")
    p = run_python(code, SRNN_FAST_CPU_CAPABILITY=name)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == name


def test_bad_value_is_a_clear_error_where_used():
    code = ("import torch, srnn_fast\n"
            "for call in (srnn_fast.cpu_capability, lambda: srnn_fast.srnn_scan(torch.randn(3, 1, 4), torch.eye(4),"
            " torch.full((4,), 20.), torch.full((4,), 100.), backend='cpp')):\n"
            "    try:\n        call()\n    except RuntimeError as e:\n        print('ERR', e)\n")
    p = run_python(code, SRNN_FAST_CPU_CAPABILITY="avx3")  # the import itself must not fail
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2, p.stdout
    for line in lines:
        assert "SRNN_FAST_CPU_CAPABILITY=avx3" in line and "avx512, avx2, default" in line, line


@pytest.mark.parametrize("asked,cap,left", [("avx512", "avx2", "avx2, default"), ("avx2", "default", "default")])
def test_build_the_cpu_lacks_names_what_it_has(asked, cap, left):
    p = run_python("import srnn_fast\ntry:\n    srnn_fast.cpu_capability()\nexcept RuntimeError as e:\n    print(e)",
                   SRNN_FAST_CPU_CAPABILITY=asked, _SRNN_FAST_TEST_CPU_MAX=cap)
    assert p.returncode == 0, p.stderr
    assert f"asks for the {asked} CPU kernels" in p.stdout and f"supports only: {left}" in p.stdout, p.stdout


def test_forcing_a_build_in_process():
    from srnn_fast import _C

    with pytest.raises(RuntimeError, match="must be one of avx512, avx2, default"):
        _C.set_cpu_capability("sse2")
    with pytest.raises(TypeError):
        _C.set_cpu_capability(2)
    for name in cpu_capabilities():
        with cpu_capability(name):
            assert srnn_fast.cpu_capability() == name


def layer_run(x, layer):
    s, state = layer(x)
    loss = (s * torch.linspace(-1, 1, s.shape[-1], dtype=s.dtype)).sum() + state.u.sum() + state.eta.sum()
    return [s.detach(), state.u.detach(), *torch.autograd.grad(loss, [x, *layer.parameters()])]


@pytest.mark.parametrize("density", [0.05, 0.6], ids=["sparse-input", "dense-input"])
def test_builds_agree(density):
    """Width and blocking change which lanes and rows are computed together, never the order
    of a sum's terms: the avx2 and avx512 builds (both with FMA) are bitwise equal; the
    default build (no FMA) gives the same spikes and differs in the last bits only."""
    supported = cpu_capabilities()
    torch.manual_seed(0)
    layer = srnn_fast.SRNNLayer(50, 70, neuron="adaptive", init_state="zeros", backend="cpp")
    x = ((torch.rand(90, 6, 50) < density).float() * 2).requires_grad_(True)
    inputs, upstream = make_case(60, 5, 45, dtype=torch.float32, seed=3)
    results = {}
    for name in supported:
        with cpu_capability(name):
            scan = fused(inputs, upstream, "cpp")
            results[name] = layer_run(x, layer) + [scan[k] for k in sorted(scan)]
    if {"avx512", "avx2"} <= set(supported):
        for a, b in zip(results["avx512"], results["avx2"]):
            assert torch.equal(a, b)
    base = results[supported[0]]
    for a, b in zip(results["default"], base):
        if a.dtype == torch.float32 and torch.all((b == 0) | (b == 1)):
            assert torch.equal(a, b)  # spikes
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
