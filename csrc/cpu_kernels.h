// CPU-side helpers shared by the fused scan ops (scan_cpu.cpp) and the fused layer ops
// (layer_cpu.cpp): output allocation, decay checks, the vectorizable exp, W-row padding,
// spike bit packing, and the per-step pieces of the forward and backward recurrences.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu_isa.h"
#include "srnn_neuron.h"

#if SRNN_X86_ISAS
#include <immintrin.h>  // Madd's FMA intrinsics, called only from code built for AVX2 / AVX-512
#endif
#if defined(__linux__)
#include <sys/mman.h>  // madvise (advise_huge_pages)
#endif

#define SRNN_INLINE inline __attribute__((always_inline))

namespace srnn {
namespace {

// Tensors of MBs (the [T, B, H] outputs, the default build's x_proj and dI scratch, the per-block
// dW partials) are fresh memory from mmap on every call (glibc maps large requests): each 4 KB
// page faults and is zeroed at its first touch, and the kernels, which walk them one step
// (B x H values) at a time, miss the TLB on nearly every row they touch. With transparent huge pages (Linux, THP mode
// "madvise" or "always") that is one fault and one TLB entry per 2 MB: the S-MNIST stack's
// forward took about a third less time (bench/RESULTS.md, issue 47). Best effort: where THP is
// off, or off Linux, nothing changes. Call it before the memory is first touched.
constexpr int64_t kHugePageMinBytes = int64_t(2) << 20;

void advise_huge_pages(const at::Tensor& t) {  // for tensors of kHugePageMinBytes and more
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (int64_t(t.nbytes()) < kHugePageMinBytes) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  advise_huge_pages(t);  // before the first touch, which poisoning may be
  return poisoned(t);
}

// alpha and rho come from exp(-dt / tau) in Python; a NaN/inf tau or an alpha of 1 (tau too
// large for the dtype) would silently poison the gradients, so refuse them here. alpha = 1
// also breaks the dL/dalpha identity (division by 1 - alpha, see srnn_neuron.h).
template <typename T>
void check_decay_values(const at::Tensor& t, const char* name, const char* tau, bool allow_one) {
  const T* p = t.data_ptr<T>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const bool ok = std::isfinite(p[i]) && p[i] >= T(0) && (allow_one ? p[i] <= T(1) : p[i] < T(1));
    TORCH_CHECK(ok, "srnn_fast: ", name, " = exp(-dt / ", tau, ") must be finite and in [0, ",
                allow_one ? "1]" : "1)", " for every neuron; ", name, "[", i, "] = ", double(p[i]),
                " (is ", tau, "[", i, "] non-finite, <= 0 or too large for the dtype?)");
  }
}

template <typename To, typename From>
SRNN_INLINE To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between types of one size");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}

// The lane type of V (V itself for a scalar, the element type for a vector), and the signed
// integer of the same shape (int32 / int64 lanes).
template <typename V, typename = void>
struct LaneOf {
  using type = V;
};
template <typename V>
struct LaneOf<V, std::void_t<decltype(std::declval<V>()[0])>> {
  using type = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;
};
template <typename T> struct LaneInt;
template <> struct LaneInt<float> { using type = int32_t; };
template <> struct LaneInt<double> { using type = int64_t; };
template <typename V, bool = std::is_arithmetic_v<V>>
struct IntOf {
  using type = typename LaneInt<V>::type;
};
template <typename V>
struct IntOf<V, false> {
  typedef typename LaneInt<typename LaneOf<V>::type>::type type __attribute__((vector_size(sizeof(V))));
};

// exp(x) for x <= 0 (the surrogate's Gaussians) in plain arithmetic, unlike a libm call: x =
// n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of ln2), exp(r) by its Taylor series (to
// r^13 for double, r^7 for float: truncation below half an ulp), times 2^n built in the
// exponent bits. Within a few ulp of libm's exp. Below exp(-708) (double) / exp(-87) (float)
// it returns 0 where libm gives a subnormal or 0. V is a scalar or a vector (GCC/Clang vector
// extensions): the same operations lane by lane, so both round alike.
struct SimdExp {
  template <typename V>
  SRNN_INLINE V operator()(V x) const {
    using T = typename LaneOf<V>::type;
    using VI = typename IntOf<V>::type;
    const V zero{};
    if constexpr (std::is_same_v<T, double>) {
      const V lo = zero - 708.0, shifter = zero + 0x1.8p52;  // adding it rounds x log2(e) to an integer n
      const V xc = x < lo ? lo : x;
      const V t = xc * 1.4426950408889634 + shifter;
      const V n = t - shifter;
      const V r = (xc - n * 0x1.62e42fee00000p-1) - n * 0x1.a39ef35793c76p-33;
      V q = zero + 1.0 / 6227020800.0;
      q = q * r + 1.0 / 479001600.0;
      q = q * r + 1.0 / 39916800.0;
      q = q * r + 1.0 / 3628800.0;
      q = q * r + 1.0 / 362880.0;
      q = q * r + 1.0 / 40320.0;
      q = q * r + 1.0 / 5040.0;
      q = q * r + 1.0 / 720.0;
      q = q * r + 1.0 / 120.0;
      q = q * r + 1.0 / 24.0;
      q = q * r + 1.0 / 6.0;
      q = q * r + 0.5;
      q = q * r + 1.0;
      q = q * r + 1.0;
      const VI k = bits_as<VI>(t) - bits_as<VI>(shifter);  // n as an integer, >= -1022
      const V scale = bits_as<V>(VI(k + 1023) << 52);
      return x < lo ? zero : q * scale;
    } else {
      const V lo = zero - 87.0f, shifter = zero + 0x1.8p23f;
      const V xc = x < lo ? lo : x;
      const V t = xc * 1.44269504f + shifter;
      const V n = t - shifter;
      const V r = (xc - n * 0x1.62e4p-1f) - n * 0x1.7f7d1cp-20f;
      V q = zero + 1.0f / 5040.0f;
      q = q * r + 1.0f / 720.0f;
      q = q * r + 1.0f / 120.0f;
      q = q * r + 1.0f / 24.0f;
      q = q * r + 1.0f / 6.0f;
      q = q * r + 0.5f;
      q = q * r + 1.0f;
      q = q * r + 1.0f;
      const VI k = bits_as<VI>(t) - bits_as<VI>(shifter);  // >= -126
      const V scale = bits_as<V>(VI(k + 127) << 23);
      return x < lo ? zero : q * scale;
    }
  }
};

// Rows of one batch entry at consecutive steps lie B * H apart in [T, B, H] tensors, too far
// for the hardware prefetcher: without this, every step of the scan waits on a cache miss.
constexpr int64_t kPrefetchSteps = 8;

template <bool WRITE = false>
SRNN_INLINE void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(c + k, WRITE ? 1 : 0);
}

