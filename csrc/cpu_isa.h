// The instruction sets the CPU kernels are built for, and the choice among them at run time.
//
// One source per op: each kernel is a struct with `template <Isa ISA> static void run(...)`,
// written against IsaTraits<ISA> (vector width, register blocking), and compiled once per
// instruction set by the run_* wrappers below, which carry the target attribute and inline
// (flatten) the whole kernel into themselves. run_kernel() calls the build of the chosen
// set. The choice (active_isa, cpu_isa.cpp) is made once from the CPU's features and can be
// forced lower with SRNN_FAST_CPU_CAPABILITY=avx512|avx2|default, as ATen's
// ATEN_CPU_CAPABILITY does. Off x86-64 only the portable build exists.
//
// Every build computes the same sums in the same order (width and blocking change which
// lanes and rows are done together, never the order of the terms of one sum), and
// -ffp-contract=off holds in all of them: results are bitwise equal across builds.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (SSE: every x86-64 CPU)
#endif

namespace srnn {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// kVecBytes: the vector width. kWtChunks: vectors per row in the W^T dI accumulation, which
// keeps kRowBlock x kWtChunks accumulators plus kWtChunks loaded W vectors and a broadcast in
// registers: 4 x 4 + 4 + 1 = 21 of AVX-512's 32 zmm, 4 x 2 + 2 + 1 = 11 of the 16 ymm / xmm of
// AVX2 and SSE2 (and of NEON's 32). kSumChunks: accumulators of the row sums (8 + 2 live).
template <Isa ISA> struct IsaTraits;
template <> struct IsaTraits<Isa::kDefault> {
  static constexpr int kVecBytes = 16, kWtChunks = 2, kSumChunks = 8;
};
template <> struct IsaTraits<Isa::kAvx2> {
  static constexpr int kVecBytes = 32, kWtChunks = 2, kSumChunks = 8;
};
template <> struct IsaTraits<Isa::kAvx512> {
  static constexpr int kVecBytes = 64, kWtChunks = 4, kSumChunks = 8;
};

// Batch rows a backward kernel runs in lockstep (each W row read serves all of them). The
// same for every build: the per-block partial sums, and so the results, do not depend on it.
constexpr int kRowBlock = 4;
// Batch rows a forward kernel runs in lockstep: their rows of each step are adjacent in the
// [T, B, *] tensors, so one prefetch run (and one page) serves them all.
constexpr int kFwdRowBlock = 8;

const char* isa_name(Isa isa);
// The build that runs; raises (c10::Error) when SRNN_FAST_CPU_CAPABILITY is invalid or asks
// for an instruction set this CPU lacks. Call it on the host side, outside parallel regions.
Isa active_isa();
// The builds this CPU can run, best first.
std::vector<Isa> supported_isas();
// Forces the build (tests, benchmarks); raises if this CPU cannot run it.
void set_active_isa(const std::string& name);

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SRNN_X86_ISAS 1
// x86-64-v3 and x86-64-v4 as feature lists (the same names active_isa checks at run time).
#define SRNN_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt,avx,sse4.2"), flatten, noinline))
#define SRNN_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2,popcnt,avx,sse4.2"), flatten, noinline))
#else
#define SRNN_X86_ISAS 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#define SRNN_TARGET_DEFAULT __attribute__((flatten, noinline))
#else
#define SRNN_TARGET_DEFAULT
#endif

template <typename Kernel, typename... Args>
SRNN_TARGET_DEFAULT void run_default(const Args&... args) {
  Kernel::template run<Isa::kDefault>(args...);
}
#if SRNN_X86_ISAS
template <typename Kernel, typename... Args>
SRNN_TARGET_AVX2 void run_avx2(const Args&... args) {
  Kernel::template run<Isa::kAvx2>(args...);
}
template <typename Kernel, typename... Args>
SRNN_TARGET_AVX512 void run_avx512(const Args&... args) {
  Kernel::template run<Isa::kAvx512>(args...);
}
#endif

// Subnormal float32 numbers (below 1.18e-38) count as zero while a float32 kernel runs: its
// results are flushed to zero (FTZ) and its operands read as zero (DAZ), in the calling thread,
// and the thread's mode is restored afterwards. Why: on Intel CPUs an operation with a subnormal
// operand or result takes a microcode assist of ~100 cycles, and a trained network's backward is
// full of them (Gaussian surrogate gradients of neurons far from threshold, gradients decayed
// over hundreds of steps): the S-MNIST 40-256-128 backward ran 7x slower than with them flushed
// (1.42 s vs 0.20 s CPU for a batch of 50, Xeon with AVX-512; Zen CPUs take no such penalty).
// Values that small are far below the float32 tolerances against the reference. Float64
// kernels keep IEEE subnormals, so the exact float64 comparisons hold unchanged.
class FlushSubnormals {
 public:
  explicit FlushSubnormals(bool on) : on_(on) {
    if (!on_) return;
#if defined(__x86_64__) || defined(__i386__)
    saved_ = _mm_getcsr();
    _mm_setcsr(unsigned(saved_) | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#elif defined(__aarch64__)
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved_));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_ | (uint64_t(1) << 24)));  // FZ: inputs and results
#endif
  }
  ~FlushSubnormals() {
    if (!on_) return;
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(unsigned(saved_));
#elif defined(__aarch64__)
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved_));
#endif
  }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;

 private:
  bool on_;
  uint64_t saved_ = 0;
};

// Kernel's build for ISA, called from inside another kernel's build of that ISA as a function
// of its own (run_* are noinline, so the caller's flatten stops there). For the dense products
// of the layer kernels: flattened into the kernel that runs the neuron loops, they made GCC
// leave those loops (then `omp simd`) scalar: the S-MNIST and ECG backward ran up to 2x slower.
template <Isa ISA, typename Kernel, typename... Args>
inline void run_build(const Args&... args) {
#if SRNN_X86_ISAS
  if constexpr (ISA == Isa::kAvx512) return run_avx512<Kernel>(args...);
  if constexpr (ISA == Isa::kAvx2) return run_avx2<Kernel>(args...);
#endif
  if constexpr (ISA == Isa::kDefault) run_default<Kernel>(args...);
}

// The base of every CPU kernel over element type T: whether run_kernel flushes subnormals.
template <typename T>
struct CpuKernel {
  static constexpr bool kFlushSubnormals = std::is_same_v<T, float>;
};

// Runs Kernel's build for `isa` (from active_isa(), read once per op call on the host side),
// with subnormals flushed for a float32 kernel (FlushSubnormals).
template <typename Kernel, typename... Args>
void run_kernel(Isa isa, const Args&... args) {
  const FlushSubnormals flush(Kernel::kFlushSubnormals);
#if SRNN_X86_ISAS
  if (isa == Isa::kAvx512) return run_avx512<Kernel>(args...);
  if (isa == Isa::kAvx2) return run_avx2<Kernel>(args...);
#endif
  run_default<Kernel>(args...);
}

}  // namespace srnn
