// CUDA kernels of the fused SRNN scan: srnn_fast::scan_fwd / scan_bwd for CUDA tensors.
// Contract (shapes, what is saved): srnn_fast/scan.py; neuron math: srnn_neuron.h.
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
// spikes then match the reference exactly). No fast-math intrinsics are used.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>

#include "checks.h"
#include "srnn_neuron.h"

namespace srnn {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFwdThreads = 1024;  // per block, persistent forward
constexpr int kBwdThreads = 512;   // persistent backward: 128 registers a thread, no spills in float64
constexpr int kElemThreads = 256;

SRNN_HD int round_up32(int h) { return (h + 31) / 32 * 32; }

// Spike s_k (0-based step k, i.e. s_{k+1} in the math) of neuron j in row b: a bit of the
// packed words for binary neurons, the saved activation for "relu".
template <typename T>
__device__ __forceinline__ T saved_spike(const int32_t* bits, const T* vals, bool binary, int64_t k, int b, int j,
                                         int B, int H) {
  if (binary) {
    const int nw = (H + 31) / 32;
    const uint32_t w = static_cast<uint32_t>(bits[(k * B + b) * nw + j / 32]);
    return T((w >> (j % 32)) & 1u);
  }
  return vals[(k * B + b) * H + j];
}

// s_{t-1} as the backward step at 0-based k sees it: s_0 (user state) for k = 0.
template <typename T>
__device__ __forceinline__ T prev_spike(const int32_t* bits, const T* vals, const T* s0, bool binary, int64_t k,
                                        int b, int j, int B, int H) {
  return k == 0 ? s0[static_cast<int64_t>(b) * H + j] : saved_spike(bits, vals, binary, k - 1, b, j, B, H);
}

// eta_t for every step of neuron (b, j), written into `eta_out` [T, B, H] (the backward
// uses its grad_x buffer as this scratch: element k is read at step k before grad_x[k]
// overwrites it). Same expression and order as forward_step, so bitwise the forward's eta.
template <typename T>
__device__ __forceinline__ void recompute_eta(T rho, const T* eta0, const T* s0, const int32_t* bits,
                                              const T* vals, bool binary, T* eta_out, int T_, int b, int j, int B,
                                              int H) {
  constexpr int kChunk = 8;  // spikes loaded kChunk steps at a time: that many loads in flight
  const int64_t e = static_cast<int64_t>(b) * H + j, BH = static_cast<int64_t>(B) * H;
  const T one_m_rho = T(1) - rho;  // as make_decay
  T eta = eta0[e];
  for (int64_t k0 = 0; k0 < T_; k0 += kChunk) {
    T s_prev[kChunk];
#pragma unroll
    for (int c = 0; c < kChunk; ++c)
      s_prev[c] = k0 + c < T_ ? prev_spike(bits, vals, s0, binary, k0 + c, b, j, B, H) : T(0);
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      if (k0 + c < T_) {
        eta = rho * eta + one_m_rho * s_prev[c];
        eta_out[(k0 + c) * BH + e] = eta;
      }
    }
  }
}