// Row length of W copies, padded to whole 64-byte vectors so the W-row loops have no
// scalar remainder (the padding is zeros and never reaches an output).
int64_t padded(int64_t H, int64_t elem_bytes) {
  const int64_t lanes = 64 / elem_bytes;
  return (H + lanes - 1) / lanes * lanes;
}

// Per-neuron constants as separate arrays, so the per-step neuron loops vectorize.
template <typename T>
struct Neurons {
  std::vector<T> alpha, rho, in_gain, one_m_rho, one_m_alpha;
  Neurons(const T* a, const T* r, T r_m, int64_t H)
      : alpha(H), rho(H), in_gain(H), one_m_rho(H), one_m_alpha(H) {
    for (int64_t i = 0; i < H; ++i) {
      const Decay<T> d = make_decay(a[i], r[i], r_m);
      alpha[i] = d.alpha, rho[i] = d.rho, in_gain[i] = d.in_gain;
      one_m_rho[i] = d.one_m_rho, one_m_alpha[i] = d.one_m_alpha;
    }
  }
};


// Vectors of one build (GCC/Clang vector extensions: SSE2 / NEON, AVX2, AVX-512 registers
// by IsaTraits<ISA>::kVecBytes). Explicit vectors keep accumulators in registers where the
// auto-vectorizer would unroll-and-jam the row loops into scalar code.
template <Isa ISA, typename T>
struct Simd {
  static constexpr int kBytes = IsaTraits<ISA>::kVecBytes;
  static constexpr int64_t L = kBytes / int64_t(sizeof(T));  // lanes
  typedef T V __attribute__((vector_size(kBytes)));
  static SRNN_INLINE V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static SRNN_INLINE void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};

// a * b + c for the vectors of one build: fused (one rounding) where the build has FMA, for
// the linear-algebra sums only (W^T dI, the projection over real-valued inputs, the dW
// updates), never for the neuron math, which rounds like the reference's separate ops. So
// the avx2 and avx512 builds give bitwise the same results, and the default build's
// gradients differ from theirs in the last bits.
template <Isa ISA, typename V>
struct Madd {
  static SRNN_INLINE V run(V a, V b, V c) { return a * b + c; }
};
#if SRNN_X86_ISAS
template <typename V>
struct Madd<Isa::kAvx2, V> {
  __attribute__((target("avx2,fma"))) static inline V run(V a, V b, V c) {  // inlined by run_avx2 (flatten)
    if constexpr (std::is_same_v<typename LaneOf<V>::type, float>)
      return V(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
    else
      return V(_mm256_fmadd_pd(__m256d(a), __m256d(b), __m256d(c)));
  }
};
template <typename V>
struct Madd<Isa::kAvx512, V> {
  __attribute__((target("avx512f"))) static inline V run(V a, V b, V c) {  // inlined by run_avx512
    if constexpr (std::is_same_v<typename LaneOf<V>::type, float>)
      return V(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(c)));
    else
      return V(_mm512_fmadd_pd(__m512d(a), __m512d(b), __m512d(c)));
  }
};
#endif
template <Isa ISA, typename V>
SRNN_INLINE V madd(V a, V b, V c) {
  return Madd<ISA, V>::run(a, b, c);
}

// A vector of one build with every lane x: lane 0 shuffled into all lanes (a loop over the
// lanes compiled to lane inserts; V{} + x to an add that must stay, since -0 + 0 is +0). On
// x86 the set1 intrinsic, one broadcast straight from memory: the shuffle left a masked load
// and a register broadcast (AVX-512) or four instructions (AVX2) in the W^T dI loop, where a
// splat per row and W row is the only work besides the FMAs.
template <typename V, std::size_t... K>
SRNN_INLINE V broadcast_lane0(V v, std::index_sequence<K...>) {
  return __builtin_shufflevector(v, v, (K * 0)...);
}
template <Isa ISA, typename T>
struct Splat {
  using S = Simd<ISA, T>;
  static SRNN_INLINE typename S::V run(T x) {
    typename S::V v{};
    v[0] = x;
    return broadcast_lane0(v, std::make_index_sequence<std::size_t(S::L)>());
  }
};
#if SRNN_X86_ISAS
template <typename T>
struct Splat<Isa::kAvx2, T> {
  using V = typename Simd<Isa::kAvx2, T>::V;
  __attribute__((target("avx2"))) static inline V run(T x) {  // inlined by run_avx2 (flatten)
    if constexpr (std::is_same_v<T, float>) return V(_mm256_set1_ps(x));
    else return V(_mm256_set1_pd(x));
  }
};
template <typename T>
struct Splat<Isa::kAvx512, T> {
  using V = typename Simd<Isa::kAvx512, T>::V;
  __attribute__((target("avx512f"))) static inline V run(T x) {  // inlined by run_avx512
    if constexpr (std::is_same_v<T, float>) return V(_mm512_set1_ps(x));
    else return V(_mm512_set1_pd(x));
  }
};
#endif
template <Isa ISA, typename T>
SRNN_INLINE typename Simd<ISA, T>::V splat(T x) {
  return Splat<ISA, T>::run(x);
}

