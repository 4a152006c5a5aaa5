// CPU kernels of the fused SRNN *layer*: the input projection x_t W_in^T + b and the
// recurrence of one layer over the whole sequence, forward and backward, in one op each.
//
// Against the scan ops (x_proj given) the layer ops:
// - compute the input current inside the kernel, a block of rows and a step at a time while
//   the rows are in cache: summing the W_in columns of the nonzero inputs only (spikes are
//   sparse), or all of them in register tiles (dense inputs); no [T, B, H] x_proj is written;
// - save for backward only the spike bits and the state (u, eta) every `ckpt_every` steps.
//   Backward recomputes each segment of steps from its checkpoint with the same code as the
//   forward (bit for bit: same inputs, same order of operations), then runs the segment
//   backwards, and sums dW_in, db and dW_rec and forms dL/dx = dI W_in inside the kernel
//   while the segment's dI is in cache (dI is never written to memory).
// Everything dense in here is a block's rows times a matrix (rows_times_matrix) or the dW_in
// sums of DenseInputGrads, each sum in one fixed order: results do not depend on the thread
// count, and the avx2 and avx512 builds agree bit for bit. Only the default build hands the
// projection and dL/dx to the BLAS (blas_dense_products).
// Contract: srnn_fast/layer.py. Neuron math: srnn_neuron.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu_kernels.h"

