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
#include <vector>

#include "checks.h"
#include "srnn_neuron.h"

// Hot loops are compiled per x86 vector width (see SRNN_DEFINE_ROWS); elsewhere, one build.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SRNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define SRNN_CLONES
#endif
#define SRNN_INLINE inline __attribute__((always_inline))

namespace srnn {
namespace {

// SRNN_FAST_POISON=1 fills every output with NaN (spike words with all bits set) before
// the kernels run, so a test sees any element a kernel forgot to write.
bool poison_outputs() {
  const char* v = std::getenv("SRNN_FAST_POISON");
  return v != nullptr && v[0] == '1';
}

at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  if (poison_outputs()) {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(-1);
  }
  return t;
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

// exp(x) for x <= 0 (the surrogate's Gaussians) in plain arithmetic that vectorizes, unlike
// a libm call: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of ln2), exp(r) by its
// Taylor series (to r^13 for double, r^7 for float: truncation below half an ulp), times 2^n
// built in the exponent bits. Within a few ulp of libm's exp. Below exp(-708) (double) /
// exp(-87) (float) it returns 0 where libm gives a subnormal or 0.
struct SimdExp {
  SRNN_INLINE double operator()(double x) const {
    const double shifter = 0x1.8p52;  // adding it rounds x log2(e) to an integer n
    const double xc = x < -708.0 ? -708.0 : x;
    const double t = xc * 1.4426950408889634 + shifter;
    const double n = t - shifter;
    const double r = (xc - n * 0x1.62e42fee00000p-1) - n * 0x1.a39ef35793c76p-33;
    double q = 1.0 / 6227020800.0;
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
    const int64_t k = bits_as<int64_t>(t) - bits_as<int64_t>(shifter);  // n as an integer
    const double scale = bits_as<double>(int64_t(uint64_t(k + 1023) << 52));
    return x < -708.0 ? 0.0 : q * scale;
  }
  SRNN_INLINE float operator()(float x) const {
    const float shifter = 0x1.8p23f;
    const float xc = x < -87.0f ? -87.0f : x;
    const float t = xc * 1.44269504f + shifter;
    const float n = t - shifter;
    const float r = (xc - n * 0x1.62e4p-1f) - n * 0x1.7f7d1cp-20f;
    float q = 1.0f / 5040.0f;
    q = q * r + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    const int32_t k = bits_as<int32_t>(t) - bits_as<int32_t>(shifter);
    const float scale = bits_as<float>(int32_t(uint32_t(k + 127) << 23));
    return x < -87.0f ? 0.0f : q * scale;
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
  Decay<T> at(int64_t i) const { return Decay<T>{alpha[i], rho[i], in_gain[i], one_m_rho[i], one_m_alpha[i]}; }
};


// 64-byte vectors (GCC/Clang vector extensions): one zmm with AVX-512, split into ymm /
// xmm by the narrower clones. Explicit vectors keep accumulators in registers where the
// auto-vectorizer would unroll-and-jam the row loop into scalar code.
typedef float VecF __attribute__((vector_size(64)));
typedef double VecD __attribute__((vector_size(64)));
template <typename T> struct Vec64;
template <> struct Vec64<float> { using type = VecF; };
template <> struct Vec64<double> { using type = VecD; };

template <typename T>
SRNN_INLINE typename Vec64<T>::type load64(const T* p) {
  typename Vec64<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
SRNN_INLINE void store64(T* p, typename Vec64<T>::type v) { std::memcpy(p, &v, sizeof(v)); }

// Bit l of the result is set where lane l of the 64-byte chunk at x is nonzero (NaN counts as
// nonzero): a vector compare, then an OR tree over the lanes (one k-mask compare and five
// shuffles with AVX-512).
SRNN_INLINE uint32_t nonzero_mask(const float* x) {
  typedef int32_t VecI __attribute__((vector_size(64)));
  const VecI bit = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
  VecI m = (load64(x) != VecF{}) & bit;
  m |= __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  m |= __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  m |= __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  m |= __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return uint32_t(m[0]);
}
SRNN_INLINE uint32_t nonzero_mask(const double* x) {
  typedef int64_t VecL __attribute__((vector_size(64)));
  const VecL bit = {1, 2, 4, 8, 16, 32, 64, 128};
  VecL m = (load64(x) != VecD{}) & bit;
  m |= __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
  m |= __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5);
  m |= __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6);
  return uint32_t(m[0]);
}

// Indices of the nonzero x[k], k < n, in increasing order; returns how many. Used for the
// active neurons of s_{t-1} and the nonzero inputs x_t (spikes are sparse).
template <typename T>
SRNN_INLINE int64_t nonzero_index(const T* __restrict x, int64_t n, int32_t* __restrict idx) {
  constexpr int64_t L = 64 / sizeof(T);
  int64_t count = 0, k0 = 0;
  for (; k0 + L <= n; k0 += L)
    for (uint32_t mask = nonzero_mask(x + k0); mask != 0; mask &= mask - 1)
      idx[count++] = int32_t(k0 + __builtin_ctz(mask));
  for (; k0 < n; ++k0) {  // the tail, branch-free
    idx[count] = int32_t(k0);
    count += x[k0] != T(0);
  }
  return count;
}

// out [NC chunks of 64 B] = init + sum over m < n of v[idx[m]] * rows[idx[m]]: NC independent
// register accumulators, each row read once.
template <typename T, bool UNIT, int NC>
SRNN_INLINE void sum_rows_chunks(const T* __restrict rows, int64_t Hp, const int32_t* __restrict idx, int64_t n,
                                 const T* __restrict v, const T* __restrict init, T* __restrict out) {
  using V = typename Vec64<T>::type;
  constexpr int64_t L = 64 / sizeof(T);
  V acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = init != nullptr ? load64(init + c * L) : V{};
  for (int64_t m = 0; m < n; ++m) {
    const T* __restrict w = rows + int64_t(idx[m]) * Hp;
    if (UNIT) {
      for (int c = 0; c < NC; ++c) acc[c] += load64(w + c * L);
    } else {
      const T vm = v[idx[m]];
      for (int c = 0; c < NC; ++c) acc[c] += vm * load64(w + c * L);
    }
  }
  for (int c = 0; c < NC; ++c) store64(out + c * L, acc[c]);
}

// out [Hp] = init + sum over m < n of v[idx[m]] * rows[idx[m]] (rows [*, Hp], Hp a whole
// number of 64-byte chunks, zero-padded; init null means 0): the recurrent input W s_{t-1}
// over the active columns (rows of W^T), or the input current b + W_in x_t over the nonzero
// inputs (rows of W_in^T). UNIT: every v[idx[m]] is 1 (binary spikes), so the products are
// skipped (multiplying by 1 would round alike).
template <typename T, bool UNIT>
SRNN_INLINE void sum_rows(const T* rows, int64_t Hp, const int32_t* idx, int64_t n, const T* v, const T* init,
                          T* out) {
  constexpr int64_t L = 64 / sizeof(T);
  for (int64_t j0 = 0; j0 < Hp; j0 += 4 * L) {
    const T* r = rows + j0;
    const T* in = init != nullptr ? init + j0 : nullptr;
    switch (std::min<int64_t>(4, (Hp - j0) / L)) {
      case 1: sum_rows_chunks<T, UNIT, 1>(r, Hp, idx, n, v, in, out + j0); break;
      case 2: sum_rows_chunks<T, UNIT, 2>(r, Hp, idx, n, v, in, out + j0); break;
      case 3: sum_rows_chunks<T, UNIT, 3>(r, Hp, idx, n, v, in, out + j0); break;
      default: sum_rows_chunks<T, UNIT, 4>(r, Hp, idx, n, v, in, out + j0); break;
    }
  }
}

// rows[idx[m]] += v[idx[m]] * d for m < n (rows [*, Hp], d [Hp]): the outer-product
// updates of dW_in^T and dW_rec^T restricted to the nonzero inputs / active neurons. d stays
// in registers, NC 64-byte chunks at a time.
template <typename T, int NC>
SRNN_INLINE void add_to_rows_chunks(T* __restrict rows, int64_t Hp, const int32_t* __restrict idx, int64_t n,
                                    const T* __restrict v, const T* __restrict d) {
  using V = typename Vec64<T>::type;
  constexpr int64_t L = 64 / sizeof(T);
  V dv[NC];
  for (int c = 0; c < NC; ++c) dv[c] = load64(d + c * L);
  for (int64_t m = 0; m < n; ++m) {
    T* __restrict r = rows + int64_t(idx[m]) * Hp;
    const T vm = v[idx[m]];
    for (int c = 0; c < NC; ++c) store64(r + c * L, load64(r + c * L) + vm * dv[c]);
  }
}

template <typename T>
SRNN_INLINE void add_to_rows(T* rows, int64_t Hp, const int32_t* idx, int64_t n, const T* v, const T* d) {
  constexpr int64_t L = 64 / sizeof(T);
  for (int64_t j0 = 0; j0 < Hp; j0 += 4 * L) {
    switch (std::min<int64_t>(4, (Hp - j0) / L)) {
      case 1: add_to_rows_chunks<T, 1>(rows + j0, Hp, idx, n, v, d + j0); break;
      case 2: add_to_rows_chunks<T, 2>(rows + j0, Hp, idx, n, v, d + j0); break;
      case 3: add_to_rows_chunks<T, 3>(rows + j0, Hp, idx, n, v, d + j0); break;
      default: add_to_rows_chunks<T, 4>(rows + j0, Hp, idx, n, v, d + j0); break;
    }
  }
}

template <typename T>
SRNN_INLINE void recurrent_input(const T* wT, const T* s, const int32_t* idx, int64_t n, bool unit, int64_t Hp,
                                 T* acc) {
  if (unit) sum_rows<T, true>(wT, Hp, idx, n, s, nullptr, acc);
  else sum_rows<T, false>(wT, Hp, idx, n, s, nullptr, acc);
}

// Spikes s [H] (binary) -> bits [ceil(H/32)], neuron j in bit j % 32 of word j / 32.
template <typename T>
void pack_bits(const T* s, int64_t H, int32_t* bits) {
  for (int64_t w = 0; w * 32 < H; ++w) {
    uint32_t word = 0;
    const int64_t n = std::min<int64_t>(32, H - w * 32);
    for (int64_t k = 0; k < n; ++k) word |= uint32_t(s[w * 32 + k] != T(0)) << k;
    bits[w] = int32_t(word);
  }
}

// bits [ceil(H/32)] -> s [padded(H)] of 0/1 (lanes past H are 0: the padding bits are 0).
// One 64-byte chunk at a time: 16 floats or 8 doubles always lie within one 32-bit word.
SRNN_INLINE void unpack_chunk(uint32_t word, float* s) {
  typedef int32_t VecI __attribute__((vector_size(64)));
  const VecI bit = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
  const VecI on = ((VecI{} + int32_t(word)) & bit) != 0;  // lanes of -1 / 0
  store64(s, __builtin_convertvector(-on, VecF));
}
SRNN_INLINE void unpack_chunk(uint32_t word, double* s) {
  typedef int64_t VecL __attribute__((vector_size(64)));
  const VecL bit = {1, 2, 4, 8, 16, 32, 64, 128};
  const VecL on = ((VecL{} + int64_t(word)) & bit) != 0;
  store64(s, __builtin_convertvector(-on, VecD));
}

template <typename T>
SRNN_INLINE void unpack_bits(const int32_t* __restrict bits, int64_t H, T* __restrict s) {
  constexpr int64_t L = 64 / sizeof(T);
  for (int64_t j0 = 0; j0 < H; j0 += L) unpack_chunk(uint32_t(bits[j0 >> 5]) >> (j0 & 31), s + j0);
}


// ---------------------------------------------------------------------------------------
// Per-step pieces of one batch row, shared by the scan and the layer kernels so that a
// recomputed step rounds exactly like the forward step it repeats.
// ---------------------------------------------------------------------------------------

// s_t [H] from I_t = x[i] + rec[i]; u and eta advance from step t-1 to t in place.
template <typename T>
SRNN_INLINE void forward_neurons(const Params<T>& p, const Neurons<T>& nrn, int64_t H, const T* __restrict x,
                                 const T* __restrict rec, const T* __restrict s_prev, T* __restrict u,
                                 T* __restrict eta, T* __restrict s) {
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) s[i] = forward_step(p, nrn.at(i), T(x[i] + rec[i]), s_prev[i], u[i], eta[i]);
}

// One backward step of a row's neurons (t descending): sg = the surrogate at u_t - theta_t,
// then dI_t, the local part of dL/ds_{t-1} (into ds, replacing what was there: the caller
// adds W^T dI_t afterwards), the dL/dalpha and dL/drho sums (float64), and the carries
// du, deta. g_s = dL/ds_t from the output; ds holds dL/ds_t from step t+1 on entry.
template <typename T, bool BINARY>
SRNN_INLINE void backward_neurons(const Params<T>& params, const Neurons<T>& nrn, int64_t H, T* __restrict sg,
                                  const T* __restrict u_prev, const T* __restrict u_cur,
                                  const T* __restrict e_prev, const T* __restrict e_cur,
                                  const T* __restrict s_prev, const T* __restrict g_s, T* __restrict dI,
                                  T* __restrict ds, T* __restrict du, T* __restrict deta,
                                  double* __restrict dalpha, double* __restrict drho) {
  Params<T> p = params;
  p.binary = BINARY;
  // The surrogate, one loop per kind so that each vectorizes whole (SimdExp).
  if (p.surrogate == kGaussian) {
    Params<T> q = p;
    q.surrogate = kGaussian;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) sg[i] = spike_grad(q, T(u_cur[i] - threshold(q, e_cur[i])), SimdExp());
  } else {
    Params<T> q = p;
    q.surrogate = kMultiGaussian;
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) sg[i] = spike_grad(q, T(u_cur[i] - threshold(q, e_cur[i])), SimdExp());
  }