// --------------------------------------------------------------------------------------
// Forward, persistent. Block (Hp = round_up32(H), rows); thread (i, r) = neuron i of batch
// row b = blockIdx.x * rows + r. Shared memory:
//   wt    [H, H]          W^T (wt[j*H + i] = W[i, j]): row j is what spike j adds
//   sval  [2, rows, H]    s_{t-1} values (dense path), double-buffered by step parity
//   sbits [2, rows, Hp/32] s_{t-1} as ballot words, double-buffered
// Double buffering needs one __syncthreads per step: step k reads buffer k&1 and writes
// (k+1)&1, which every thread finished reading before the barrier ending step k-1.
// --------------------------------------------------------------------------------------
template <typename T, typename X>
__global__ void __launch_bounds__(kFwdThreads)
    fwd_persistent_kernel(const X* __restrict__ x, const T* __restrict__ w, const T* __restrict__ alpha,
                          const T* __restrict__ rho, const T* __restrict__ u0, const T* __restrict__ eta0,
                          const T* __restrict__ s0, T* __restrict__ s_out, T* __restrict__ u_T,
                          T* __restrict__ eta_T, T* __restrict__ u_seq, int32_t* __restrict__ bits_out, int T_,
                          int B, int H, Params<T> p, bool save) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y, nw = blockDim.x / 32;
  T* wt = reinterpret_cast<T*>(smem_raw);                     // [H, H]
  T* sval = wt + static_cast<int64_t>(H) * H;                 // [2, rows, H]
  uint32_t* sbits = reinterpret_cast<uint32_t*>(sval + 2 * rows * H);  // [2, rows, nw]

  const int i = threadIdx.x, r = threadIdx.y, b = blockIdx.x * rows + r;
  const int lane = i % 32, warp = i / 32;
  const bool active = i < H && b < B;
  const int64_t BH = static_cast<int64_t>(B) * H, e = static_cast<int64_t>(b) * H + i;
  const int tid = r * blockDim.x + i, nthreads = rows * blockDim.x;

  for (int64_t idx = tid; idx < static_cast<int64_t>(H) * H; idx += nthreads) {
    const int64_t row = idx / H, col = idx % H;  // W[row, col] -> wt[col, row]; global read coalesced
    wt[col * H + row] = w[idx];
  }
  Decay<T> d{};
  T u = T(0), eta = T(0), sp = T(0);
  if (active) {
    d = make_decay(alpha[i], rho[i], p.r_m);
    u = u0[e];
    eta = eta0[e];
    sp = s0[e];
  }
  if (i < H) sval[r * H + i] = sp;  // buffer 0 holds s_0 (zero for rows past B)
  T x_next = active ? static_cast<T>(x[e]) : T(0);
  __syncthreads();

  for (int k = 0; k < T_; ++k) {
    const int cur = k & 1, nxt = cur ^ 1;
    T s = T(0);
    if (active) {
      const T x_k = x_next;
      if (k + 1 < T_) x_next = static_cast<T>(x[(k + 1) * BH + e]);  // prefetch: hides global latency
      T rec = T(0);
      if (!p.binary || k == 0) {  // dense: relu activations, or s_0 which may be non-binary
        const T* sv = sval + (cur * rows + r) * H;
        for (int j = 0; j < H; ++j) rec += wt[j * H + i] * sv[j];
      } else {  // binary spikes: add the W^T rows of the neurons that spiked, in order of j
        const uint32_t* words = sbits + (cur * rows + r) * nw;
        for (int wd = 0; wd < nw; ++wd) {
          uint32_t m = words[wd];  // same mask for the whole warp: no divergence
          while (m) {
            const int j = wd * 32 + __ffs(m) - 1;
            m &= m - 1;
            rec += wt[j * H + i];
          }
        }
      }
      s = forward_step(p, d, x_k + rec, sp, u, eta);
      s_out[k * BH + e] = s;
      if (save) u_seq[k * BH + e] = u;
      sp = s;
    }
    if (p.binary) {
      const uint32_t m = __ballot_sync(kFullMask, active && s > T(0));  // warps never straddle rows
      if (lane == 0) {
        sbits[(nxt * rows + r) * nw + warp] = m;
        if (save && b < B) bits_out[(static_cast<int64_t>(k) * B + b) * nw + warp] = static_cast<int32_t>(m);
      }
    } else if (i < H) {
      sval[(nxt * rows + r) * H + i] = s;
    }
    __syncthreads();
  }
  if (active) {
    u_T[e] = u;
    eta_T[e] = eta;
  }
}

// --------------------------------------------------------------------------------------
// Forward, stepwise (large H): one neuron step for all (b, i), given rec = s_{t-1} W^T.
// Threads map to (b, i) with rows padded to Hp so that a warp never straddles two rows.
// u and eta are carried in u_T / eta_T.
// --------------------------------------------------------------------------------------
template <typename T, typename X>
__global__ void fwd_step_kernel(const X* __restrict__ x_k, const T* __restrict__ rec, const T* __restrict__ alpha,
                                const T* __restrict__ rho, const T* __restrict__ s_prev, T* __restrict__ u,
                                T* __restrict__ eta, T* __restrict__ s_k, T* __restrict__ u_seq_k,
                                int32_t* __restrict__ bits_k, int B, int H, Params<T> p, bool save) {
  const int Hp = round_up32(H), nw = Hp / 32;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int b = static_cast<int>(g / Hp), i = static_cast<int>(g % Hp);
  const bool active = b < B && i < H;
  T s = T(0);
  if (active) {
    const int64_t e = static_cast<int64_t>(b) * H + i;
    const Decay<T> d = make_decay(alpha[i], rho[i], p.r_m);
    T uu = u[e], ee = eta[e];
    s = forward_step(p, d, static_cast<T>(x_k[e]) + rec[e], s_prev[e], uu, ee);
    u[e] = uu;
    eta[e] = ee;
    s_k[e] = s;
    if (save) u_seq_k[e] = uu;
  }
  if (p.binary && save) {
    const uint32_t m = __ballot_sync(kFullMask, active && s > T(0));
    if (threadIdx.x % 32 == 0 && b < B) bits_k[static_cast<int64_t>(b) * nw + i / 32] = static_cast<int32_t>(m);
  }
}

