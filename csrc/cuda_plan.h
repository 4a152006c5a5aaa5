// Launch planning of the CUDA scan (scan_cuda_host.h): which path, how many batch rows per
// block, the grid sizes and the dynamic shared memory, from the limits the device reports.
// Plain C++: the CUDA glue, the harness (cuda_sim) and the resource check
// (srnn_fast::cuda_launch_plan, python -m srnn_fast.cuda_resources) all plan with it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "gpu_compat.h"
#include "srnn_neuron.h"

namespace srnn {

constexpr int kFwdThreads = 1024;  // per block, persistent forward
constexpr int kBwdThreads = 512;   // persistent backward: 128 registers a thread, no spills in float64
constexpr int kElemThreads = 256;

SRNN_HD int round_up32(int h) { return (h + 31) / 32 * 32; }

inline int blocks_for(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

// Persistent forward: W^T [H, H], s values [2, rows, H], spike words [2, rows, Hp/32].
inline size_t fwd_smem_bytes(int H, int rows, size_t elem) {
  const int nw = round_up32(H) / 32;
  return (static_cast<size_t>(H) * H + 2 * static_cast<size_t>(rows) * H) * elem + 2 * static_cast<size_t>(rows) * nw * 4;
}

// Persistent backward: W [H, H], dI [2, rows, H].
inline size_t bwd_smem_bytes(int H, int rows, size_t elem) {
  return (static_cast<size_t>(H) * H + 2 * static_cast<size_t>(rows) * H) * elem;
}

// Rows per block of a persistent kernel, or 0 when W_rec does not fit (stepwise path).
// Enough rows per block to cover B with about one block per SM (each block then keeps its
// own copy of W resident), within max_threads and the shared-memory limit.
template <typename SmemFn>
int persistent_rows(int B, int H, size_t elem, int max_threads, const gpu::DeviceLimits& info, SmemFn smem_bytes) {
  const int Hp = round_up32(H);
  if (Hp > max_threads || smem_bytes(H, 1, elem) > static_cast<size_t>(info.max_smem)) return 0;
  int rows = std::max(1, (B + info.sms - 1) / info.sms);
  rows = std::min(rows, max_threads / Hp);
  while (rows > 1 && smem_bytes(H, rows, elem) > static_cast<size_t>(info.max_smem)) --rows;
  return rows;
}

// One direction of a scan of B rows of H neurons.
struct ScanPlan {
  int rows;     // batch rows per block of the persistent kernel; 0: the stepwise path
  int grid;     // persistent: blocks, one per tile of rows; stepwise: blocks of the per-step kernels
  int block_x;  // persistent: threads per row (round_up32(H)), block (block_x, rows); stepwise: kElemThreads
  size_t smem;  // dynamic shared memory of a persistent block, bytes (0 stepwise)
  int reduce_grid;  // blocks of the tau-gradient reduction (backward)
  bool persistent() const { return rows > 0; }
};

// Forward. Stepwise threads map to (b, i) with rows padded to round_up32(H), so that a
// warp never straddles two rows (its ballot is one row's spike word).
inline ScanPlan plan_forward(int B, int H, size_t elem, const gpu::DeviceLimits& info) {
  const int rows = persistent_rows(B, H, elem, kFwdThreads, info, fwd_smem_bytes);
  if (rows > 0) return ScanPlan{rows, blocks_for(B, rows), round_up32(H), fwd_smem_bytes(H, rows, elem), 0};
  return ScanPlan{0, blocks_for(static_cast<int64_t>(B) * round_up32(H), kElemThreads), kElemThreads, 0, 0};
}

inline ScanPlan plan_backward(int B, int H, size_t elem, const gpu::DeviceLimits& info) {
  const int rows = persistent_rows(B, H, elem, kBwdThreads, info, bwd_smem_bytes);
  const int reduce_grid = blocks_for(H, kElemThreads);
  if (rows > 0)
    return ScanPlan{rows, blocks_for(B, rows), round_up32(H), bwd_smem_bytes(H, rows, elem), reduce_grid};
  return ScanPlan{0, blocks_for(static_cast<int64_t>(B) * H, kElemThreads), kElemThreads, 0, reduce_grid};
}

}  // namespace srnn