#pragma omp simd
  for (int64_t i = 0; i < H; ++i) {
    const StepGrads<T> g = backward_step_sg(p, nrn.at(i), sg[i], u_prev[i], u_cur[i], e_prev[i], e_cur[i],
                                            s_prev[i], T(g_s[i] + ds[i]), du[i], deta[i]);
    dI[i] = g.d_current;
    ds[i] = g.ds_prev;
    dalpha[i] += double(g.dalpha_num);
    drho[i] += double(g.drho);
  }
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
// dL/deta_0, dL/ds_0 [nr, H] and the per-row dL/dalpha, dL/drho sums (float64).
template <typename T>
void store_block_grads(int64_t b0, int64_t nr, int64_t H, const T* du, const T* deta, const T* ds,
                       const double* dalpha, const double* drho, T* grad_u0, T* grad_eta0, T* grad_s0,
                       double* dalpha_rows, double* drho_rows) {
  const int64_t off = b0 * H, n = nr * H;  // rows b0 .. b0 + nr - 1 are contiguous
  std::memcpy(grad_u0 + off, du, n * sizeof(T));
  std::memcpy(grad_eta0 + off, deta, n * sizeof(T));
  std::memcpy(grad_s0 + off, ds, n * sizeof(T));
  std::memcpy(dalpha_rows + off, dalpha, n * sizeof(double));
  std::memcpy(drho_rows + off, drho, n * sizeof(double));
}