// f(std::integral_constant<int, k>) for k = 0 .. N-1: indices known at compile time, so an
// array of vector accumulators indexed by them stays in registers.
template <typename F, int... K>
SRNN_INLINE void static_for_impl(F& f, std::integer_sequence<int, K...>) {
  (f(std::integral_constant<int, K>()), ...);
}
template <int N, typename F>
SRNN_INLINE void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>());
}

// f(std::integral_constant<int, c>) with c = min(n, N), n >= 1: a chunk count as a
// compile-time constant, so that a loop over c chunks keeps its accumulators in registers.
template <int N, typename F>
SRNN_INLINE void with_chunks(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return with_chunks<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>());
}

template <typename VI, std::size_t... K>
SRNN_INLINE auto low_half(VI v, std::index_sequence<K...>) {
  return __builtin_shufflevector(v, v, K...);
}
template <typename VI, std::size_t... K>
SRNN_INLINE auto high_half(VI v, std::index_sequence<K...>) {
  return __builtin_shufflevector(v, v, (K + sizeof...(K))...);
}
// The OR of the L lanes of an integer vector: halves folded onto each other.
template <int64_t L, typename VI>
SRNN_INLINE uint32_t or_lanes(VI v) {
  if constexpr (L == 1) {
    return uint32_t(v[0]);
  } else {
    using Half = std::make_index_sequence<std::size_t(L / 2)>;
    return or_lanes<L / 2>(low_half(v, Half()) | high_half(v, Half()));
  }
}

// The signed integer of a lane type's size, and its vector of one build.
template <Isa ISA, typename T>
struct SimdInt {
  using S = typename LaneInt<T>::type;
  typedef S V __attribute__((vector_size(IsaTraits<ISA>::kVecBytes)));
  static SRNN_INLINE V lane_bits() {  // {1, 2, 4, ...}: lane l holds bit l
    V b;
    for (int64_t l = 0; l < Simd<ISA, T>::L; ++l) b[l] = S(1) << l;
    return b;
  }
};

// Bit l of the result is set where lane l of the vector at x is nonzero (NaN counts as
// nonzero): a vector compare, then an OR tree over the lanes; on x86 the compare's own mask
// (movemask, AVX-512 mask registers), one instruction instead of the tree.
template <Isa ISA, typename T>
struct NonzeroMask {
  static SRNN_INLINE uint32_t run(const T* x) {  // (no run(V): see RowVectors::Whole::nonzero)
    using S = Simd<ISA, T>;
    return or_lanes<S::L>((S::load(x) != typename S::V{}) & SimdInt<ISA, T>::lane_bits());
  }
};
#if SRNN_X86_ISAS
template <typename T>
struct NonzeroMask<Isa::kAvx2, T> {
  using V = typename Simd<Isa::kAvx2, T>::V;
  __attribute__((target("avx2"))) static inline uint32_t run(V v) {  // inlined by run_avx2 (flatten)
    if constexpr (std::is_same_v<T, float>)
      return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(__m256(v), _mm256_setzero_ps(), _CMP_NEQ_UQ)));
    else
      return uint32_t(_mm256_movemask_pd(_mm256_cmp_pd(__m256d(v), _mm256_setzero_pd(), _CMP_NEQ_UQ)));
  }
};
template <typename T>
struct NonzeroMask<Isa::kAvx512, T> {
  using V = typename Simd<Isa::kAvx512, T>::V;
  __attribute__((target("avx512f"))) static inline uint32_t run(V v) {  // inlined by run_avx512
    if constexpr (std::is_same_v<T, float>)
      return uint32_t(_mm512_cmp_ps_mask(__m512(v), _mm512_setzero_ps(), _CMP_NEQ_UQ));
    else
      return uint32_t(_mm512_cmp_pd_mask(__m512d(v), _mm512_setzero_pd(), _CMP_NEQ_UQ));
  }
};
#endif
template <Isa ISA, typename T>
SRNN_INLINE uint32_t nonzero_mask(typename Simd<ISA, T>::V v) {
  return NonzeroMask<ISA, T>::run(v);
}
template <Isa ISA, typename T>
SRNN_INLINE uint32_t nonzero_mask(const T* x) {
  if constexpr (ISA == Isa::kDefault) return NonzeroMask<ISA, T>::run(x);
  else return NonzeroMask<ISA, T>::run(Simd<ISA, T>::load(x));
}