// --------------------------------------------------------------------------------------
// Backward, persistent. Same thread layout as the forward; thread (j, r) owns neuron j of
// row b. Shared memory:
//   ws  [H, H]        W as is (ws[i*H + j]): W^T dI sums column j over i
//   dI  [2, rows, H]  dI_t of the step just done, double-buffered by step parity; reused
//                     at the end for the per-block reduction of the tau gradients.
// grad_x doubles as eta scratch (see recompute_eta). part_alpha/part_rho [gridDim.x, H]
// receive per-block sums; reduce_parts_kernel adds them.
// --------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kBwdThreads)
    bwd_persistent_kernel(const T* __restrict__ grad_s, const T* __restrict__ grad_u_T,
                          const T* __restrict__ grad_eta_T, const T* __restrict__ w, const T* __restrict__ alpha,
                          const T* __restrict__ rho, const T* __restrict__ u0, const T* __restrict__ eta0,
                          const T* __restrict__ s0, const T* __restrict__ u_seq, const int32_t* __restrict__ bits,
                          const T* __restrict__ vals, T* __restrict__ grad_x, T* __restrict__ part_alpha,
                          T* __restrict__ part_rho, T* __restrict__ grad_u0, T* __restrict__ grad_eta0,
                          T* __restrict__ grad_s0, int T_, int B, int H, Params<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = blockDim.y;
  T* ws = reinterpret_cast<T*>(smem_raw);      // [H, H]
  T* dI = ws + static_cast<int64_t>(H) * H;    // [2, rows, H]

  const int j = threadIdx.x, r = threadIdx.y, b = blockIdx.x * rows + r;
  const bool active = j < H && b < B;
  const int64_t BH = static_cast<int64_t>(B) * H, e = static_cast<int64_t>(b) * H + j;
  const int tid = r * blockDim.x + j, nthreads = rows * blockDim.x;
  for (int64_t idx = tid; idx < static_cast<int64_t>(H) * H; idx += nthreads) ws[idx] = w[idx];

  Decay<T> d{};
  T du = T(0), deta = T(0), ds_local = T(0), acc_alpha = T(0), acc_rho = T(0), u = T(0), eta = T(0);
  if (active) {
    d = make_decay(alpha[j], rho[j], p.r_m);
    recompute_eta(d.rho, eta0, s0, bits, vals, p.binary, grad_x, T_, b, j, B, H);
    du = grad_u_T[e];
    deta = grad_eta_T[e];
    u = u_seq[(T_ - 1) * BH + e];
    eta = grad_x[(T_ - 1) * BH + e];
  }
  __syncthreads();  // ws complete

  for (int k = T_ - 1; k >= 0; --k) {
    const int cur = k & 1, prev = cur ^ 1;  // step k+1 wrote buffer prev
    // This step's global loads go out before the matvec so that it hides their latency.
    T u_prev = T(0), eta_prev = T(0), s_prev = T(0), gs_k = T(0);
    if (active) {
      u_prev = k > 0 ? u_seq[(k - 1) * BH + e] : u0[e];
      eta_prev = k > 0 ? grad_x[(k - 1) * BH + e] : eta0[e];
      s_prev = prev_spike(bits, vals, s0, p.binary, k, b, j, B, H);
      gs_k = grad_s[k * BH + e];
    }
    T rec = T(0);
    if (k + 1 < T_) {
      const T* di = dI + (prev * rows + r) * H;
      if (j < H)
        for (int i = 0; i < H; ++i) rec += ws[i * H + j] * di[i];
    }
    T d_current = T(0);
    if (active) {
      const T g_s = gs_k + (rec + ds_local);
      const StepGrads<T> g = backward_step(p, d, u_prev, u, eta_prev, eta, s_prev, g_s, du, deta);
      d_current = g.d_current;
      grad_x[k * BH + e] = d_current;
      ds_local = g.ds_prev;
      acc_alpha += g.dalpha_num;
      acc_rho += g.drho;
      u = u_prev;
      eta = eta_prev;
    }
    if (j < H) dI[(cur * rows + r) * H + j] = d_current;
    __syncthreads();
  }
  // Buffer 0 now holds dI_1: ds_0 = W^T dI_1 + the local term.
  T rec = T(0);
  if (j < H)
    for (int i = 0; i < H; ++i) rec += ws[i * H + j] * dI[r * H + i];
  if (active) {
    grad_s0[e] = rec + ds_local;
    grad_u0[e] = du;
    grad_eta0[e] = deta;
  }
  __syncthreads();  // everyone is done reading dI: reuse it for the block's reduction
  T* red = dI;      // [2, rows, H]
  if (j < H) {
    red[r * H + j] = acc_alpha;  // zero for rows past B
    red[(rows + r) * H + j] = acc_rho;
  }
  __syncthreads();
  if (r == 0 && j < H) {
    T sa = T(0), sr = T(0);
    for (int rr = 0; rr < rows; ++rr) {  // fixed order: deterministic
      sa += red[rr * H + j];
      sr += red[(rows + rr) * H + j];
    }
    part_alpha[static_cast<int64_t>(blockIdx.x) * H + j] = sa;
    part_rho[static_cast<int64_t>(blockIdx.x) * H + j] = sr;
  }
}

