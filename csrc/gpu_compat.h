// The one portability header of the CUDA code (scan_cuda_kernels.cuh, scan_cuda_host.h):
// compiled by nvcc it is CUDA itself (the device code compiles exactly as it would alone);
// compiled by the host C++ compiler it maps every CUDA construct those files use onto the
// execution harness of csrc/sim (srnn_fast._cuda_sim, backend "cuda_sim").
//
// What the CUDA code may use, and nothing else: __global__ / __device__ / __host__ /
// __forceinline__ / __launch_bounds__ / __restrict__, threadIdx / blockIdx / blockDim /
// gridDim, __syncthreads, __ballot_sync, __ffs, SRNN_DYNAMIC_SMEM(name) for the dynamic
// shared memory, and srnn::gpu:: for the host side (tensor device, device guard, device
// limits, the shared-memory attribute, launch). Include it after the ATen headers.
#pragma once

#include <c10/core/Device.h>

#include <cstddef>

namespace srnn {
namespace gpu {

// What the planner reads from the device (cuda_plan.h).
struct DeviceLimits {
  int max_smem;  // dynamic shared memory one block of the kernel may request: opt-in limit less static
  int sms;
};

}  // namespace gpu
}  // namespace srnn

#if defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>

#define SRNN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

namespace srnn {
namespace gpu {

constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
constexpr const char* kKernelsName = "the CUDA kernels";
using DeviceGuard = c10::cuda::CUDAGuard;

// The opt-in shared memory per block less the kernel's static shared memory: their sum may
// not exceed the opt-in limit (cudaFuncSetAttribute fails otherwise).
template <auto Kernel>
DeviceLimits device_limits(int device) {
  DeviceLimits info{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
  info.max_smem -= static_cast<int>(attr.sharedSizeBytes);
  return info;
}

template <auto Kernel>
void allow_dynamic_smem(size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Kernel<<<grid, block, smem>>>(args...) on the current stream.
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, Args&&... args) {
  Kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gpu
}  // namespace srnn

#else  // host compiler: the harness

#include "sim/harness.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::srnn::sim::current().thread_idx)
#define blockIdx (::srnn::sim::current().block_idx)
#define blockDim (::srnn::sim::current().block_dim)
#define gridDim (::srnn::sim::current().grid_dim)
#define SRNN_DYNAMIC_SMEM(name) unsigned char* name = ::srnn::sim::current().smem

inline void __syncthreads() { ::srnn::sim::syncthreads(); }
inline unsigned __ballot_sync(unsigned mask, bool pred) { return ::srnn::sim::ballot_sync(mask, pred); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

namespace srnn {
namespace gpu {

// The CUDA path on CPU tensors.
constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
constexpr const char* kKernelsName = "cuda_sim (the CUDA kernels run by the CPU harness)";
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};

template <auto Kernel>
DeviceLimits device_limits(int) {
  const sim::Device& d = sim::device();
  return DeviceLimits{d.smem_optin - d.static_smem, d.sms};
}

template <auto Kernel>
void allow_dynamic_smem(size_t bytes) {
  sim::set_max_dynamic_smem(reinterpret_cast<const void*>(Kernel), sim::kernel_name<Kernel>(), bytes);
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, Args&&... args) {
  sim::launch_impl<Kernel>(Kernel, grid, block, smem, std::forward<Args>(args)...);
}

}  // namespace gpu
}  // namespace srnn

#endif