// The first n < L values at x in a vector's lanes, zeros in the others (x[n ..] is not read),
// and the way back: a row's last partial vector (H = 36, 100, 120, I = 4 all end in one) then
// runs the vector code, lane by lane the same operations as a scalar loop would do. On x86 one
// masked load / store (a memcpy of n values was a library call per row and step).
template <Isa ISA, typename T>
struct PartialVector {
  using S = Simd<ISA, T>;
  static SRNN_INLINE typename S::V load(const T* x, int64_t n) {
    typename S::V v{};
    for (int64_t l = 0; l < n; ++l) v[l] = x[l];
    return v;
  }
  static SRNN_INLINE void store(T* x, typename S::V v, int64_t n) {
    for (int64_t l = 0; l < n; ++l) x[l] = v[l];
  }
};
#if SRNN_X86_ISAS
template <typename T>
struct PartialVector<Isa::kAvx2, T> {  // inlined by run_avx2 (flatten)
  using V = typename Simd<Isa::kAvx2, T>::V;
  __attribute__((target("avx2"))) static inline auto mask(int64_t n) {  // lanes < n all ones
    if constexpr (std::is_same_v<T, float>)
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    else
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  __attribute__((target("avx2"))) static inline V load(const T* x, int64_t n) {
    if constexpr (std::is_same_v<T, float>) return V(_mm256_maskload_ps(x, mask(n)));
    else return V(_mm256_maskload_pd(x, mask(n)));
  }
  __attribute__((target("avx2"))) static inline void store(T* x, V v, int64_t n) {
    if constexpr (std::is_same_v<T, float>) _mm256_maskstore_ps(x, mask(n), __m256(v));
    else _mm256_maskstore_pd(x, mask(n), __m256d(v));
  }
};
template <typename T>
struct PartialVector<Isa::kAvx512, T> {  // inlined by run_avx512 (flatten)
  using V = typename Simd<Isa::kAvx512, T>::V;
  __attribute__((target("avx512f"))) static inline V load(const T* x, int64_t n) {
    if constexpr (std::is_same_v<T, float>) return V(_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), x));
    else return V(_mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), x));
  }
  __attribute__((target("avx512f"))) static inline void store(T* x, V v, int64_t n) {
    if constexpr (std::is_same_v<T, float>) _mm512_mask_storeu_ps(x, __mmask16((1u << n) - 1), __m512(v));
    else _mm512_mask_storeu_pd(x, __mmask8((1u << n) - 1), __m512d(v));
  }
};
#endif

// nonzero_mask of the first n < L values at x (PartialVector; the other lanes count as zero).
template <Isa ISA, typename T>
SRNN_INLINE uint32_t nonzero_mask_tail(const T* x, int64_t n) {
  if constexpr (ISA == Isa::kDefault) {
    T lanes[Simd<ISA, T>::L];
    Simd<ISA, T>::store(lanes, PartialVector<ISA, T>::load(x, n));
    return nonzero_mask<ISA>(lanes);
  } else {
    return nonzero_mask<ISA, T>(PartialVector<ISA, T>::load(x, n));
  }
}

// Indices of the nonzero x[k], k < n, in increasing order; returns how many. Used for the
// active neurons of s_{t-1} and the nonzero inputs x_t (spikes are sparse).
template <Isa ISA, typename T>
SRNN_INLINE int64_t nonzero_index(const T* __restrict x, int64_t n, int32_t* __restrict idx) {
  constexpr int64_t L = Simd<ISA, T>::L;
  int64_t count = 0, k0 = 0;
  for (; k0 < n; k0 += L)
    for (uint32_t mask = k0 + L <= n ? nonzero_mask<ISA>(x + k0) : nonzero_mask_tail<ISA>(x + k0, n - k0);
         mask != 0; mask &= mask - 1)
      idx[count++] = int32_t(k0 + __builtin_ctz(mask));
  return count;
}

// out [NC vectors] = init + sum over m < n of v[idx[m]] * rows[idx[m]], in order of m: NC
// independent register accumulators, each row read once.
template <Isa ISA, typename T, bool UNIT, int NC>
SRNN_INLINE void sum_rows_chunks(const T* __restrict rows, int64_t Hp, const int32_t* __restrict idx, int64_t n,
                                 const T* __restrict v, const T* __restrict init, T* __restrict out) {
  using S = Simd<ISA, T>;
  typename S::V acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = init != nullptr ? S::load(init + c * S::L) : typename S::V{};
  for (int64_t m = 0; m < n; ++m) {
    const T* __restrict w = rows + int64_t(idx[m]) * Hp;
    if (UNIT) {
      for (int c = 0; c < NC; ++c) acc[c] += S::load(w + c * S::L);
    } else {
      const typename S::V vv = splat<ISA>(v[idx[m]]);
      for (int c = 0; c < NC; ++c) acc[c] = madd<ISA>(vv, S::load(w + c * S::L), acc[c]);
    }
  }
  for (int c = 0; c < NC; ++c) S::store(out + c * S::L, acc[c]);
}

// out [Hp] = init + sum over m < n of v[idx[m]] * rows[idx[m]] (rows [*, Hp], Hp a whole
// number of 64-byte chunks, zero-padded; init null means 0): the recurrent input W s_{t-1}
// over the active columns (rows of W^T), or the input current b + W_in x_t over the nonzero
// inputs (rows of W_in^T). UNIT: every v[idx[m]] is 1 (binary spikes), so the products are
// skipped (multiplying by 1 would round alike).
template <Isa ISA, typename T, bool UNIT>
SRNN_INLINE void sum_rows(const T* rows, int64_t Hp, const int32_t* idx, int64_t n, const T* v, const T* init,
                          T* out) {
  constexpr int64_t L = Simd<ISA, T>::L;
  constexpr int NC = IsaTraits<ISA>::kSumChunks;
  for (int64_t j0 = 0; j0 < Hp; j0 += NC * L)
    with_chunks<NC>((Hp - j0) / L, [&](auto nc) {
      sum_rows_chunks<ISA, T, UNIT, nc()>(rows + j0, Hp, idx, n, v, init != nullptr ? init + j0 : nullptr, out + j0);
    });
}

