"""srnn_fast.cuda_resources, the CPU-side check of the CUDA kernels' registers, spills and
shared memory (CI tier 2 runs it on the nvcc build): its parsing and its verdicts, on
made-up cuobjdump output and launch plans, so that it is known to fail on a violation; and
the extension's launch planner where the CUDA kernels are built (no GPU needed)."""
import pytest

from srnn_fast import _ops
from srnn_fast import cuda_resources as cr
from srnn_fast.scan import _has_kernel

# scan_cuda.cu (which also defines srnn_fast::cuda_launch_plan) is in the build.
CUDA_BUILT = _ops.EXTENSION_ERROR is None and _has_kernel("srnn_fast::scan_fwd", "CUDA")

FWD_F64 = "_ZN4srnn51_GLOBAL__N__x_12_scan_cuda_cu_y21fwd_persistent_kernelIddEEvPKT0_PKT_"
BWD_F32 = "_ZN4srnn51_GLOBAL__N__x_12_scan_cuda_cu_y21bwd_persistent_kernelIfEEvPKT_S4_"
STEP = "_ZN4srnn51_GLOBAL__N__x_12_scan_cuda_cu_y15fwd_step_kernelIfN3c104HalfEEEvPKT0_"
DUMP = f"""
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function {FWD_F64}:
  REG:54 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:521 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90

Resource usage:
 Function {BWD_F32}:
  REG:64 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:704 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {STEP}:
  REG:26 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:473 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    usages = cr.parse_resource_usage(DUMP)
    assert usages == [cr.Usage(80, FWD_F64, 54, 0, 0, 0), cr.Usage(90, BWD_F32, 64, 16, 1024, 0),
                      cr.Usage(90, STEP, 26, 0, 1024, 8)]
    assert [u.user_shared for u in usages] == [0, 0, 0]  # sm_90's 1 KB reservation is not the kernel's


def test_persistent_kind_from_mangled_names():
    assert cr.persistent_kind(FWD_F64) == ("forward", True)
    assert cr.persistent_kind(BWD_F32) == ("backward", False)
    assert cr.persistent_kind(STEP) is None


def fake_plan(smem_at_h200=0, threads=None):
    """A planner that sends H <= 200 to the persistent kernel with one row per block."""
    def plan(B, H, double, forward, max_smem, sms):
        if H > 200:
            return 0, 0, 0
        smem = smem_at_h200 if H == 200 else H * H * 4
        return 1, threads or (H + 31) // 32 * 32, smem
    return plan


@pytest.mark.parametrize("plan,problem", [
    (fake_plan(), None),
    (fake_plan(smem_at_h200=232449), "H = 200: 1 rows need 0 + 232449 bytes of shared memory > 232448"),
    (fake_plan(threads=1024), "1024 threads x 72 registers do not fit a block"),
], ids=["fits", "shared", "registers"])
def test_check_persistent(monkeypatch, plan, problem):
    monkeypatch.setattr(cr, "launch_plan", plan)
    usage = cr.Usage(90, FWD_F64, 72, 0, 1024, 0)
    result = cr.check_persistent(usage, forward=True, double=True, h_range=range(1, 260))
    if problem is None:
        assert result.problems == [] and result.max_h == 200 and result.max_shared == 199 * 199 * 4
    else:
        assert any(problem in p for p in result.problems), result.problems


def test_main_fails_on_a_spill(monkeypatch, capsys):
    """The command exits non-zero and names the kernel when one spills registers (sm_90's
    backward here), and prints the table either way."""
    if _ops.EXTENSION_ERROR is not None:
        pytest.skip(f"needs the built extension: {_ops.EXTENSION_ERROR}")
    monkeypatch.setattr(cr, "resource_usage", lambda path: cr.parse_resource_usage(DUMP))
    monkeypatch.setattr(cr, "launch_plan", fake_plan())
    with pytest.raises(SystemExit) as e:
        cr.main(["--library", "unused.so"])
    assert "bwd_persistent_kernel" in str(e.value.code) and "16 bytes of register spills" in str(e.value.code)
    assert "8 bytes of register spills" in str(e.value.code)  # the step kernel's local memory
    assert capsys.readouterr().out.count("| sm_") == 3


@pytest.mark.skipif(not CUDA_BUILT, reason="needs the CUDA kernels built")
@pytest.mark.parametrize("arch,double,largest", [(90, False, 240), (90, True, 169), (80, False, 203),
                                                 (80, True, 143)])
def test_launch_plan_persistent_limits(arch, double, largest):
    """The extension's planner (no GPU): the largest H kept persistent at an architecture's
    opt-in limit, W_rec plus two rows of state per block, and within it every block under
    the limit."""
    limit, sms = cr.SMEM_OPTIN_LIMIT[arch], cr.SM_COUNTS[arch]
    for forward in (True, False):
        assert cr.launch_plan(1, largest, double, forward, limit, sms)[0] == 1
        assert cr.launch_plan(1, largest + 1, double, forward, limit, sms)[0] == 0
        rows, threads, smem = cr.launch_plan(100000, largest, double, forward, limit, sms)
        assert rows >= 1 and threads == rows * ((largest + 31) // 32 * 32) and smem <= limit
    with pytest.raises(RuntimeError, match="cuda_launch_plan needs 1 <= B, H"):
        cr.launch_plan(0, 10, double, True, limit, sms)