namespace srnn {
namespace {

template <typename T>
struct LayerArgs {
  const T* x;         // [T, B, I] layer input
  const T* xp;        // [T, B, H]: x W_in^T + b by one GEMM (dense inputs, default build), or null
  const T* winT;      // [I, Hp]: W_in^T, rows zero-padded (row k = column k of W_in)
  const T* win;       // [H, Ip]: W_in, rows zero-padded (backward with dL/dx: dI W_in), or null
  const T* bias;      // [Hp] (zeros without a bias)
  const T* wT;        // [H, Hp]: W_rec^T (forward: sums over active columns)
  const T* w;         // [H, Hp]: W_rec (backward: W^T dI)
  const T* u0;        // [B, H]
  const T* eta0;      // [B, H]
  const T* s0;        // [B, H], any real values (user state)
  const T* zeros;     // max(I, H) zeros: the rows past a block's last in rows_times_matrix
  int64_t T_, B, H, Hp, I, Ip, K;  // K: steps per checkpoint segment (0: save nothing)
};

// The nonzero inputs x_t and the active previous spikes of one step (their indices), kept
// by the backward's recomputation for the dW_in and dW_rec sums of the same step. The
// caller fills s and ns (from spike bits where it has them), input_current x and nx.
struct Active {
  int32_t* x;    // [I]
  int32_t* s;    // [H]
  int64_t nx, ns;
};

// b + W_in x_t for the nr (<= kFwdRowBlock) rows of dense inputs at x_rows0 (rows of I
// values, adjacent) into proj [nr, Hp]: rows_times_matrix, kRowBlock rows at a time. Called out
// of line (run_build), as are the other dense products below.
template <typename T>
struct DenseInputCurrent {
  template <Isa ISA>
  static void run(const LayerArgs<T>& a, const T* x_rows0, int64_t nr, T* proj) {
    for (int64_t r0 = 0; r0 < nr; r0 += kRowBlock) {
      const T* xr[kRowBlock];
      T* out[kRowBlock];
      for (int64_t r = 0; r < kRowBlock; ++r) {
        xr[r] = r0 + r < nr ? x_rows0 + (r0 + r) * a.I : a.zeros;
        out[r] = proj + (r0 + r) * a.Hp;
      }
      rows_times_matrix<ISA, T>(a.winT, a.Hp, a.I, xr, std::min<int64_t>(kRowBlock, nr - r0), a.Hp, a.bias, out);
    }
  }
};

// rows[r] -> b + W_in x_t [H] for the nr (<= kFwdRowBlock) adjacent rows row0 + r of one step,
// in proj [nr, Hp] or (default build, dense inputs) the rows of x_proj: the single definition
// used by the forward and by the backward's recomputation (so both round alike). DENSE inputs
// (dense_input(x), a template parameter of the kernels, so the sparse ones carry no dense
// code): DenseInputCurrent over every input; sparse ones: a sum over the nonzero inputs of
// each row, whose indices go to act[r * stride] for the backward's dW_in sums.
template <Isa ISA, typename T, bool DENSE>
SRNN_INLINE void input_current(const LayerArgs<T>& a, int64_t row0, int64_t nr, Active* act, int64_t stride,
                               T* proj, const T** rows) {
  for (int64_t r = 0; r < nr; ++r) rows[r] = a.xp != nullptr ? a.xp + (row0 + r) * a.H : proj + r * a.Hp;
  if constexpr (DENSE) {
    if (a.xp == nullptr) run_build<ISA, DenseInputCurrent<T>>(a, a.x + row0 * a.I, nr, proj);
    for (int64_t r = 0; r < nr; ++r) act[r * stride].nx = 0;
  } else {
    for (int64_t r = 0; r < nr; ++r) {
      const T* xt = a.x + (row0 + r) * a.I;
      Active& ar = act[r * stride];
      ar.nx = nonzero_index<ISA>(xt, a.I, ar.x);
      sum_rows<ISA, T, false>(a.winT, a.Hp, ar.x, ar.nx, xt, a.bias, proj + r * a.Hp);
    }
  }
}

// One step of one row from its input current proj = b + W_in x_t (input_current): I_t = proj
// + W_rec s_{t-1} (over act.s, the active s_{t-1}; rec [Hp] scratch); u, eta advance from
// u_in, eta_in (the same arrays in the forward); s_t out, and its bits (or null). The forward and the backward's recomputation both run it.
template <Isa ISA, typename T>
SRNN_INLINE void layer_step(const LayerArgs<T>& a, const Params<T>& p, const Neurons<T>& nrn, const T* proj,
                            const T* s_prev, const Active& act, T* rec, const T* u_in, const T* eta_in, T* u,
                            T* eta, T* s, int32_t* bits = nullptr) {
  recurrent_input<ISA>(a.wT, s_prev, act.s, act.ns, false, a.Hp, rec);
  forward_neurons<ISA>(p, nrn, a.H, proj, rec, s_prev, u_in, eta_in, u, eta, s, bits);
}

// ---------------------------------------------------------------------------------------
// Forward: rows [b_begin, b_end) over all T steps.
// ---------------------------------------------------------------------------------------
template <typename T>
struct LayerOut {
  T* s;            // [T, B, H]
  T* u_T;          // [B, H]
  T* eta_T;        // [B, H]
  T* u_ckpt;       // [C, B, H]: u after c * K steps (null: save nothing)
  T* eta_ckpt;     // [C, B, H]
  int32_t* bits;   // [T, B, W] (binary and saving) or null
};

template <Isa ISA, typename T, bool BINARY, bool DENSE>
SRNN_INLINE void layer_forward_rows(const LayerArgs<T>& a, const LayerOut<T>& o, const Params<T>& params,
                                    const Neurons<T>& nrn, int64_t b_begin, int64_t b_end) {
  Params<T> p = params;
  p.binary = BINARY;
  const int64_t H = a.H, B = a.B, W = spike_words(H), R = kFwdRowBlock;
  std::vector<T> u(R * H), eta(R * H), proj(R * a.Hp), rec(a.Hp);
  std::vector<int32_t> xidx(a.I), sidx(R * H), words(W);
  std::vector<Active> act(R);
  for (int64_t r = 0; r < R; ++r) act[r] = Active{xidx.data(), sidx.data() + r * H, 0, 0};  // x: used at once
  const T* s_prev[kFwdRowBlock];
  const T* proj_rows[kFwdRowBlock];
  for (int64_t b0 = b_begin; b0 < b_end; b0 += R) {  // rows b0 .. b0 + nr - 1 in lockstep over t
    const int64_t nr = std::min(R, b_end - b0);
    std::memcpy(u.data(), a.u0 + b0 * H, nr * H * sizeof(T));
    std::memcpy(eta.data(), a.eta0 + b0 * H, nr * H * sizeof(T));
    for (int64_t r = 0; r < nr; ++r) {
      s_prev[r] = a.s0 + (b0 + r) * H;
      act[r].ns = nonzero_index<ISA>(s_prev[r], H, act[r].s);  // s0: user state, any real values
    }
    for (int64_t t = 0; t < a.T_; ++t) {
      const int64_t row0 = t * B + b0;  // the block's rows of step t are contiguous
      if (o.u_ckpt != nullptr && t % a.K == 0) {
        const int64_t c = (t / a.K) * B + b0;
        std::memcpy(o.u_ckpt + c * H, u.data(), nr * H * sizeof(T));
        std::memcpy(o.eta_ckpt + c * H, eta.data(), nr * H * sizeof(T));
      }
      if (t + kPrefetchSteps < a.T_) {  // one prefetch run per block and step: shared pages, fewer TLB walks
        const int64_t ahead = row0 + kPrefetchSteps * B;
        if (a.xp != nullptr) prefetch_row(a.xp + ahead * H, nr * H * sizeof(T));
        else prefetch_row(a.x + ahead * a.I, nr * a.I * sizeof(T));
        prefetch_row<true>(o.s + ahead * H, nr * H * sizeof(T));
      }
      input_current<ISA, T, DENSE>(a, row0, nr, act.data(), 1, proj.data(), proj_rows);
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = row0 + r;
        T* st = o.s + row * H;
        T* ur = u.data() + r * H;
        T* er = eta.data() + r * H;
        int32_t* bits = o.bits != nullptr ? o.bits + row * W : words.data();
        layer_step<ISA>(a, p, nrn, proj_rows[r], s_prev[r], act[r], rec.data(), ur, er, ur, er, st,
                        BINARY ? bits : nullptr);
        if (BINARY) {  // the next step's active set from the bits: cost follows the spike count
          act[r].ns = bit_index(bits, W, act[r].s);
        } else {
          act[r].ns = nonzero_index<ISA>(st, H, act[r].s);
        }
        s_prev[r] = st;
      }
    }
    std::memcpy(o.u_T + b0 * H, u.data(), nr * H * sizeof(T));
    std::memcpy(o.eta_T + b0 * H, eta.data(), nr * H * sizeof(T));
  }
}

// The kernel of cpu_isa.h's run_kernel: built once per instruction set.
template <typename T, bool BINARY, bool DENSE>
struct LayerForward : CpuKernel<T> {
  template <Isa ISA>
  static void run(const LayerArgs<T>& a, const LayerOut<T>& o, const Params<T>& p, const Neurons<T>& n, int64_t b,
                  int64_t e) {
    layer_forward_rows<ISA, T, BINARY, DENSE>(a, o, p, n, b, e);
  }
};

// ---------------------------------------------------------------------------------------
// Backward: blocks of kRowBlock rows in lockstep, segments of K steps from the last.
// ---------------------------------------------------------------------------------------
template <typename T>
struct LayerGrads {
  const T* grad_s;      // [T, B, H]
  const T* grad_u_T;    // [B, H]
  const T* grad_eta_T;  // [B, H]
  const T* u_ckpt;      // [C, B, H]
  const T* eta_ckpt;    // [C, B, H]
  const int32_t* bits;  // [T, B, W] (binary) or null
  const T* s_seq;       // [T, B, H] (relu) or null
  T* grad_x;            // [T, B, I]: dL/dx_t = dI_t W_in, row by row as dI_t is found; or null
  T* dI;                // [T, B, H]: dL/dI_t for dL/dx by one GEMM afterwards (default build), or null
  T* grad_u0;           // [B, H]
  T* grad_eta0;         // [B, H]
  T* grad_s0;           // [B, H]
  double* dalpha_num;   // [B, H] per-row sums, reduced over B in row order afterwards; null
                        // (and drho too): no tau gradient asked for, the sums are skipped
  double* drho;         // [B, H]
  double* win_acc;      // [nblocks, I + 1, H] (dense inputs): per-block dW_in and db sums, or null
  T* win_part;          // [nblocks, I, Hp]: per-block sums of x_k dI (dW_in^T) (sparse inputs), or null
  T* bias_part;         // [nblocks, Hp], or null (dense)
  T* wrec_part;         // [nblocks, H, Hp]: per-block sums of s_j dI (dW_rec^T)
};

// acc [(I + 1), H] (float64) += sum over the n rows of dI [n, ld] (whole vectors readable) of
// x_k dI (dW_in^T) and dI (db, input I with x = 1): the dense-input weight gradients of one
// segment of a block, in tiles of kGradInputs inputs and kWtChunks vectors of columns, each
// summed over at most kGradChunkRows rows in registers and then added in float64.
template <typename T>
struct DenseInputGrads {
  template <Isa ISA>
  static void run(const T* dI, int64_t ld, const T* x, int64_t n_rows, int64_t H, int64_t I, double* acc) {
    using S = Simd<ISA, T>;
    constexpr int64_t L = S::L, W = IsaTraits<ISA>::kWtChunks * L;  // columns per register tile
    static const T one = T(1);
    const int64_t inputs = I + 1;
    for (int64_t r0 = 0; r0 < n_rows; r0 += kGradChunkRows) {
      const int64_t n = std::min(kGradChunkRows, n_rows - r0);
      for (int64_t i0 = 0; i0 < inputs; i0 += kGradInputs) {
        const int ni = int(std::min<int64_t>(kGradInputs, inputs - i0));
        const T* x_col[kGradInputs];
        int64_t x_step[kGradInputs];
        for (int k = 0; k < kGradInputs; ++k) {
          const int64_t i = i0 + std::min(k, ni - 1);
          x_col[k] = i < I ? x + r0 * I + i : &one;
          x_step[k] = i < I ? I : 0;
        }
        for (int64_t h0 = 0; h0 < H; h0 += W) {
          const int64_t cols = std::min(W, H - h0), nv = (cols + L - 1) / L;
          with_chunks<IsaTraits<ISA>::kWtChunks>(nv, [&](auto nc) {
            dense_dw_tile<ISA, T, nc()>(dI + r0 * ld + h0, ld, n, x_col, x_step, ni, cols, acc + i0 * H + h0, H);
          });
        }
      }
    }
  }
};

// dL/dx_t = dI_t W_in for the rows r < nr of a block (gx[r] [I]; W_in [H, Ip] zero-padded rows).
template <typename T>
struct InputGradRows {
  template <Isa ISA>
  static void run(const T* win, int64_t Ip, int64_t H, const T* const* dI, int64_t nr, int64_t I, T* const* gx) {
    rows_times_matrix<ISA, T>(win, Ip, H, dI, nr, I, nullptr, gx);
  }
};

template <Isa ISA, typename T, bool BINARY, bool DENSE>
SRNN_INLINE void layer_backward_block(const LayerArgs<T>& a, const LayerGrads<T>& g, const Params<T>& params,
                                      const Neurons<T>& nrn, int64_t blk) {
  Params<T> p = params;
  p.binary = BINARY;
  const int64_t H = a.H, B = a.B, T_ = a.T_, K = a.K, Hp = a.Hp, I = a.I, W = spike_words(H);
  const int64_t R = kRowBlock, b0 = blk * R, nr = std::min(R, B - b0);
  // Segment buffers: u and eta [R, K+1, H] (the state before each step and after the last),
  // s_{t-1} [R, K, Hp] (rows padded: unpack_bits writes whole vectors), the active inputs /
  // spikes of each step [R, K], and dI [K, R, Hp] (rows past nr stay zero; dense inputs: the
  // segment's x rows alongside, [K, R, I], for its dW_in sums). s_new takes the recomputed s_t.
  std::vector<T> u_seg(R * (K + 1) * H), e_seg(R * (K + 1) * H), s_seg(R * K * Hp), s_new(H);
  std::vector<T> du(R * H), deta(R * H), ds(R * H, T(0)), sg(H), dI_seg(K * R * Hp, T(0)), proj(R * Hp), rec(Hp);
  std::vector<T> x_seg(DENSE ? K * R * I : 0, T(0));
  const T* proj_rows[kRowBlock];
  std::vector<double> dalpha(R * H, 0.0), drho(R * H, 0.0);
  std::vector<int32_t> xidx_seg(R * K * I), sidx_seg(R * K * H);
  std::vector<Active> act_seg(R * K);
  for (int64_t k = 0; k < R * K; ++k) act_seg[k] = Active{xidx_seg.data() + k * I, sidx_seg.data() + k * H, 0, 0};
  T* win_g = DENSE ? nullptr : g.win_part + blk * I * Hp;
  T* bias_g = DENSE ? nullptr : g.bias_part + blk * Hp;
  double* win_acc = DENSE ? g.win_acc + blk * (I + 1) * H : nullptr;
  T* wrec_g = g.wrec_part + blk * H * Hp;
  if (DENSE) {
    std::fill(win_acc, win_acc + (I + 1) * H, 0.0);
  } else {
    std::fill(win_g, win_g + I * Hp, T(0));
    std::fill(bias_g, bias_g + Hp, T(0));
  }
  std::fill(wrec_g, wrec_g + H * Hp, T(0));
  for (int64_t r = 0; r < nr; ++r) {
    std::memcpy(du.data() + r * H, g.grad_u_T + (b0 + r) * H, H * sizeof(T));
    std::memcpy(deta.data() + r * H, g.grad_eta_T + (b0 + r) * H, H * sizeof(T));
  }
  // What the recomputation of step t reads for the block's rows: x_t and the bits of s_{t-1}.
  // The rows of one step are contiguous: one prefetch run covers them.
  const auto prefetch_step_inputs = [&](int64_t t) {
    const int64_t row = t * B + b0;
    if (a.xp != nullptr) prefetch_row(a.xp + row * H, nr * H * sizeof(T));
    else prefetch_row(a.x + row * I, nr * I * sizeof(T));
    if (t == 0) return;
    if (BINARY) prefetch_row(g.bits + (row - B) * W, nr * W * sizeof(int32_t));
    else prefetch_row(g.s_seq + (row - B) * H, nr * H * sizeof(T));
  };
  const int64_t C = (T_ + K - 1) / K;
  for (int64_t c = C - 1; c >= 0; --c) {
    const int64_t t0 = c * K, t1 = std::min(T_, t0 + K);  // 0-based steps [t0, t1)
    // Recompute the segment from its checkpoint, the block's rows in lockstep over t (rows are
    // independent: each rounds as in the forward), prefetching kPrefetchSteps ahead.
    for (int64_t r = 0; r < nr; ++r) {
      std::memcpy(u_seg.data() + r * (K + 1) * H, g.u_ckpt + (c * B + b0 + r) * H, H * sizeof(T));
      std::memcpy(e_seg.data() + r * (K + 1) * H, g.eta_ckpt + (c * B + b0 + r) * H, H * sizeof(T));
    }
    for (int64_t t = t0; t < t1; ++t) {
      if (t + kPrefetchSteps < t1) prefetch_step_inputs(t + kPrefetchSteps);
      input_current<ISA, T, DENSE>(a, t * B + b0, nr, act_seg.data() + (t - t0), K, proj.data(), proj_rows);
      if (DENSE) std::memcpy(x_seg.data() + (t - t0) * R * I, a.x + (t * B + b0) * I, nr * I * sizeof(T));
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = b0 + r;
        T* u = u_seg.data() + r * (K + 1) * H;
        T* e = e_seg.data() + r * (K + 1) * H;
        T* sp = s_seg.data() + (r * K + t - t0) * Hp;
        Active& act = act_seg[r * K + t - t0];
        if (t == 0) {
          std::memcpy(sp, a.s0 + b * H, H * sizeof(T));
          act.ns = nonzero_index<ISA>(sp, H, act.s);
        } else if (BINARY) {
          const int32_t* bits = g.bits + ((t - 1) * B + b) * W;
          unpack_bits<ISA>(bits, H, sp);
          act.ns = bit_index(bits, W, act.s);
        } else {
          std::memcpy(sp, g.s_seq + ((t - 1) * B + b) * H, H * sizeof(T));
          act.ns = nonzero_index<ISA>(sp, H, act.s);
        }
        T* un = u + (t - t0 + 1) * H;
        T* en = e + (t - t0 + 1) * H;
        layer_step<ISA>(a, p, nrn, proj_rows[r], sp, act, rec.data(), un - H, en - H, un, en, s_new.data());
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      if (t >= kPrefetchSteps) {  // the dL/ds rows (and dL/dx rows to write) kPrefetchSteps steps on
        const int64_t ahead = (t - kPrefetchSteps) * B + b0;
        prefetch_row(g.grad_s + ahead * H, nr * H * sizeof(T));
        if (g.grad_x != nullptr) prefetch_row<true>(g.grad_x + ahead * I, nr * I * sizeof(T));
        if (g.dI != nullptr) prefetch_row<true>(g.dI + ahead * H, nr * H * sizeof(T));
      }
      if (t - t0 < kPrefetchSteps && t0 > 0) prefetch_step_inputs(t - K);  // the next segment's first steps
      const int64_t j = t - t0;
      const T* dI_rows[kRowBlock];  // rows past nr are zero
      for (int64_t r = 0; r < R; ++r) dI_rows[r] = dI_seg.data() + (j * R + r) * Hp;
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = b0 + r;
        const T* u = u_seg.data() + (r * (K + 1) + j) * H;
        const T* e = e_seg.data() + (r * (K + 1) + j) * H;
        const T* sp = s_seg.data() + (r * K + j) * Hp;
        T* dIr = dI_seg.data() + (j * R + r) * Hp;
        backward_neurons<ISA, T, BINARY>(p, nrn, H, sg.data(), u, u + H, e, e + H, sp, g.grad_s + (t * B + b) * H,
                                         dIr, ds.data() + r * H, du.data() + r * H, deta.data() + r * H,
                                         g.dalpha_num != nullptr ? dalpha.data() + r * H : nullptr,
                                         g.dalpha_num != nullptr ? drho.data() + r * H : nullptr);
        // dW_rec^T[j] += s_j dI over the active neurons; for sparse inputs also dW_in^T[k] +=
        // x_k dI over the nonzero inputs and db += dI (dense inputs: per segment, below).
        const Active& act = act_seg[r * K + j];
        add_to_rows<ISA>(wrec_g, Hp, act.s, act.ns, sp, dIr);
        if (!DENSE) {
          add_to_rows<ISA>(win_g, Hp, act.x, act.nx, a.x + (t * B + b) * I, dIr);
#pragma omp simd
          for (int64_t i = 0; i < Hp; ++i) bias_g[i] += dIr[i];
        }
        if (g.dI != nullptr) std::memcpy(g.dI + (t * B + b) * H, dIr, H * sizeof(T));
      }
      add_wT_dI<ISA>(a.w, dI_rows, nr, H, Hp, ds.data());
      if (g.grad_x != nullptr) {
        T* gx[kRowBlock];
        for (int64_t r = 0; r < R; ++r) gx[r] = g.grad_x + (t * B + b0 + r) * I;
        run_build<ISA, InputGradRows<T>>(a.win, a.Ip, H, dI_rows, nr, I, gx);
      }
    }
    // Dense inputs: dW_in and db of the segment's rows while their dI and x are in cache.
    if constexpr (DENSE)
      run_build<ISA, DenseInputGrads<T>>(dI_seg.data(), Hp, x_seg.data(), (t1 - t0) * R, H, I, win_acc);
  }
  store_block_grads(b0, nr, H, du.data(), deta.data(), ds.data(), dalpha.data(), drho.data(), g.grad_u0, g.grad_eta0,
                    g.grad_s0, g.dalpha_num, g.drho);
}