// rows[idx[m]] += v[idx[m]] * d for m < n (rows [*, Hp], d [Hp]): the outer-product
// updates of dW_in^T and dW_rec^T restricted to the nonzero inputs / active neurons. d stays
// in registers, NC vectors at a time.
template <Isa ISA, typename T, int NC>
SRNN_INLINE void add_to_rows_chunks(T* __restrict rows, int64_t Hp, const int32_t* __restrict idx, int64_t n,
                                    const T* __restrict v, const T* __restrict d) {
  using S = Simd<ISA, T>;
  typename S::V dv[NC];
  for (int c = 0; c < NC; ++c) dv[c] = S::load(d + c * S::L);
  for (int64_t m = 0; m < n; ++m) {
    T* __restrict r = rows + int64_t(idx[m]) * Hp;
    const typename S::V vv = splat<ISA>(v[idx[m]]);
    for (int c = 0; c < NC; ++c) S::store(r + c * S::L, madd<ISA>(vv, dv[c], S::load(r + c * S::L)));
  }
}

template <Isa ISA, typename T>
SRNN_INLINE void add_to_rows(T* rows, int64_t Hp, const int32_t* idx, int64_t n, const T* v, const T* d) {
  constexpr int64_t L = Simd<ISA, T>::L;
  constexpr int NC = IsaTraits<ISA>::kSumChunks;
  for (int64_t j0 = 0; j0 < Hp; j0 += NC * L)
    with_chunks<NC>((Hp - j0) / L, [&](auto nc) { add_to_rows_chunks<ISA, T, nc()>(rows + j0, Hp, idx, n, v, d + j0); });
}

template <Isa ISA, typename T>
SRNN_INLINE void recurrent_input(const T* wT, const T* s, const int32_t* idx, int64_t n, bool unit, int64_t Hp,
                                 T* acc) {
  if (unit) sum_rows<ISA, T, true>(wT, Hp, idx, n, s, nullptr, acc);
  else sum_rows<ISA, T, false>(wT, Hp, idx, n, s, nullptr, acc);
}

// Indices of the set bits of bits [W] in increasing order (the active neurons); returns
// how many. The cost follows the spike count.
SRNN_INLINE int64_t bit_index(const int32_t* __restrict bits, int64_t W, int32_t* __restrict idx) {
  int64_t n = 0;
  for (int64_t w = 0; w < W; ++w)
    for (uint32_t word = uint32_t(bits[w]); word != 0; word &= word - 1) idx[n++] = int32_t(w * 32 + __builtin_ctz(word));
  return n;
}

// bits [ceil(H/32)] -> s [padded(H)] of 0/1 (lanes past H are 0: the padding bits are 0).
// One vector at a time: its 2 to 16 lanes always lie within one 32-bit word.
template <Isa ISA, typename T>
SRNN_INLINE void unpack_bits(const int32_t* __restrict bits, int64_t H, T* __restrict s) {
  using S = Simd<ISA, T>;
  using SI = SimdInt<ISA, T>;
  constexpr int64_t L = S::L;
  static_assert(32 % L == 0, "a vector's lanes lie within one 32-bit word");
  const typename SI::V lane_bits = SI::lane_bits();
  for (int64_t j0 = 0; j0 < H; j0 += L) {
    const typename SI::S word = typename SI::S(uint32_t(bits[j0 >> 5]) >> (j0 & 31));
    const typename SI::V on = ((typename SI::V{} + word) & lane_bits) != 0;  // lanes of -1 / 0
    S::store(s + j0, __builtin_convertvector(-on, typename S::V));
  }
}


// ---------------------------------------------------------------------------------------
// Per-step pieces of one batch row, shared by the scan and the layer kernels so that a
// recomputed step rounds exactly like the forward step it repeats.
// ---------------------------------------------------------------------------------------

// N values of D in one (GCC/Clang) vector type.
template <typename D, int64_t N>
struct VectorOf {
  typedef D type __attribute__((vector_size(N * sizeof(D))));
};