// Backward kernels process batch rows in blocks of kRowBlock in lockstep over t, so that each
// row of W read for the W^T dI_t products serves every row of the block.
constexpr int64_t kRowBlock = 4;

// ds[r] += W^T dI[r] for the rows of a block (dI[r] [H], kRowBlock pointers; rows past nr
// point at zeros and are not written; W [H, Hp] zero-padded rows). NC 64-byte column chunks
// at a time for all kRowBlock rows: NC * kRowBlock register accumulators, each W row chunk
// read once per block and step.
template <typename T, int NC>
SRNN_INLINE void add_wT_dI_chunks(const T* __restrict w, const T* const* dI, int64_t H, int64_t Hp, int64_t j0,
                                  int64_t nr, T* __restrict ds) {
  using V = typename Vec64<T>::type;
  constexpr int64_t L = 64 / sizeof(T);
  V acc[kRowBlock][NC] = {};
  for (int64_t i = 0; i < H; ++i) {
    const T* __restrict wi = w + i * Hp + j0;
    V wv[NC];
    for (int c = 0; c < NC; ++c) wv[c] = load64(wi + c * L);
    for (int r = 0; r < kRowBlock; ++r) {
      const T d = dI[r][i];
      for (int c = 0; c < NC; ++c) acc[r][c] += d * wv[c];
    }
  }
  for (int64_t r = 0; r < nr; ++r)
    for (int c = 0; c < NC; ++c) {
      T tmp[L];
      store64(tmp, acc[r][c]);
      const int64_t j = j0 + c * L, n = std::min(L, H - j);
      for (int64_t l = 0; l < n; ++l) ds[r * H + j + l] += tmp[l];
    }
}

template <typename T>
SRNN_INLINE void add_wT_dI(const T* w, const T* const* dI, int64_t nr, int64_t H, int64_t Hp, T* ds) {
  constexpr int64_t L = 64 / sizeof(T);
  for (int64_t j0 = 0; j0 < Hp; j0 += 2 * L) {
    if (Hp - j0 >= 2 * L) add_wT_dI_chunks<T, 2>(w, dI, H, Hp, j0, nr, ds);
    else add_wT_dI_chunks<T, 1>(w, dI, H, Hp, j0, nr, ds);
  }
}

}  // namespace
}  // namespace srnn