template <typename T, bool BINARY, bool DENSE>
struct LayerBackward : CpuKernel<T> {
  template <Isa ISA>
  static void run(const LayerArgs<T>& a, const LayerGrads<T>& g, const Params<T>& p, const Neurons<T>& n,
                  int64_t blk_begin, int64_t blk_end) {
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) layer_backward_block<ISA, T, BINARY, DENSE>(a, g, p, n, blk);
  }
};

// Kernel<T, BINARY, DENSE>'s build for isa (run_kernel), the two flags known at run time.
template <template <typename, bool, bool> class Kernel, typename T, typename... Args>
void run_layer_kernel(bool binary, bool dense, Isa isa, const Args&... args) {
  if (binary) {
    dense ? run_kernel<Kernel<T, true, true>>(isa, args...) : run_kernel<Kernel<T, true, false>>(isa, args...);
  } else {
    dense ? run_kernel<Kernel<T, false, true>>(isa, args...) : run_kernel<Kernel<T, false, false>>(isa, args...);
  }
}

// ---------------------------------------------------------------------------------------
// Host side: checks, padded weight copies, outputs.
// ---------------------------------------------------------------------------------------
struct LayerShape {
  int64_t T_, B, I, H;
};

LayerShape check_layer_args(const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& bias,
                            const at::Tensor& w_rec, const at::Tensor& alpha, const at::Tensor& rho,
                            const at::Tensor& u0, const at::Tensor& eta0, const at::Tensor& s0) {
  TORCH_CHECK(x.defined() && x.dim() == 3, "srnn_fast: x must be [T, B, I] (3-D); got ",
              x.defined() ? describe(x) : std::string("an undefined tensor"));
  TORCH_CHECK(w_rec.defined() && w_rec.dim() == 2, "srnn_fast: w_rec must be [H, H]; got ",
              w_rec.defined() ? describe(w_rec) : std::string("an undefined tensor"));
  const LayerShape sh{x.size(0), x.size(1), x.size(2), w_rec.size(0)};
  TORCH_CHECK(sh.T_ >= 1 && sh.B >= 1 && sh.I >= 1, "srnn_fast: x must have T, B, I >= 1; got ", describe(x));
  TORCH_CHECK(sh.H >= 1, "srnn_fast: w_rec must have H >= 1; got ", describe(w_rec));
  check_state_dtype(w_rec);
  const auto dtype = w_rec.scalar_type();
  const at::Device dev = x.device();
  TORCH_CHECK(x.scalar_type() == dtype, "srnn_fast: x must have dtype ", dtype, " like w_rec; got ", describe(x));
  check_input(w_in, "w_in", {sh.H, sh.I}, "[H, I]", dtype, dev);
  if (bias.has_value() && bias->defined()) check_input(*bias, "bias", {sh.H}, "[H]", dtype, dev);
  check_scan_params(w_rec, alpha, rho, u0, eta0, s0, sh.B, sh.H, dev);
  return sh;
}