// f(i, io) for the vectors of a row of n values: whole vectors, then the last partial one,
// whose io reads and writes only the values < n (PartialVector). io.load / io.store move a
// vector of T, io.add_d adds a vector of as many doubles to the float64 sums at q. The neuron
// loops run on it in explicit vectors: `omp simd` left each row's last H % L neurons to a
// scalar loop (ECG, H = 36, avx2: 7 % of the backward's instructions, 12 % of the forward's)
// and GCC 12 vectorized those loops or not depending on what else was inlined into the
// kernel. The lambdas passed in are always_inline: flatten alone left PartialVector's avx512
// loads out of line.
template <Isa ISA, typename T>
struct RowVectors {
  using S = Simd<ISA, T>;
  using V = typename S::V;
  using VD = typename VectorOf<double, S::L>::type;  // L doubles
  struct Whole {
    SRNN_INLINE V load(const T* q) const { return S::load(q); }
    SRNN_INLINE void store(T* q, V v) const { S::store(q, v); }
    SRNN_INLINE void add_d(double* q, VD v) const {  // q[l] += v[l]
      VD a;
      std::memcpy(&a, q, sizeof(VD));
      a += v;
      std::memcpy(q, &a, sizeof(VD));
    }
    // Lane l of v != 0 in bit l; v was just stored at q. From the register on x86; the default
    // build reads q back (the vector compare of a value fresh from a vector ?: made GCC 12 fail,
    // internal compiler error in gimple_expand_vec_cond_expr, SSE2 doubles).
    SRNN_INLINE uint32_t nonzero(const T* q, V v) const {
      if constexpr (ISA == Isa::kDefault) return nonzero_mask<ISA>(q);
      else return nonzero_mask<ISA, T>(v);
    }
  };
  struct Part {
    int64_t n;
    SRNN_INLINE V load(const T* q) const { return PartialVector<ISA, T>::load(q, n); }
    SRNN_INLINE void store(T* q, V v) const { PartialVector<ISA, T>::store(q, v, n); }
    SRNN_INLINE void add_d(double* q, VD v) const {
      double a[S::L];
      std::memcpy(a, &v, sizeof(VD));
      for (int64_t l = 0; l < n; ++l) q[l] += a[l];
    }
    SRNN_INLINE uint32_t nonzero(const T* q, V v) const {  // the lanes < n only
      if constexpr (ISA == Isa::kDefault) return nonzero_mask_tail<ISA>(q, n);
      else return nonzero_mask<ISA, T>(v) & ((uint32_t(1) << n) - 1);
    }
  };
  template <typename F>
  static SRNN_INLINE void run(int64_t n, F&& f) {
    int64_t i = 0;
    for (; i + S::L <= n; i += S::L) f(i, Whole{});
    if (i < n) f(i, Part{n - i});
  }
};

// The neuron constants of lanes i .. i + L - 1 (io: RowVectors' Whole or Part).
template <typename T, typename IO>
SRNN_INLINE auto decay_lanes(const Neurons<T>& nrn, int64_t i, const IO& io) {
  using V = decltype(io.load(nrn.alpha.data()));
  return Decay<V>{io.load(nrn.alpha.data() + i), io.load(nrn.rho.data() + i), io.load(nrn.in_gain.data() + i),
                  io.load(nrn.one_m_rho.data() + i), V{}};  // one_m_alpha: not used by the steps
}

// s_t [H] from I_t = x[i] + rec[i]; u and eta advance from step t-1 (u_in, eta_in) to t (u,
// eta; the same arrays or others: each vector is read before it is written). bits (or null):
// [ceil(H/32)], neuron j's s_t != 0 in bit j % 32 of word j / 32, from the registers (reading
// s_t back after the masked store of its last vector stalled: such a store does not forward).
template <Isa ISA, typename T>
SRNN_INLINE void forward_neurons(const Params<T>& p, const Neurons<T>& nrn, int64_t H, const T* x, const T* rec,
                                 const T* s_prev, const T* u_in, const T* eta_in, T* u, T* eta, T* s,
                                 int32_t* bits = nullptr) {
  static_assert(32 % Simd<ISA, T>::L == 0, "a vector's lanes lie within one 32-bit word");
  if (bits != nullptr) std::fill(bits, bits + spike_words(H), 0);
  RowVectors<ISA, T>::run(H, [&](int64_t i, auto io) __attribute__((always_inline)) {
    auto uu = io.load(u_in + i), ee = io.load(eta_in + i);
    const auto si = forward_step(p, decay_lanes(nrn, i, io), io.load(x + i) + io.load(rec + i),
                                 io.load(s_prev + i), uu, ee);
    io.store(u + i, uu);
    io.store(eta + i, ee);
    io.store(s + i, si);
    if (bits != nullptr) bits[i >> 5] |= int32_t(io.nonzero(s + i, si) << (i & 31));
  });
}

// sg [H] = d s_t / d v_t at v = u_t - theta_t: the surrogate (binary neurons) or the step
// (relu), in explicit vectors (GCC if-converts the scalar loop only for AVX-512). The last
// H % L neurons go through one more, partial vector (PartialVector): one vector exp instead of
// up to L - 1 scalar ones (at H = 36 those were a tenth of the ECG layer's backward).
template <Isa ISA, typename T, bool BINARY>
SRNN_INLINE void spike_grads(const Params<T>& p, int64_t H, const T* __restrict u, const T* __restrict eta,
                             T* __restrict sg) {
  using S = Simd<ISA, T>;
  const auto grad = [&p](auto v) {
    using V = decltype(v);
    if constexpr (BINARY) return surrogate_grad(p, v, SimdExp());
    else return v > V{} ? V{} + T(1) : V{};
  };
  int64_t i = 0;
  for (; i + S::L <= H; i += S::L) S::store(sg + i, grad(S::load(u + i) - threshold(p, S::load(eta + i))));
  if (i < H) {
    using P = PartialVector<ISA, T>;
    P::store(sg + i, grad(P::load(u + i, H - i) - threshold(p, P::load(eta + i, H - i))), H - i);
  }
}

