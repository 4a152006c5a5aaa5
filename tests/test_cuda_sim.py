"""The CUDA execution harness (csrc/sim, srnn_fast/cuda_sim.py) itself: that it catches the
faults it claims to, on small kernels with known defects (csrc/sim/selftest_kernels.h), and
that backend "cuda_sim" stays a test backend. The CUDA scan's own cases run on it in
tests/test_cuda.py."""
import pytest
import torch

import srnn_fast
from srnn_fast import BackendUnavailableError, cuda_sim
from srnn_fast.scan import resolve_backend

pytestmark = pytest.mark.skipif(cuda_sim.SIM_ERROR is not None, reason=f"cuda_sim is not built: {cuda_sim.SIM_ERROR}")
SCHEDULES = ("ascending", "reversed", "shuffled:7")


def selftest(name, blocks, threads, schedule="ascending", every_schedule=False):
    cuda_sim._cuda_sim.set_schedule(schedule)
    try:
        return cuda_sim._cuda_sim.selftest(name, blocks, threads, every_schedule)
    finally:
        cuda_sim._cuda_sim.set_schedule("ascending")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_correct_kernel_same_under_every_schedule(schedule):
    """A block sum through shared memory and __syncthreads: 0 + 1 + ... + 63 per block."""
    assert selftest("block_sum", 3, 64, schedule)[:3] == [2016.0] * 3


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ballot_full_and_partial_warp(schedule):
    """40 threads: a full warp and one of 8 lanes; every third thread votes."""
    out = selftest("ballot_words", 1, 40, schedule)
    assert out[:32] == [float(sum(1 << i for i in range(0, 32, 3)))] * 32
    assert out[32:] == [float((1 << 1) | (1 << 4) | (1 << 7))] * 8  # threads 33, 36, 39


def test_missing_barrier_shows_as_schedules_that_disagree():
    """Without a barrier, what a thread reads of its neighbour's slot depends on the order:
    poison (NaN) where the neighbour has not run yet. The ops run under several schedules and
    compare; so does selftest(every_schedule=True)."""
    ascending, reversed_ = (selftest("missing_barrier", 1, 8, s) for s in ("ascending", "reversed"))
    assert ascending != reversed_ and any(v != v for v in ascending)
    with cuda_sim.schedules("ascending", "reversed"):
        with pytest.raises(RuntimeError, match="differs between thread schedules ascending and reversed"):
            selftest("missing_barrier", 1, 8, every_schedule=True)
        assert selftest("block_sum", 2, 32, every_schedule=True)[:2] == [496.0, 496.0]


def test_read_before_write_reaches_the_output_as_nan():
    out = selftest("read_before_write", 1, 4)
    assert out[:3] == [1.0] * 3 and out[3] != out[3]


def test_thread_leaving_a_barrier_is_reported():
    with pytest.raises(RuntimeError, match=r"exit_before_barrier, block \(1, 0, 0\), thread \(3, 0, 0\) left the "
                                           r"kernel while 7 threads wait at __syncthreads"):
        selftest("exit_before_barrier", 2, 8, "reversed")
    assert selftest("block_sum", 1, 8) == [28.0] + [-1.0] * 7  # the harness recovers


def test_ballot_not_reached_by_a_lane_is_reported():
    with pytest.raises(RuntimeError, match=r"ballot_lane_missing, block \(0, 0, 0\), thread \(\d+, 0, 0\): "
                                           r"__ballot_sync with mask 0xffffffff is never reached by lane 5 "
                                           r"\(thread \(5, 0, 0\)\), which left the kernel"):
        selftest("ballot_lane_missing", 1, 32)
    with pytest.raises(RuntimeError, match=r"mask 0x1 that leaves out the calling lane"):
        selftest("ballot_mask_without_caller", 1, 32)


def test_shared_memory_limits_as_the_cuda_runtime():
    """Above 48 KiB only after cudaFuncSetAttribute, which fails above the opt-in limit less
    the kernel's static shared memory."""
    with pytest.raises(RuntimeError, match=r"49160 bytes of dynamic shared memory, above the kernel's "
                                           r"cudaFuncAttributeMaxDynamicSharedMemorySize of 49152"):
        selftest("smem_without_attribute", 1, 32)
    with pytest.raises(RuntimeError, match=r"MaxDynamicSharedMemorySize, 232449\) fails"):
        selftest("smem_attribute_over_limit", 1, 1)
    with cuda_sim.emulated_device(static_smem=1024):
        with pytest.raises(RuntimeError, match=r"MaxDynamicSharedMemorySize, 231425\) fails"):
            selftest("smem_attribute_over_limit", 1, 1)


def test_block_over_1024_threads_is_refused():
    with pytest.raises(RuntimeError, match=r"refused \(invalid configuration argument\): block \(1025, 1, 1\)"):
        selftest("block_sum", 1, 1025)