// --------------------------------------------------------------------------------------
// Backward, stepwise (large H). eta_kernel fills the eta scratch (grad_x); bwd_step_kernel
// does step k for all (b, j) given rec = dI_{k+1} W (null at the last step). du, deta,
// ds_local, acc_alpha, acc_rho [B, H] carry the per-element state between launches.
// --------------------------------------------------------------------------------------
template <typename T>
__global__ void eta_kernel(const T* __restrict__ rho, const T* __restrict__ eta0, const T* __restrict__ s0,
                           const int32_t* __restrict__ bits, const T* __restrict__ vals, T* __restrict__ eta_out,
                           int T_, int B, int H, Params<T> p) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= static_cast<int64_t>(B) * H) return;
  const int b = static_cast<int>(g / H), j = static_cast<int>(g % H);
  recompute_eta(rho[j], eta0, s0, bits, vals, p.binary, eta_out, T_, b, j, B, H);
}

template <typename T>
__global__ void bwd_step_kernel(int k, const T* __restrict__ grad_s, const T* __restrict__ rec,
                                const T* __restrict__ alpha, const T* __restrict__ rho, const T* __restrict__ u0,
                                const T* __restrict__ eta0, const T* __restrict__ s0, const T* __restrict__ u_seq,
                                const int32_t* __restrict__ bits, const T* __restrict__ vals, T* __restrict__ grad_x,
                                T* __restrict__ du, T* __restrict__ deta, T* __restrict__ ds_local,
                                T* __restrict__ acc_alpha, T* __restrict__ acc_rho, int B, int H, Params<T> p) {
  const int64_t BH = static_cast<int64_t>(B) * H;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= BH) return;
  const int b = static_cast<int>(e / H), j = static_cast<int>(e % H);
  const Decay<T> d = make_decay(alpha[j], rho[j], p.r_m);
  const T u = u_seq[k * BH + e];
  const T u_prev = k > 0 ? u_seq[(k - 1) * BH + e] : u0[e];
  const T eta = grad_x[k * BH + e];  // scratch: eta_{k+1}, overwritten below by dI
  const T eta_prev = k > 0 ? grad_x[(k - 1) * BH + e] : eta0[e];
  const T s_prev = prev_spike(bits, vals, s0, p.binary, k, b, j, B, H);
  const T g_s = grad_s[k * BH + e] + ((rec != nullptr ? rec[e] : T(0)) + ds_local[e]);
  T du_e = du[e], deta_e = deta[e];
  const StepGrads<T> g = backward_step(p, d, u_prev, u, eta_prev, eta, s_prev, g_s, du_e, deta_e);
  du[e] = du_e;
  deta[e] = deta_e;
  grad_x[k * BH + e] = g.d_current;
  ds_local[e] = g.ds_prev;
  acc_alpha[e] += g.dalpha_num;
  acc_rho[e] += g.drho;
}

// grad_alpha[j] = sum_p part_alpha[p, j] / (1 - alpha[j]) (see backward_step), grad_rho
// likewise without the division; parts summed in a fixed order.
template <typename T>
__global__ void reduce_parts_kernel(const T* __restrict__ part_alpha, const T* __restrict__ part_rho,
                                    const T* __restrict__ alpha, int nparts, int H, T* __restrict__ grad_alpha,
                                    T* __restrict__ grad_rho) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= H) return;
  T sa = T(0), sr = T(0);
  for (int q = 0; q < nparts; ++q) {
    sa += part_alpha[static_cast<int64_t>(q) * H + j];
    sr += part_rho[static_cast<int64_t>(q) * H + j];
  }
  grad_alpha[j] = sa / (T(1) - alpha[j]);
  grad_rho[j] = sr;
}

// --------------------------------------------------------------------------------------
// Host side
// --------------------------------------------------------------------------------------
int blocks_for(int64_t n, int threads) { return static_cast<int>((n + threads - 1) / threads); }