// One backward step of a row's neurons (t descending): sg = the surrogate at u_t - theta_t,
// then dI_t, the local part of dL/ds_{t-1} (into ds, replacing what was there: the caller
// adds W^T dI_t afterwards), the dL/dalpha and dL/drho sums (float64; TAU), and the carries
// du, deta. g_s = dL/ds_t from the output; ds holds dL/ds_t from step t+1 on entry.
template <Isa ISA, typename T, bool BINARY, bool TAU>
SRNN_INLINE void backward_neurons_impl(const Params<T>& params, const Neurons<T>& nrn, int64_t H, T* __restrict sg,
                                       const T* __restrict u_prev, const T* __restrict u_cur,
                                       const T* __restrict e_prev, const T* __restrict e_cur,
                                       const T* __restrict s_prev, const T* __restrict g_s, T* __restrict dI,
                                       T* __restrict ds, T* __restrict du, T* __restrict deta,
                                       double* __restrict dalpha, double* __restrict drho) {
  Params<T> p = params;
  p.binary = BINARY;
  spike_grads<ISA, T, BINARY>(p, H, u_cur, e_cur, sg);
  using RV = RowVectors<ISA, T>;
  RV::run(H, [&](int64_t i, auto io) __attribute__((always_inline)) {
    auto du_i = io.load(du + i), deta_i = io.load(deta + i);
    const auto g = backward_step_sg(p, decay_lanes(nrn, i, io), io.load(sg + i), io.load(u_prev + i),
                                    io.load(u_cur + i), io.load(e_prev + i), io.load(e_cur + i), io.load(s_prev + i),
                                    io.load(g_s + i) + io.load(ds + i), du_i, deta_i);
    io.store(du + i, du_i);
    io.store(deta + i, deta_i);
    io.store(dI + i, g.d_current);
    io.store(ds + i, g.ds_prev);
    if constexpr (TAU) {  // else g.dalpha_num and g.drho are dead code: their products go too
      io.add_d(dalpha + i, __builtin_convertvector(g.dalpha_num, typename RV::VD));
      io.add_d(drho + i, __builtin_convertvector(g.drho, typename RV::VD));
    }
  });
}

// dalpha = drho = null: no time constant needs a gradient (frozen tau_m and tau_adp), so the
// per-step dL/dalpha, dL/drho terms are neither computed nor summed. The other outputs are
// the same operations either way (bit for bit).
template <Isa ISA, typename T, bool BINARY>
SRNN_INLINE void backward_neurons(const Params<T>& p, const Neurons<T>& nrn, int64_t H, T* __restrict sg,
                                  const T* __restrict u_prev, const T* __restrict u_cur,
                                  const T* __restrict e_prev, const T* __restrict e_cur,
                                  const T* __restrict s_prev, const T* __restrict g_s, T* __restrict dI,
                                  T* __restrict ds, T* __restrict du, T* __restrict deta,
                                  double* __restrict dalpha, double* __restrict drho) {
  if (dalpha != nullptr)
    backward_neurons_impl<ISA, T, BINARY, true>(p, nrn, H, sg, u_prev, u_cur, e_prev, e_cur, s_prev, g_s, dI, ds,
                                                du, deta, dalpha, drho);
  else
    backward_neurons_impl<ISA, T, BINARY, false>(p, nrn, H, sg, u_prev, u_cur, e_prev, e_cur, s_prev, g_s, dI, ds,
                                                 du, deta, dalpha, drho);
}

// grad_alpha [H], grad_rho [H] from the per-row float64 sums dalpha_num, drho [B, H], added
// in row order (deterministic for any thread count), with the dL/dalpha identity's common
// factor 1 / (1 - alpha) applied once (srnn_neuron.h).
template <typename T>
void reduce_tau_grads(const double* dalpha_num, const double* drho, int64_t B, int64_t H, const Neurons<T>& nrn,
                      T* grad_alpha, T* grad_rho) {
  for (int64_t i = 0; i < H; ++i) {
    double sa = 0.0, sr = 0.0;
    for (int64_t b = 0; b < B; ++b) sa += dalpha_num[b * H + i], sr += drho[b * H + i];
    grad_alpha[i] = T(sa / double(nrn.one_m_alpha[i]));
    grad_rho[i] = T(sr);
  }
}

// Writes what a backward block of nr rows (first row b0) carried to the end: dL/du_0,
// dL/deta_0, dL/ds_0 [nr, H] and the per-row dL/dalpha, dL/drho sums (float64; not when
// dalpha_rows is null: no tau gradient asked for).
template <typename T>
void store_block_grads(int64_t b0, int64_t nr, int64_t H, const T* du, const T* deta, const T* ds,
                       const double* dalpha, const double* drho, T* grad_u0, T* grad_eta0, T* grad_s0,
                       double* dalpha_rows, double* drho_rows) {
  const int64_t off = b0 * H, n = nr * H;  // rows b0 .. b0 + nr - 1 are contiguous
  std::memcpy(grad_u0 + off, du, n * sizeof(T));
  std::memcpy(grad_eta0 + off, deta, n * sizeof(T));
  std::memcpy(grad_s0 + off, ds, n * sizeof(T));
  if (dalpha_rows == nullptr) return;
  std::memcpy(dalpha_rows + off, dalpha, n * sizeof(double));
  std::memcpy(drho_rows + off, drho, n * sizeof(double));
}

