// Small kernels with known defects (and one without), written in the CUDA dialect of
// gpu_compat.h, that tests/test_cuda_sim.py runs through the harness to show it reports each
// kind of fault it claims to (srnn_fast._cuda_sim.selftest). Never part of a real build.
#pragma once

#include "../gpu_compat.h"

namespace srnn {
namespace selftest {

// Correct: out[b] = sum of the block's thread ids, through shared memory and a barrier.
__global__ void block_sum(double* out) {
  SRNN_DYNAMIC_SMEM(smem);
  double* v = reinterpret_cast<double*>(smem);
  v[threadIdx.x] = threadIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += v[i];
    out[blockIdx.x] = s;
  }
}

// Defect: no barrier between the writes and the reads of a neighbour's slot.
__global__ void missing_barrier(double* out) {
  SRNN_DYNAMIC_SMEM(smem);
  double* v = reinterpret_cast<double*>(smem);
  v[threadIdx.x] = threadIdx.x + 1;
  out[blockIdx.x * blockDim.x + threadIdx.x] = v[(threadIdx.x + 1) % blockDim.x];
}

// Defect: reads a slot nobody wrote (thread blockDim.x - 1 reads past the written ones).
__global__ void read_before_write(double* out) {
  SRNN_DYNAMIC_SMEM(smem);
  double* v = reinterpret_cast<double*>(smem);
  if (threadIdx.x + 1 < blockDim.x) v[threadIdx.x] = 1.0;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = v[threadIdx.x];
}

// Defect: thread 3 of block 1 leaves before the barrier the others wait at.
__global__ void exit_before_barrier(double* out) {
  if (blockIdx.x == 1 && threadIdx.x == 3) return;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.0;
}

// Defect: lane 5 skips a full-mask ballot.
__global__ void ballot_lane_missing(double* out) {
  unsigned m = 0;
  if (threadIdx.x != 5) m = __ballot_sync(0xffffffffu, threadIdx.x % 2 == 0);
  out[threadIdx.x] = m;
}

// Defect: a mask that leaves out the calling lane.
__global__ void ballot_mask_without_caller(double* out) {
  out[threadIdx.x] = __ballot_sync(0x1u, true);
}

// Correct: every lane's ballot, per warp (a 40-thread block: one full and one partial warp).
__global__ void ballot_words(double* out) {
  const unsigned lanes = blockDim.x - threadIdx.x / 32 * 32 < 32 ? blockDim.x % 32 : 32;
  const unsigned mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  out[threadIdx.x] = __ballot_sync(mask, threadIdx.x % 3 == 0);
}

}  // namespace selftest
}  // namespace srnn