// [rows, cols] -> [rows, padded(cols)] zero-padded copy (optionally of the transpose).
at::Tensor padded_rows(const at::Tensor& m) {
  const int64_t cols = m.size(1), cp = padded(cols, m.element_size());
  at::Tensor out = at::zeros({m.size(0), cp}, m.options());
  out.narrow(1, 0, cols).copy_(m);
  return out;
}

at::Tensor padded_bias(const std::optional<at::Tensor>& bias, int64_t H, const at::TensorOptions& opts) {
  at::Tensor out = at::zeros({padded(H, opts.dtype().itemsize())}, opts);
  if (bias.has_value() && bias->defined()) out.narrow(0, 0, H).copy_(*bias);
  return out;
}

// The fraction of nonzero inputs above which the projection b + W_in x_t runs over every input
// in register tiles (DenseInputCurrent, DenseInputGrads) instead of over the nonzero inputs
// only. The sparse sums cost about nonzeros x H per row and step, three times (forward,
// recomputation, dW_in), with a load and store of a dW_in row per nonzero; the dense path
// I x H three times, at several times the throughput (bench/RESULTS.md).
constexpr double kDenseInput = 0.25;

// Whether x counts as dense, from kDenseSampleSteps steps spread evenly over the sequence: a
// pure function of x, so forward and backward decide alike, and cheap (the whole of x is not
// read). Not the first steps alone: a spiking layer's output starts with a burst (S-MNIST's
// layer 1: 25 % of its neurons fire in each of the first 8 steps from u = 0, 6 % over the
// sequence), which sent the next layer down the dense path at 4x its spike-driven work.
constexpr int64_t kDenseSampleSteps = 16;