// A block's rows times a matrix, every dense product of the kernels: for the rows r < nr of a
// block of kRowBlock, out[r][j] = init[j] + sum over i < n of a[r][i] * m[i * ldm + j] for
// j < cols (init null: 0), or out[r][j] += that sum (ACCUMULATE, init null). Used for W^T dI
// (a = dI rows, m = W_rec, out = dL/ds_{t-1}, accumulating), dL/dx_t = dI W_in (m = W_in) and
// the input current b + W_in x_t of dense inputs (a = x rows, m = W_in^T, init = b). a[r] for
// r >= nr must still point at n readable values (zeros); those rows are not written. m's rows
// are read in whole vectors up to cols rounded up (lanes past cols are dropped). NC vectors of
// columns at a time for all kRowBlock rows: kRowBlock x NC register accumulators, each row of
// m read once per block; every sum runs over i in order, so no row's result depends on the
// others in its block.
template <Isa ISA, typename T, int NC, bool ACCUMULATE>
SRNN_INLINE void rows_times_matrix_chunks(const T* __restrict m, int64_t ldm, int64_t n, const T* const* a,
                                          int64_t nr, int64_t j0, int64_t cols, const T* __restrict init,
                                          T* const* out) {
  using S = Simd<ISA, T>;
  constexpr int64_t L = S::L;
  typename S::V acc[kRowBlock][NC];
  for (int c = 0; c < NC; ++c) {
    const typename S::V v = init != nullptr ? S::load(init + j0 + c * L) : typename S::V{};
    for (int r = 0; r < kRowBlock; ++r) acc[r][c] = v;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* __restrict mi = m + i * ldm + j0;
    typename S::V wv[NC];
    for (int c = 0; c < NC; ++c) wv[c] = S::load(mi + c * L);
    for (int r = 0; r < kRowBlock; ++r) {
      const typename S::V d = splat<ISA>(a[r][i]);
      for (int c = 0; c < NC; ++c) acc[r][c] = madd<ISA>(d, wv[c], acc[r][c]);
    }
  }
  // Constant indices (static_for): acc stays in registers instead of being kept in memory.
  static_for<kRowBlock>([&](auto r) {
    if (r() >= nr) return;
    static_for<NC>([&](auto c) {
      const int64_t j = j0 + c() * L;
      T* __restrict o = out[r()] + j;
      if (j + L <= cols) {
        S::store(o, ACCUMULATE ? S::load(o) + acc[r()][c()] : acc[r()][c()]);
      } else if (j < cols) {  // through memory: a lane-indexed vector would put acc on the stack
        T tmp[L];
        S::store(tmp, acc[r()][c()]);
        for (int64_t l = 0; l < cols - j; ++l) o[l] = ACCUMULATE ? o[l] + tmp[l] : tmp[l];
      }
    });
  });
}

template <Isa ISA, typename T, bool ACCUMULATE = false>
SRNN_INLINE void rows_times_matrix(const T* m, int64_t ldm, int64_t n, const T* const* a, int64_t nr, int64_t cols,
                                   const T* init, T* const* out) {
  constexpr int64_t L = Simd<ISA, T>::L;
  constexpr int NC = IsaTraits<ISA>::kWtChunks;
  for (int64_t j0 = 0; j0 < cols; j0 += NC * L)
    with_chunks<NC>((cols - j0 + L - 1) / L, [&](auto nc) {
      rows_times_matrix_chunks<ISA, T, nc(), ACCUMULATE>(m, ldm, n, a, nr, j0, cols, init, out);
    });
}

// ds[r] += W^T dI[r] for the rows of a block (dI[r] [H], kRowBlock pointers; rows past nr
// point at zeros and are not written; ds [nr, H]; W [H, Hp] zero-padded rows).
template <Isa ISA, typename T>
SRNN_INLINE void add_wT_dI(const T* w, const T* const* dI, int64_t nr, int64_t H, int64_t Hp, T* ds) {
  T* out[kRowBlock];
  for (int r = 0; r < kRowBlock; ++r) out[r] = ds + r * H;
  rows_times_matrix<ISA, T, true>(w, Hp, H, dI, nr, H, nullptr, out);
}

// The dense-input weight gradients dW_in = dI^T x and db = sum of the rows of dI, as
// DenseInputGrads (layer_cpu.cpp) runs them per row block and segment: every (h, i) sums the
// segment's rows in order in registers, at most kGradChunkRows of them, and adds that sum to a
// per-block float64 total; the blocks' totals are added in block order. So the result depends
// on neither the thread count nor the tiling (a BLAS GEMM over all rows does: MKL splits that
// reduction across threads on Intel CPUs). A tile is kGradInputs inputs; the bias is input I
// with x = 1.
constexpr int64_t kGradChunkRows = 128;
constexpr int kGradInputs = 4;

// acc [(I + 1), H] (float64) += the sums over rows r < n of xs[k][r] * d[r, 0 .. NC L) for the
// tile's inputs k < ni (xs[k][r] = x_col[k][r * x_step[k]]; unused k repeat the last input);
// d [n, ld], its NC L columns readable, the first `cols` of them real (added to acc).
template <Isa ISA, typename T, int NC>
SRNN_INLINE void dense_dw_tile(const T* __restrict d, int64_t ld, int64_t n, const T* const* x_col,
                               const int64_t* x_step, int ni, int64_t cols, double* __restrict acc, int64_t H) {
  using S = Simd<ISA, T>;
  constexpr int64_t L = S::L;
  typename S::V sum[kGradInputs][NC] = {};
  const T* xk[kGradInputs];
  for (int k = 0; k < kGradInputs; ++k) xk[k] = x_col[k];
  for (int64_t r = 0; r < n; ++r) {
    const T* __restrict dr = d + r * ld;
    typename S::V dv[NC];
    for (int c = 0; c < NC; ++c) dv[c] = S::load(dr + c * L);
    static_for<kGradInputs>([&](auto k) {
      const typename S::V xv = splat<ISA>(*xk[k()]);
      xk[k()] += x_step[k()];
      for (int c = 0; c < NC; ++c) sum[k()][c] = madd<ISA>(xv, dv[c], sum[k()][c]);
    });
  }
  static_for<kGradInputs>([&](auto k) {
    if (k() >= ni) return;
    static_for<NC>([&](auto c) {
      T lanes[L];
      S::store(lanes, sum[k()][c()]);
      double* __restrict out = acc + k() * H + c() * L;
      for (int64_t l = 0; l < L && c() * L + l < cols; ++l) out[l] += double(lanes[l]);
    });
  });
}

}  // namespace
}  // namespace srnn
