// Device code of the fused SRNN scan on CUDA: the kernels and their device helpers.
//
// Compiled twice from this one source: by nvcc in scan_cuda.cu (the GPU kernels), and by the
// host C++ compiler in sim/cuda_sim.cpp, where csrc/gpu_compat.h maps the CUDA constructs onto
// the execution harness (backend "cuda_sim", tests only). Use only what gpu_compat.h lists.
// The paths, the shared-memory layouts and the rounding rules: scan_cuda.cu.
#pragma once

#include <cstdint>

#include "cuda_plan.h"
#include "gpu_compat.h"
#include "srnn_neuron.h"

namespace srnn {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

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
  SRNN_DYNAMIC_SMEM(smem_raw);
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
  SRNN_DYNAMIC_SMEM(smem_raw);
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

}  // namespace
}  // namespace srnn