bool dense_input(const at::Tensor& x) {
  const int64_t T_ = x.size(0), n = std::min(T_, kDenseSampleSteps);
  const at::Tensor steps = at::linspace(0, double(T_ - 1), n, x.options().dtype(at::kDouble)).round().to(at::kLong);
  const at::Tensor sample = x.index_select(0, steps);
  return double(sample.count_nonzero().item<int64_t>()) > kDenseInput * double(sample.numel());
}

// The BLAS torch ships picks its own vector width at run time (MKL runs AVX-512 here even
// when the default build of these kernels runs), so for the default build (SSE2 / NEON
// vectors, no FMA) the dense products over many steps stay whole-sequence GEMMs: x_proj
// [T, B, H] (dense inputs; input_current points at its rows) and dL/dx = dI W_in from a dI
// [T, B, H] written by the kernel. On avx2 / avx512 the kernels' register tiles run them at
// the BLAS's rate with the rows in cache, so neither [T, B, H] buffer exists there. Measured:
// bench/RESULTS.md, issue 47.
bool blas_dense_products(Isa isa) { return isa == Isa::kDefault; }

// Scratch buffers of that path (x_proj, dI: [T, B, H], used within one op call),
// kept by the calling thread for its next call. A fresh buffer that size comes from mmap and
// goes back to the OS when freed (glibc), so every call paid a page fault and a zeroed page
// per 4 KB: a third of the S-MNIST stack's time (bench/RESULTS.md). Buffers over
// kScratchMaxBytes are not kept (memory held stays bounded: at most 2 x that per thread).
enum Scratch { kScratchXProj = 0, kScratchDI = 1 };
constexpr int64_t kScratchMaxBytes = int64_t(256) << 20;

