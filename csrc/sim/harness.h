// The CUDA execution harness: runs a kernel launch of csrc/scan_cuda_kernels.cuh on the CPU,
// thread by thread, for srnn_fast._cuda_sim (backend "cuda_sim", used by the tests only).
//
// Model (in the spirit of numba's CUDA simulator): every CUDA thread of a block is a fiber
// (ucontext) with its own stack; the blocks of a grid run one after another. A thread runs
// until it reaches a barrier (__syncthreads: the block; a warp intrinsic: the lanes of its
// mask) or leaves the kernel; the scheduler then runs the next runnable thread in the order
// of the current schedule (ascending, reversed or shuffled thread ids, drawn anew after
// every block barrier). Memory is sequentially consistent: a race shows up as a result that
// depends on the schedule, which the callers check by running every op under several.
//
// What it refuses or reports, as the CUDA runtime would or should, naming kernel, block and
// thread: a launch configuration the device cannot take, dynamic shared memory above the
// kernel's attribute (48 KiB unless raised) or an attribute above the emulated opt-in limit,
// a thread that leaves the kernel while others wait at __syncthreads, a warp intrinsic that
// a lane of its mask never reaches (it left, or waits at another barrier), a mask without
// the calling lane or with lanes the warp does not have. Dynamic shared memory is allocated
// at exactly the requested bytes and filled with 0xff bytes (NaN as float and double, all
// bits set as integers) before each block, so a read before a write reaches the outputs.
//
// Host code only; Linux/glibc (ucontext; on x86-64 a few lines of assembly switch stacks). Not thread-safe across concurrent launches: one
// launch at a time per process (the ops run on the calling thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// CUDA's built-in vector types, for host code (global names, as in CUDA).
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace srnn {
namespace sim {

// What the emulated device reports (defaults: an H100 SXM, sm_90), settable by the tests.
struct Device {
  int sms = 132;
  int smem_optin = 232448;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int static_smem = 0;      // cudaFuncAttributes::sharedSizeBytes of every kernel
};
Device& device();

// Thread orders between barriers.
enum class Order { kAscending, kReversed, kShuffled };
struct Schedule {
  Order order = Order::kAscending;
  uint64_t seed = 0;  // kShuffled
  std::string name() const;
};
void set_schedule(const Schedule& s);
const Schedule& schedule();

// One line per distinct launch configuration: how often it ran.
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t smem;
  int64_t count;
};
std::vector<LaunchRecord>& launch_log();

// Per-kernel cudaFuncAttributeMaxDynamicSharedMemorySize (default 48 KiB).
void set_max_dynamic_smem(const void* kernel, const std::string& name, size_t bytes);

// The state the intrinsics of the running CUDA thread read.
struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  unsigned char* smem;
};
ThreadState& current();  // only valid inside a kernel

void syncthreads();
unsigned ballot_sync(unsigned mask, bool pred);

// Runs body() as every thread of every block of the launch; throws c10::Error on a refused
// launch or a detected fault.
void run_launch(const void* kernel, const std::string& name, dim3 grid, dim3 block, size_t smem,
                const std::function<void()>& body);

// "fwd_step_kernel<double, double>" from the kernel's function template argument.
std::string kernel_name_from(const char* pretty_function);

template <auto Kernel>
const std::string& kernel_name() {
  static const std::string name = kernel_name_from(__PRETTY_FUNCTION__);
  return name;
}

// kernel<<<grid, block, smem>>>(args...): the arguments convert to the kernel's parameter
// types first, as in a real launch.
template <auto Kernel, typename... Params, typename... Args>
void launch_impl(void (*)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  std::tuple<Params...> params(std::forward<Args>(args)...);
  run_launch(reinterpret_cast<const void*>(Kernel), kernel_name<Kernel>(), grid, block, smem,
             [&params] { std::apply(Kernel, params); });
}

}  // namespace sim
}  // namespace srnn