// With SRNN_FAST_POISON=1 every output starts as NaN (spike words as all ones), so
// the tests catch any element a kernel forgets to write; otherwise outputs are uninitialised.
bool poison_outputs() {
  const char* v = std::getenv("SRNN_FAST_POISON");
  return v != nullptr && v[0] == '1';
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (!poison_outputs()) return at::empty(sizes, opts);
  if (opts.dtype() == at::kInt) return at::full(sizes, -1, opts);
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), opts);
}

struct DeviceInfo {
  int max_smem;  // dynamic shared memory one block of the kernel may request, bytes
  int sms;
};

// The opt-in shared memory per block less the kernel's static shared memory: their sum may
// not exceed the opt-in limit (cudaFuncSetAttribute fails otherwise).
template <typename Kernel>
DeviceInfo device_info(int device, Kernel kernel) {
  DeviceInfo info{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  info.max_smem -= static_cast<int>(attr.sharedSizeBytes);
  return info;
}

size_t fwd_smem_bytes(int H, int rows, size_t elem) {
  const int nw = round_up32(H) / 32;
  return (static_cast<size_t>(H) * H + 2 * static_cast<size_t>(rows) * H) * elem + 2 * static_cast<size_t>(rows) * nw * 4;
}

size_t bwd_smem_bytes(int H, int rows, size_t elem) {
  return (static_cast<size_t>(H) * H + 2 * static_cast<size_t>(rows) * H) * elem;
}

// Rows per block of a persistent kernel, or 0 when W_rec does not fit (stepwise path).
// Enough rows per block to cover B with about one block per SM (each block then keeps its
// own copy of W resident), within max_threads and the shared-memory limit.
template <typename SmemFn>
int persistent_rows(int B, int H, size_t elem, int max_threads, const DeviceInfo& info, SmemFn smem_bytes) {
  const int Hp = round_up32(H);
  if (Hp > max_threads || smem_bytes(H, 1, elem) > static_cast<size_t>(info.max_smem)) return 0;
  int rows = std::max(1, (B + info.sms - 1) / info.sms);
  rows = std::min(rows, max_threads / Hp);
  while (rows > 1 && smem_bytes(H, rows, elem) > static_cast<size_t>(info.max_smem)) --rows;
  return rows;
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

void check_common(const at::Tensor& w_rec, const at::Tensor& alpha, const at::Tensor& rho, const at::Tensor& u0,
                  const at::Tensor& eta0, const at::Tensor& s0, int64_t B, int64_t H) {
  TORCH_CHECK(w_rec.defined() && w_rec.device().is_cuda(), "srnn_fast: the CUDA kernels need CUDA tensors; w_rec is ",
              w_rec.defined() ? describe(w_rec) : std::string("an undefined tensor"));
  check_scan_params(w_rec, alpha, rho, u0, eta0, s0, B, H, w_rec.device());
  TORCH_CHECK(H <= std::numeric_limits<int>::max() / 32 && B <= std::numeric_limits<int>::max(),
              "srnn_fast: B and H must fit 32-bit indices; got B = ", B, ", H = ", H);
}

template <typename T, typename X>
void launch_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& rho,
                const at::Tensor& u0, const at::Tensor& eta0, const at::Tensor& s0, const at::Tensor& s,
                const at::Tensor& u_T, const at::Tensor& eta_T, const at::Tensor& u_seq, const at::Tensor& bits,
                const Params<T>& p, bool save) {
  const int T_ = static_cast<int>(x.size(0)), B = static_cast<int>(x.size(1)), H = static_cast<int>(x.size(2));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DeviceInfo info = device_info(x.get_device(), fwd_persistent_kernel<T, X>);
  const int rows = persistent_rows(B, H, sizeof(T), kFwdThreads, info, fwd_smem_bytes);
  const X* xp = x.data_ptr<X>();
  int32_t* bp = save && p.binary ? bits.data_ptr<int32_t>() : nullptr;
  T* usp = save ? u_seq.data_ptr<T>() : nullptr;
  if (rows > 0) {
    const size_t smem = fwd_smem_bytes(H, rows, sizeof(T));
    auto kernel = fwd_persistent_kernel<T, X>;
    allow_smem(kernel, smem);
    const dim3 block(round_up32(H), rows);
    kernel<<<blocks_for(B, rows), block, smem, stream>>>(
        xp, w.data_ptr<T>(), alpha.data_ptr<T>(), rho.data_ptr<T>(), u0.data_ptr<T>(), eta0.data_ptr<T>(),
        s0.data_ptr<T>(), s.data_ptr<T>(), u_T.data_ptr<T>(), eta_T.data_ptr<T>(), usp, bp, T_, B, H, p, save);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Stepwise: rec = s_{t-1} W^T by GEMM, then the neuron update. u/eta live in u_T/eta_T.
  u_T.copy_(u0);
  eta_T.copy_(eta0);
  const at::Tensor w_t = w.t();
  at::Tensor rec = at::empty({B, H}, w.options());
  const int64_t BH = static_cast<int64_t>(B) * H, nw = spike_words(H);
  const int grid = blocks_for(static_cast<int64_t>(B) * round_up32(H), kElemThreads);
  for (int k = 0; k < T_; ++k) {
    const at::Tensor s_prev = k == 0 ? s0 : s[k - 1];
    at::mm_out(rec, s_prev, w_t);
    fwd_step_kernel<T, X><<<grid, kElemThreads, 0, stream>>>(
        xp + k * BH, rec.data_ptr<T>(), alpha.data_ptr<T>(), rho.data_ptr<T>(), s_prev.data_ptr<T>(),
        u_T.data_ptr<T>(), eta_T.data_ptr<T>(), s.data_ptr<T>() + k * BH, usp ? usp + k * BH : nullptr,
        bp ? bp + static_cast<int64_t>(k) * B * nw : nullptr, B, H, p, save);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_fwd_cuda(
    const at::Tensor& x_proj, const at::Tensor& w_rec, const at::Tensor& alpha, const at::Tensor& rho,
    const at::Tensor& u0, const at::Tensor& eta0, const at::Tensor& s0, bool binary, double b0, double beta,
    double dt, double r_m, bool save) {
  TORCH_CHECK(x_proj.dim() == 3 && x_proj.size(0) >= 1 && x_proj.size(1) >= 1 && x_proj.size(2) >= 1,
              "srnn_fast: x_proj must be [T, B, H] with T, B, H >= 1; got ", describe(x_proj));
  const int64_t T_ = x_proj.size(0), B = x_proj.size(1), H = x_proj.size(2);
  TORCH_CHECK(T_ <= std::numeric_limits<int>::max(), "srnn_fast: T must fit a 32-bit index; got ", describe(x_proj));
  check_common(w_rec, alpha, rho, u0, eta0, s0, B, H);
  check_x_dtype(x_proj, w_rec.scalar_type());
  TORCH_CHECK(x_proj.device() == w_rec.device(), "srnn_fast: x_proj must be on ", w_rec.device(),
              " like w_rec; got ", describe(x_proj));
  TORCH_CHECK(T_ * B * H < std::numeric_limits<int64_t>::max() / 8, "srnn_fast: x_proj is too large: ",
              describe(x_proj));
  const c10::cuda::CUDAGuard guard(x_proj.device());

  const at::Tensor x = x_proj.contiguous(), w = w_rec.contiguous(), a = alpha.contiguous(), r = rho.contiguous();
  const at::Tensor u0c = u0.contiguous(), eta0c = eta0.contiguous(), s0c = s0.contiguous();
  const auto opts = w.options();
  at::Tensor s = new_output({T_, B, H}, opts);
  at::Tensor u_T = new_output({B, H}, opts), eta_T = new_output({B, H}, opts);
  at::Tensor u_seq = save ? new_output({T_, B, H}, opts) : at::empty({0}, opts);
  at::Tensor bits = save && binary ? new_output({T_, B, spike_words(H)}, opts.dtype(at::kInt))
                                   : at::empty({0}, opts.dtype(at::kInt));

  const auto xt = x.scalar_type();
  if (w.scalar_type() == at::kDouble) {
    launch_fwd<double, double>(x, w, a, r, u0c, eta0c, s0c, s, u_T, eta_T, u_seq, bits,
                               make_params<double>(binary, b0, beta, dt, r_m), save);
  } else if (xt == at::kFloat) {
    launch_fwd<float, float>(x, w, a, r, u0c, eta0c, s0c, s, u_T, eta_T, u_seq, bits,
                             make_params<float>(binary, b0, beta, dt, r_m), save);
  } else if (xt == at::kHalf) {
    launch_fwd<float, at::Half>(x, w, a, r, u0c, eta0c, s0c, s, u_T, eta_T, u_seq, bits,
                                make_params<float>(binary, b0, beta, dt, r_m), save);
  } else {
    launch_fwd<float, at::BFloat16>(x, w, a, r, u0c, eta0c, s0c, s, u_T, eta_T, u_seq, bits,
                                    make_params<float>(binary, b0, beta, dt, r_m), save);
  }
  return {s, u_T, eta_T, u_seq, bits};
}

template <typename T>
void launch_bwd(const at::Tensor& grad_s, const at::Tensor& grad_u_T, const at::Tensor& grad_eta_T,
                const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& rho, const at::Tensor& u0,
                const at::Tensor& eta0, const at::Tensor& s0, const at::Tensor& u_seq, const at::Tensor& spikes,
                const at::Tensor& grad_x, const at::Tensor& grad_alpha, const at::Tensor& grad_rho,
                const at::Tensor& grad_u0, const at::Tensor& grad_eta0, const at::Tensor& grad_s0,
                const Params<T>& p) {
  const int T_ = static_cast<int>(u_seq.size(0)), B = static_cast<int>(u_seq.size(1)), H = static_cast<int>(u_seq.size(2));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DeviceInfo info = device_info(u_seq.get_device(), bwd_persistent_kernel<T>);
  const int rows = persistent_rows(B, H, sizeof(T), kBwdThreads, info, bwd_smem_bytes);
  const int32_t* bits = p.binary ? spikes.data_ptr<int32_t>() : nullptr;
  const T* vals = p.binary ? nullptr : spikes.data_ptr<T>();
  const int red_grid = blocks_for(H, kElemThreads);
  if (rows > 0) {
    const int grid = blocks_for(B, rows);
    at::Tensor part_alpha = at::empty({grid, H}, w.options()), part_rho = at::empty({grid, H}, w.options());
    const size_t smem = bwd_smem_bytes(H, rows, sizeof(T));
    auto kernel = bwd_persistent_kernel<T>;
    allow_smem(kernel, smem);
    kernel<<<grid, dim3(round_up32(H), rows), smem, stream>>>(
        grad_s.data_ptr<T>(), grad_u_T.data_ptr<T>(), grad_eta_T.data_ptr<T>(), w.data_ptr<T>(), alpha.data_ptr<T>(),
        rho.data_ptr<T>(), u0.data_ptr<T>(), eta0.data_ptr<T>(), s0.data_ptr<T>(), u_seq.data_ptr<T>(), bits, vals,
        grad_x.data_ptr<T>(), part_alpha.data_ptr<T>(), part_rho.data_ptr<T>(), grad_u0.data_ptr<T>(),
        grad_eta0.data_ptr<T>(), grad_s0.data_ptr<T>(), T_, B, H, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_parts_kernel<T><<<red_grid, kElemThreads, 0, stream>>>(
        part_alpha.data_ptr<T>(), part_rho.data_ptr<T>(), alpha.data_ptr<T>(), grid, H, grad_alpha.data_ptr<T>(),
        grad_rho.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Stepwise: eta into the grad_x scratch, then t = T..1 with rec = dI_{t+1} W by GEMM.
  const int64_t BH = static_cast<int64_t>(B) * H;
  const int grid = blocks_for(BH, kElemThreads);
  eta_kernel<T><<<grid, kElemThreads, 0, stream>>>(rho.data_ptr<T>(), eta0.data_ptr<T>(), s0.data_ptr<T>(), bits,
                                                    vals, grad_x.data_ptr<T>(), T_, B, H, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_u0.copy_(grad_u_T);  // du, deta carried in the outputs
  grad_eta0.copy_(grad_eta_T);
  at::Tensor ds_local = at::zeros({B, H}, w.options());
  at::Tensor acc_alpha = at::zeros({B, H}, w.options()), acc_rho = at::zeros({B, H}, w.options());
  at::Tensor rec = at::empty({B, H}, w.options());
  for (int k = T_ - 1; k >= 0; --k) {
    const bool has_rec = k + 1 < T_;
    if (has_rec) at::mm_out(rec, grad_x[k + 1], w);  // (dI_{k+1} W)[b, j] = sum_i dI[b, i] W[i, j]
    bwd_step_kernel<T><<<grid, kElemThreads, 0, stream>>>(
        k, grad_s.data_ptr<T>(), has_rec ? rec.data_ptr<T>() : nullptr, alpha.data_ptr<T>(), rho.data_ptr<T>(),
        u0.data_ptr<T>(), eta0.data_ptr<T>(), s0.data_ptr<T>(), u_seq.data_ptr<T>(), bits, vals,
        grad_x.data_ptr<T>(), grad_u0.data_ptr<T>(), grad_eta0.data_ptr<T>(), ds_local.data_ptr<T>(),
        acc_alpha.data_ptr<T>(), acc_rho.data_ptr<T>(), B, H, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor s0_out = grad_s0;  // mm_out takes a mutable reference
  at::mm_out(s0_out, grad_x[0], w);
  s0_out.add_(ds_local);
  reduce_parts_kernel<T><<<red_grid, kElemThreads, 0, stream>>>(acc_alpha.data_ptr<T>(), acc_rho.data_ptr<T>(),
                                                                alpha.data_ptr<T>(), B, H, grad_alpha.data_ptr<T>(),
                                                                grad_rho.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd_cuda(
    const at::Tensor& grad_s, const at::Tensor& grad_u_T, const at::Tensor& grad_eta_T, const at::Tensor& w_rec,
    const at::Tensor& alpha, const at::Tensor& rho, const at::Tensor& u0, const at::Tensor& eta0,
    const at::Tensor& s0, const at::Tensor& u_seq, const at::Tensor& spikes, bool binary, int64_t surrogate,
    double b0, double beta, double dt, double r_m, double sigma, double gamma, bool need_grad_tau) {
  TORCH_CHECK(u_seq.dim() == 3 && u_seq.size(0) >= 1 && u_seq.size(1) >= 1 && u_seq.size(2) >= 1,
              "srnn_fast: u_seq must be [T, B, H] with T, B, H >= 1 (forward run with save=True); got ",
              describe(u_seq));
  const int64_t T_ = u_seq.size(0), B = u_seq.size(1), H = u_seq.size(2);
  TORCH_CHECK(T_ <= std::numeric_limits<int>::max(), "srnn_fast: T must fit a 32-bit index; got ", describe(u_seq));
  check_common(w_rec, alpha, rho, u0, eta0, s0, B, H);
  check_surrogate(surrogate);
  const auto dt_ = w_rec.scalar_type();
  const auto dev = w_rec.device();
  check_input(u_seq, "u_seq", {T_, B, H}, "[T, B, H]", dt_, dev);
  check_backward_inputs(grad_s, grad_u_T, grad_eta_T, spikes, binary, T_, B, H, dt_, dev);
  const c10::cuda::CUDAGuard guard(dev);

  const at::Tensor gs = grad_s.contiguous(), gu = grad_u_T.contiguous(), ge = grad_eta_T.contiguous();
  const at::Tensor w = w_rec.contiguous(), a = alpha.contiguous(), r = rho.contiguous();
  const at::Tensor u0c = u0.contiguous(), eta0c = eta0.contiguous(), s0c = s0.contiguous();
  const at::Tensor us = u_seq.contiguous(), sp = spikes.contiguous();
  const auto opts = w.options();
  at::Tensor grad_x = new_output({T_, B, H}, opts);
  at::Tensor grad_alpha = new_output({H}, opts), grad_rho = new_output({H}, opts);
  at::Tensor grad_u0 = new_output({B, H}, opts), grad_eta0 = new_output({B, H}, opts);
  at::Tensor grad_s0 = new_output({B, H}, opts);
  const int sur = static_cast<int>(surrogate);
  if (w.scalar_type() == at::kDouble) {
    launch_bwd<double>(gs, gu, ge, w, a, r, u0c, eta0c, s0c, us, sp, grad_x, grad_alpha, grad_rho, grad_u0,
                       grad_eta0, grad_s0, make_params<double>(binary, b0, beta, dt, r_m, sigma, gamma, sur));
  } else {
    launch_bwd<float>(gs, gu, ge, w, a, r, u0c, eta0c, s0c, us, sp, grad_x, grad_alpha, grad_rho, grad_u0,
                      grad_eta0, grad_s0, make_params<float>(binary, b0, beta, dt, r_m, sigma, gamma, sur));
  }
  if (!need_grad_tau) {  // the contract's [0] tau grads (computed anyway: the reduction is cheap here)
    grad_alpha = at::empty({0}, opts);
    grad_rho = at::empty({0}, opts);
  }
  return {grad_x, grad_alpha, grad_rho, grad_u0, grad_eta0, grad_s0};
}

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
  const DeviceInfo info{static_cast<int>(max_smem), static_cast<int>(sms)};
  const size_t elem = double_precision ? sizeof(double) : sizeof(float);
  const int b = static_cast<int>(B), h = static_cast<int>(H);
  const int rows = forward ? persistent_rows(b, h, elem, kFwdThreads, info, fwd_smem_bytes)
                           : persistent_rows(b, h, elem, kBwdThreads, info, bwd_smem_bytes);
  const size_t smem = rows == 0 ? 0 : forward ? fwd_smem_bytes(h, rows, elem) : bwd_smem_bytes(h, rows, elem);
  return {rows, static_cast<int64_t>(rows) * round_up32(h), static_cast<int64_t>(smem)};
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
  m.impl("scan_fwd", &srnn::scan_fwd_cuda);
  m.impl("scan_bwd", &srnn::scan_bwd_cuda);
}