at::Tensor scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
  thread_local at::Tensor kept[2];
  const int64_t numel = c10::multiply_integers(sizes);
  at::Tensor fresh;  // a buffer over kScratchMaxBytes lives for this call only
  at::Tensor& buf = numel * int64_t(opts.dtype().itemsize()) > kScratchMaxBytes ? fresh : kept[slot];
  if (!buf.defined() || buf.scalar_type() != opts.dtype().toScalarType() || buf.numel() < numel) {
    buf = at::Tensor();  // free the old one first
    buf = at::empty({numel}, opts);
    advise_huge_pages(buf);
  }
  return poisoned(buf.narrow(0, 0, numel).view(sizes));  // a kept buffer's stale values must not count
}

// x_proj [T, B, H] = x W_in^T + b: one GEMM over all steps, into the x_proj scratch buffer.
at::Tensor project(const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& bias) {
  const at::Tensor x2 = x.reshape({x.size(0) * x.size(1), x.size(2)});
  at::Tensor xp = scratch(kScratchXProj, {x.size(0) * x.size(1), w_in.size(0)}, w_in.options());
  if (bias.has_value() && bias->defined())
    at::addmm_out(xp, *bias, x2, w_in.t());
  else
    at::mm_out(xp, x2, w_in.t());
  return xp.view({x.size(0), x.size(1), w_in.size(0)});
}

template <typename T>
LayerArgs<T> layer_args(const at::Tensor& x, const at::Tensor& xp, const at::Tensor& winT, const at::Tensor& win,
                        const at::Tensor& b, const at::Tensor& wT, const at::Tensor& w, const at::Tensor& u0,
                        const at::Tensor& eta0, const at::Tensor& s0, const at::Tensor& zeros, const LayerShape& sh,
                        int64_t K) {
  return LayerArgs<T>{x.data_ptr<T>(),   xp.defined() ? xp.data_ptr<T>() : nullptr,
                      winT.data_ptr<T>(), win.defined() ? win.data_ptr<T>() : nullptr,
                      b.data_ptr<T>(),    wT.data_ptr<T>(), w.defined() ? w.data_ptr<T>() : nullptr,
                      u0.data_ptr<T>(), eta0.data_ptr<T>(), s0.data_ptr<T>(), zeros.data_ptr<T>(),
                      sh.T_, sh.B, sh.H, winT.size(1), sh.I, win.defined() ? win.size(1) : 0, K};
}