def test_emulated_device_and_plan():
    """The planner reads the emulated limits: fewer SMs, more rows per block; a smaller
    opt-in limit, the stepwise path; the launch it makes is the one the log shows."""
    assert cuda_sim.device() == cuda_sim.SM90
    assert cuda_sim.plan(200, 128, torch.float32, True).rows == 2  # 132 SMs
    with cuda_sim.emulated_device(sms=10):
        assert cuda_sim.plan(200, 128, torch.float32, True).rows == 8  # 1024 threads / 128
        assert cuda_sim.plan(200, 128, torch.float32, False).rows == 4  # 512 threads
    with cuda_sim.emulated_device(**cuda_sim.SM80):
        assert cuda_sim.plan(1, 143, torch.float64, True).rows == 1
        assert cuda_sim.plan(1, 144, torch.float64, True).rows == 0
    assert cuda_sim.device() == cuda_sim.SM90  # restored
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    cuda_sim.clear_launches()
    with cuda_sim.emulated_device(sms=2):
        srnn_fast.srnn_scan(x, torch.randn(40, 40, dtype=torch.float64) / 7, torch.full((40,), 20.0, dtype=x.dtype),
                            torch.full((40,), 150.0, dtype=x.dtype), backend="cuda_sim")
        plan = cuda_sim.plan(5, 40, torch.float64, True)
    (launch,) = cuda_sim.launches()  # inference: the forward kernel only, once per schedule
    assert launch == ("fwd_persistent_kernel<double, double>", (plan.grid, 1, 1), (64, plan.rows, 1), plan.smem, 2)
    assert plan.rows == 3 and plan.grid == 2  # B = 5 is not a multiple of the rows per block


def test_schedule_names_are_checked():
    with pytest.raises(RuntimeError, match=r"a schedule is 'ascending', 'reversed' or 'shuffled:SEED'"):
        with cuda_sim.schedules("backwards"):
            pass
    with pytest.raises(ValueError, match="sms >= 1"):
        with cuda_sim.emulated_device(sms=0):
            pass


def test_a_test_backend_only():
    """Never picked by "auto", not among the backends a user is offered (nor the speed
    benchmark, which takes its list from there), named by show_config()."""
    assert resolve_backend("auto", torch.device("cpu")) != "cuda_sim"
    assert resolve_backend("cuda_sim", torch.device("cpu")) == "cuda_sim"
    assert "cuda_sim" not in srnn_fast.available_backends()
    assert "backend 'cuda_sim'" in srnn_fast.show_config(quiet=True)


def test_unbuilt_harness_says_how(monkeypatch):
    monkeypatch.setattr(cuda_sim, "_cuda_sim", None)
    monkeypatch.setattr(cuda_sim, "SIM_ERROR", "ImportError: no module named srnn_fast._cuda_sim")
    with pytest.raises(BackendUnavailableError, match=r"'cuda_sim' is not built .* pip install -e \."):
        resolve_backend("cuda_sim", torch.device("cpu"))
    assert "not built" in cuda_sim.describe()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA tensor")
def test_cuda_tensors_are_refused():
    x = torch.randn(2, 1, 3, device="cuda")
    with pytest.raises(ValueError, match="backend 'cuda_sim' runs on cpu tensors"):
        srnn_fast.srnn_scan(x, torch.eye(3, device="cuda"), torch.ones(3, device="cuda"), torch.ones(3, device="cuda"),
                            backend="cuda_sim")


def _scan_case(T, B, H, seed, **kw):
    from scan_cases import check_float64, fused, make_case, reference

    inputs, upstream = make_case(T, B, H, torch.float64, "cpu", seed)
    check_float64(fused(inputs, upstream, "cuda_sim", **kw), reference(inputs, upstream, **kw))


@pytest.mark.parametrize("H", [37, 200], ids=["persistent", "stepwise"])
def test_scan_identical_under_shuffled_schedules(H):
    """Four thread orders between barriers (two shuffles) give the same bits, several rows
    per block included (5 SMs for 13 rows: 3 rows a block, the last with 1)."""
    with cuda_sim.emulated_device(sms=5), cuda_sim.schedules("ascending", "reversed", "shuffled:1", "shuffled:2"):
        _scan_case(6, 13, H, seed=3, neuron="relu" if H == 200 else "adaptive")


def test_a100_limits_take_the_stepwise_path_earlier():
    """H 150 in float64 fits an H100 block's shared memory, not an A100's: the same call
    takes the persistent path on one emulated device and the stepwise path on the other,
    both exact."""
    for limits, kernel in ((cuda_sim.SM90, "fwd_persistent_kernel"), (cuda_sim.SM80, "fwd_step_kernel")):
        cuda_sim.clear_launches()
        with cuda_sim.emulated_device(**limits):
            _scan_case(5, 3, 150, seed=4)
        assert kernel in {launch.kernel.split("<")[0] for launch in cuda_sim.launches()}
