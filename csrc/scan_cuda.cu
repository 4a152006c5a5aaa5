// CUDA kernels of the fused SRNN scan: srnn_fast::scan_fwd / scan_bwd for CUDA tensors.
// Contract (shapes, what is saved): srnn_fast/scan.py; neuron math: srnn_neuron.h. The kernels
// live in scan_cuda_kernels.cuh, their launches in scan_cuda_host.h and the planning in
// cuda_plan.h, so that sim/cuda_sim.cpp runs the same code on the CPU (backend "cuda_sim").
//
// Two paths, chosen on the host from the device's shared-memory limit:
//  * persistent (W_rec fits in one block's shared memory): one block per tile of `rows`
//    batch rows, one thread per (row, neuron), W_rec (forward: W^T) resident in shared
//    memory, the loop over all T inside the kernel. Batch rows are independent, so blocks
//    never synchronise with each other. Forward: spikes are exchanged as ballot bit masks
//    and the recurrent input is a sum over the W^T rows of the neurons that spiked;
//    "relu" (and the first step, whose s_0 is user state and may be non-binary) takes the
//    dense sum. Backward: dI_t is exchanged through shared memory and W^T dI_t is dense.
//    On sm_90 (227 KB a block) that is H <= 240 in float32, H <= 169 in float64; on sm_80
//    (163 KB) 203 and 143 (`python -m srnn_fast.cuda_resources` checks every H, no GPU).
//  * stepwise (any H): per step one GEMM on the current stream (at::mm, which follows
//    torch's matmul precision settings) for the recurrent term, plus one fused elementwise
//    kernel for the neuron update.
// Per-neuron gradients (alpha, rho) are summed per thread over t, per block over rows in a
// fixed order, then over blocks in a fixed order: deterministic for any grid size.
//
// Rounding: setup.py compiles this file with --fmad=false, so a*b+c is not contracted
// into an FMA and every expression rounds like the reference's separate tensor ops (float64
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda_plan.h"
#include "scan_cuda_host.h"

namespace srnn {
namespace {

// The persistent kernels' launch plan without a GPU, for srnn_fast/cuda_resources.py: rows per
// block, threads per block and dynamic shared memory (bytes) for B rows of H neurons in
// float32 / float64, given the dynamic shared memory a block may request and the number of
// multiprocessors. Rows 0: the stepwise path.
std::tuple<int64_t, int64_t, int64_t> cuda_launch_plan(int64_t B, int64_t H, bool double_precision, bool forward,
                                                       int64_t max_smem, int64_t sms) {
  TORCH_CHECK(B >= 1 && H >= 1 && B <= std::numeric_limits<int>::max() && H <= std::numeric_limits<int>::max() / 32,
              "srnn_fast: cuda_launch_plan needs 1 <= B, H < 2^31; got B = ", B, ", H = ", H);
  TORCH_CHECK(max_smem >= 0 && max_smem <= std::numeric_limits<int>::max() && sms >= 1 &&
                  sms <= std::numeric_limits<int>::max(),
              "srnn_fast: cuda_launch_plan needs max_smem >= 0 and sms >= 1; got ", max_smem, ", ", sms);
  const gpu::DeviceLimits info{static_cast<int>(max_smem), static_cast<int>(sms)};
  const size_t elem = double_precision ? sizeof(double) : sizeof(float);
  const int b = static_cast<int>(B), h = static_cast<int>(H);
  const ScanPlan plan = forward ? plan_forward(b, h, elem, info) : plan_backward(b, h, elem, info);
  if (!plan.persistent()) return {0, 0, 0};
  return {plan.rows, static_cast<int64_t>(plan.rows) * plan.block_x, static_cast<int64_t>(plan.smem)};
}

}  // namespace
}  // namespace srnn

// Only in CUDA builds: the schema lives with its one implementation (no tensors, so it runs
// on any machine, GPU or not).
TORCH_LIBRARY_FRAGMENT(srnn_fast, m) {
  m.def("cuda_launch_plan(int B, int H, bool double_precision, bool forward, int max_smem, int sms) -> (int, int, int)",
        &srnn::cuda_launch_plan);
}

TORCH_LIBRARY_IMPL(srnn_fast, CUDA, m) {
  m.impl("scan_fwd", &srnn::scan_fwd_gpu);
  m.impl("scan_bwd", &srnn::scan_bwd_gpu);
}