// max(I, H) zeros: what rows_times_matrix reads for the rows past a block's last.
at::Tensor zero_row(const LayerShape& sh, const at::TensorOptions& opts) {
  return at::zeros({std::max(sh.I, sh.H)}, opts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd_cpu(
    const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& bias, const at::Tensor& w_rec,
    const at::Tensor& alpha, const at::Tensor& rho, const at::Tensor& u0, const at::Tensor& eta0,
    const at::Tensor& s0, bool binary, double b0, double beta, double dt, double r_m, int64_t ckpt_every) {
  const LayerShape sh = check_layer_args(x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0);
  TORCH_CHECK(ckpt_every >= 0, "srnn_fast: ckpt_every must be >= 0 (0: inference, save nothing); got ", ckpt_every);
  // A segment longer than the sequence is the whole sequence (same checkpoints, smaller buffers).
  const int64_t T_ = sh.T_, B = sh.B, H = sh.H, K = std::min(ckpt_every, T_), C = K > 0 ? (T_ + K - 1) / K : 0;
  const auto opts = w_rec.options();
  at::Tensor s = new_output({T_, B, H}, opts);
  at::Tensor u_T = new_output({B, H}, opts), eta_T = new_output({B, H}, opts);
  at::Tensor u_ckpt = new_output(K > 0 ? at::IntArrayRef{C, B, H} : at::IntArrayRef{0}, opts);
  at::Tensor eta_ckpt = new_output(K > 0 ? at::IntArrayRef{C, B, H} : at::IntArrayRef{0}, opts);
  at::Tensor bits = new_output(K > 0 && binary ? at::IntArrayRef{T_, B, spike_words(H)} : at::IntArrayRef{0},
                               opts.dtype(at::kInt));
  const at::Tensor xc = x.contiguous(), winT = padded_rows(w_in.t()), bp = padded_bias(bias, H, opts);
  const at::Tensor wT = padded_rows(w_rec.t()), zeros = zero_row(sh, opts);
  const Isa isa = active_isa();
  const bool dense = dense_input(xc);
  const at::Tensor xp = dense && blas_dense_products(isa) ? project(xc, w_in, bias) : at::Tensor();
  const at::Tensor a_c = alpha.contiguous(), r_c = rho.contiguous();
  const at::Tensor u0c = u0.contiguous(), eta0c = eta0.contiguous(), s0c = s0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(w_rec.scalar_type(), "srnn_fast::layer_fwd", [&] {
    using T = scalar_t;
    check_decay_values<T>(a_c, "alpha", "tau_m", false);
    check_decay_values<T>(r_c, "rho", "tau_adp", true);
    const Params<T> p = make_params<T>(binary, b0, beta, dt, r_m);
    const Neurons<T> nrn(a_c.data_ptr<T>(), r_c.data_ptr<T>(), p.r_m, H);
    const LayerArgs<T> args =
        layer_args<T>(xc, xp, winT, at::Tensor(), bp, wT, at::Tensor(), u0c, eta0c, s0c, zeros, sh, K);
    const LayerOut<T> out{s.data_ptr<T>(), u_T.data_ptr<T>(), eta_T.data_ptr<T>(),
                          K > 0 ? u_ckpt.data_ptr<T>() : nullptr, K > 0 ? eta_ckpt.data_ptr<T>() : nullptr,
                          K > 0 && binary ? bits.data_ptr<int32_t>() : nullptr};
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      run_layer_kernel<LayerForward, T>(binary, dense, isa, args, out, p, nrn, begin, end);
    });
  });
  return {s, u_T, eta_T, u_ckpt, eta_ckpt, bits};
}

// out[i, k] = sum over blocks of part[blk * stride + k * ld + i] for i < H, k < rows (out [H,
// rows]): the per-block partials of dW^T (float32 rows padded to Hp, or the dense inputs'
// float64 sums) summed in block order in float64 (deterministic for any thread count), reading
// the partials row by row; parallel over k.
template <typename P, typename T>
void reduce_transposed(const P* part, int64_t nblocks, int64_t stride, int64_t rows, int64_t ld, int64_t H, T* out) {
  at::parallel_for(0, rows, 16, [&](int64_t k_begin, int64_t k_end) {
    std::vector<double> acc(H);
    for (int64_t k = k_begin; k < k_end; ++k) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const P* __restrict p = part + blk * stride + k * ld;
        for (int64_t i = 0; i < H; ++i) acc[i] += double(p[i]);
      }
      for (int64_t i = 0; i < H; ++i) out[i * rows + k] = T(acc[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_bwd_cpu(const at::Tensor& grad_s, const at::Tensor& grad_u_T, const at::Tensor& grad_eta_T, const at::Tensor& x,
              const at::Tensor& w_in, const std::optional<at::Tensor>& bias, const at::Tensor& w_rec,
              const at::Tensor& alpha, const at::Tensor& rho, const at::Tensor& u0, const at::Tensor& eta0,
              const at::Tensor& s0, const at::Tensor& u_ckpt, const at::Tensor& eta_ckpt, const at::Tensor& spikes,
              bool binary, int64_t surrogate, double b0, double beta, double dt, double r_m, double sigma,
              double gamma, int64_t ckpt_every, bool need_grad_x, bool need_grad_tau) {
  const LayerShape sh = check_layer_args(x, w_in, bias, w_rec, alpha, rho, u0, eta0, s0);
  check_surrogate(surrogate);
  TORCH_CHECK(ckpt_every >= 1, "srnn_fast: ckpt_every must be >= 1 in backward; got ", ckpt_every);
  const int64_t T_ = sh.T_, B = sh.B, H = sh.H, I = sh.I, K = std::min(ckpt_every, T_), C = (T_ + K - 1) / K;
  const auto dtype = w_rec.scalar_type();
  const at::Device dev = x.device();
  check_input(u_ckpt, "u_ckpt", {C, B, H}, "[ceil(T / ckpt_every), B, H]", dtype, dev);
  check_input(eta_ckpt, "eta_ckpt", {C, B, H}, "[ceil(T / ckpt_every), B, H]", dtype, dev);
  check_backward_inputs(grad_s, grad_u_T, grad_eta_T, spikes, binary, T_, B, H, dtype, dev);

  const auto opts = w_rec.options();
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor grad_x = new_output(need_grad_x ? at::IntArrayRef{T_, B, I} : at::IntArrayRef{0}, opts);
  at::Tensor grad_w_in = new_output({H, I}, opts), grad_w_rec = new_output({H, H}, opts);
  at::Tensor grad_bias = new_output(has_bias ? at::IntArrayRef{H} : at::IntArrayRef{0}, opts);
  // Frozen time constants (no need_grad_tau): grad_alpha, grad_rho [0], their terms skipped.
  const std::vector<int64_t> tau_shape{need_grad_tau ? H : 0};
  at::Tensor grad_alpha = new_output(tau_shape, opts), grad_rho = new_output(tau_shape, opts);
  at::Tensor grad_u0 = new_output({B, H}, opts), grad_eta0 = new_output({B, H}, opts);
  at::Tensor grad_s0 = new_output({B, H}, opts);

  const at::Tensor xc = x.contiguous(), winT = padded_rows(w_in.t());
  const at::Tensor bp = padded_bias(bias, H, opts), wT = padded_rows(w_rec.t()), w = padded_rows(w_rec);
  const int64_t Hp = wT.size(1), nblocks = (B + kRowBlock - 1) / kRowBlock;
  // Dense inputs: dW_in and db summed per block and segment in float64 (win_acc), else in the
  // per-block float32 partials row by row over the nonzero inputs (win_part, bias_part).
  const bool dense = dense_input(xc);
  const Isa isa = active_isa();
  const bool blas = blas_dense_products(isa);
  const at::Tensor xp = dense && blas ? project(xc, w_in, bias) : at::Tensor();
  const at::Tensor dI = need_grad_x && blas ? scratch(kScratchDI, {T_, B, H}, opts) : at::Tensor();
  const at::Tensor win = need_grad_x && !blas ? padded_rows(w_in) : at::Tensor(), zeros = zero_row(sh, opts);
  at::Tensor part = at::empty({need_grad_tau ? 2 : 0, B, H}, opts.dtype(at::kDouble));
  at::Tensor win_acc = at::empty({dense ? nblocks : 0, I + 1, H}, opts.dtype(at::kDouble));
  at::Tensor win_part = at::empty({dense ? 0 : nblocks, I, Hp}, opts);
  at::Tensor bias_part = at::empty({dense ? 0 : nblocks, 1, Hp}, opts);
  at::Tensor wrec_part = at::empty({nblocks, H, Hp}, opts);
  advise_huge_pages(win_acc);
  advise_huge_pages(win_part);
  advise_huge_pages(wrec_part);
  const at::Tensor gs = grad_s.contiguous(), guT = grad_u_T.contiguous(), geT = grad_eta_T.contiguous();
  const at::Tensor uck = u_ckpt.contiguous(), eck = eta_ckpt.contiguous(), spk = spikes.contiguous();
  const at::Tensor a_c = alpha.contiguous(), r_c = rho.contiguous();
  const at::Tensor u0c = u0.contiguous(), eta0c = eta0.contiguous(), s0c = s0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "srnn_fast::layer_bwd", [&] {
    using T = scalar_t;
    check_decay_values<T>(a_c, "alpha", "tau_m", false);
    check_decay_values<T>(r_c, "rho", "tau_adp", true);
    const Params<T> p = make_params<T>(binary, b0, beta, dt, r_m, sigma, gamma, int(surrogate));
    const Neurons<T> nrn(a_c.data_ptr<T>(), r_c.data_ptr<T>(), p.r_m, H);
    const LayerArgs<T> args = layer_args<T>(xc, xp, winT, win, bp, wT, w, u0c, eta0c, s0c, zeros, sh, K);
    double* dalpha_part = need_grad_tau ? part.data_ptr<double>() : nullptr;
    double* drho_part = need_grad_tau ? dalpha_part + B * H : nullptr;
    const LayerGrads<T> g{gs.data_ptr<T>(), guT.data_ptr<T>(), geT.data_ptr<T>(), uck.data_ptr<T>(),
                          eck.data_ptr<T>(), binary ? spk.data_ptr<int32_t>() : nullptr,
                          binary ? nullptr : spk.data_ptr<T>(),
                          need_grad_x && !blas ? grad_x.data_ptr<T>() : nullptr,
                          dI.defined() ? dI.data_ptr<T>() : nullptr,
                          grad_u0.data_ptr<T>(), grad_eta0.data_ptr<T>(), grad_s0.data_ptr<T>(), dalpha_part,
                          drho_part, dense ? win_acc.data_ptr<double>() : nullptr,
                          dense ? nullptr : win_part.data_ptr<T>(),
                          dense ? nullptr : bias_part.data_ptr<T>(), wrec_part.data_ptr<T>()};
    at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
      run_layer_kernel<LayerBackward, T>(binary, dense, isa, args, g, p, nrn, begin, end);
    });
    // Deterministic reductions in float64: over rows (tau grads) and blocks (weights).
    if (need_grad_tau)
      reduce_tau_grads(dalpha_part, drho_part, B, H, nrn, grad_alpha.data_ptr<T>(), grad_rho.data_ptr<T>());
    reduce_transposed(wrec_part.data_ptr<T>(), nblocks, H * Hp, H, Hp, H, grad_w_rec.data_ptr<T>());
    if (dense) {  // win_acc [nblocks, I + 1, H]: dW_in^T, then db
      const double* acc = win_acc.data_ptr<double>();
      reduce_transposed(acc, nblocks, (I + 1) * H, I, H, H, grad_w_in.data_ptr<T>());
      if (has_bias) reduce_transposed(acc + I * H, nblocks, (I + 1) * H, 1, H, H, grad_bias.data_ptr<T>());
    } else {
      reduce_transposed(win_part.data_ptr<T>(), nblocks, I * Hp, I, Hp, H, grad_w_in.data_ptr<T>());
      if (has_bias) reduce_transposed(bias_part.data_ptr<T>(), nblocks, Hp, 1, Hp, H, grad_bias.data_ptr<T>());
    }
  });
  if (dI.defined()) {
    at::Tensor grad_x2 = grad_x.view({T_ * B, I});
    at::mm_out(grad_x2, dI.view({T_ * B, H}), w_in);
  }
  return {grad_x, grad_w_in, grad_bias, grad_w_rec, grad_alpha, grad_rho, grad_u0, grad_eta0, grad_s0};
}

}  // namespace
}  // namespace srnn

TORCH_LIBRARY_IMPL(srnn_fast, CPU, m) {
  m.impl("layer_fwd", &srnn::layer_fwd_cpu);
  m.impl("layer_bwd", &srnn::layer_bwd_cpu);
  m.impl("layer_dense_input", &srnn::dense_input);
}
