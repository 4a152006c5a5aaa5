// CPU kernels of the fused SRNN *layer*: the input projection x_t W_in^T + b and the
// recurrence of one layer over the whole sequence, forward and backward, in one op each.
//
// Against the scan ops (x_proj given) the layer ops:
// - compute the input current inside the kernel, summing the W_in columns of the nonzero
//   inputs only (spiking inputs are sparse), so no [T, B, H] x_proj is ever written;
// - save for backward only the spike bits and the state (u, eta) every `ckpt_every` steps.
//   Backward recomputes each segment of steps from its checkpoint with the same code as the
//   forward (bit for bit: same inputs, same order of operations), then runs the segment
//   backwards, and sums dW_in, db and dW_rec inside the kernel (dI is never written).
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
  const T* xp;        // [T, B, H]: x W_in^T + b by one GEMM (dense inputs), or null: summed in the kernel
  const T* winT;      // [I, Hp]: W_in^T, rows zero-padded (row k = column k of W_in)
  const T* bias;      // [Hp] (zeros without a bias)
  const T* wT;        // [H, Hp]: W_rec^T (forward: sums over active columns)
  const T* w;         // [H, Hp]: W_rec (backward: W^T dI)
  const T* u0;        // [B, H]
  const T* eta0;      // [B, H]
  const T* s0;        // [B, H], any real values (user state)
  int64_t T_, B, H, Hp, I, K;  // K: steps per checkpoint segment (0: save nothing)
};

// Scratch of one row for one step: the two halves of the input current.
template <typename T>
struct StepScratch {
  std::vector<T> proj, rec;
  explicit StepScratch(int64_t Hp) : proj(Hp), rec(Hp) {}
};

// The nonzero inputs x_t and the active previous spikes of one step (their indices), kept
// by the backward's recomputation for the dW_in and dW_rec sums of the same step. The
// caller fills s and ns (from spike bits where it has them), layer_step x and nx.
struct Active {
  int32_t* x;    // [I]
  int32_t* s;    // [H]
  int64_t nx, ns;
};

// One step of one row (row = t * B + b), the single definition used by the forward and by
// the backward's recomputation: I_t = (b + W_in x_t) + W_rec s_{t-1} (over act.s, the active
// s_{t-1}); u, eta advance in place; s_t out. b + W_in x_t is the GEMM's row (dense inputs)
// or a sum over the nonzero inputs (spikes).
template <Isa ISA, typename T, bool BINARY>
SRNN_INLINE void layer_step(const LayerArgs<T>& a, const Params<T>& p, const Neurons<T>& nrn, int64_t row,
                            const T* s_prev, StepScratch<T>& sc, Active& act, T* u, T* eta, T* s) {
  const T* proj = sc.proj.data();
  if (a.xp != nullptr) {
    proj = a.xp + row * a.H;
    act.nx = 0;
  } else {
    const T* xt = a.x + row * a.I;
    act.nx = nonzero_index<ISA>(xt, a.I, act.x);
    sum_rows<ISA, T, false>(a.winT, a.Hp, act.x, act.nx, xt, a.bias, sc.proj.data());
  }
  recurrent_input<ISA>(a.wT, s_prev, act.s, act.ns, false, a.Hp, sc.rec.data());
  forward_neurons(p, nrn, a.H, proj, sc.rec.data(), s_prev, u, eta, s);
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

template <Isa ISA, typename T, bool BINARY>
SRNN_INLINE void layer_forward_rows(const LayerArgs<T>& a, const LayerOut<T>& o, const Params<T>& params,
                                    const Neurons<T>& nrn, int64_t b_begin, int64_t b_end) {
  Params<T> p = params;
  p.binary = BINARY;
  const int64_t H = a.H, B = a.B, W = spike_words(H), R = kFwdRowBlock;
  std::vector<T> u(R * H), eta(R * H);
  StepScratch<T> sc(a.Hp);
  std::vector<int32_t> xidx(a.I), sidx(R * H), words(W);
  std::vector<Active> act(R);
  for (int64_t r = 0; r < R; ++r) act[r] = Active{xidx.data(), sidx.data() + r * H, 0, 0};
  const T* s_prev[kFwdRowBlock];
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
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = row0 + r;
        T* st = o.s + row * H;
        layer_step<ISA, T, BINARY>(a, p, nrn, row, s_prev[r], sc, act[r], u.data() + r * H, eta.data() + r * H, st);
        if (BINARY) {  // the next step's active set from the bits: cost follows the spike count
          pack_bits<ISA>(st, H, words.data());
          if (o.bits != nullptr) std::memcpy(o.bits + row * W, words.data(), W * sizeof(int32_t));
          act[r].ns = bit_index(words.data(), W, act[r].s);
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
template <typename T, bool BINARY>
struct LayerForward : CpuKernel<T> {
  template <Isa ISA>
  static void run(const LayerArgs<T>& a, const LayerOut<T>& o, const Params<T>& p, const Neurons<T>& n, int64_t b,
                  int64_t e) {
    layer_forward_rows<ISA, T, BINARY>(a, o, p, n, b, e);
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
  T* dI;                // [T, B, H] dL/dI_t for the sums after the kernel (dense inputs, or dL/dx
                        // needed), or null
  T* grad_u0;           // [B, H]
  T* grad_eta0;         // [B, H]
  T* grad_s0;           // [B, H]
  double* dalpha_num;   // [B, H] per-row sums, reduced over B in row order afterwards; null
                        // (and drho too): no tau gradient asked for, the sums are skipped
  double* drho;         // [B, H]
  T* win_part;          // [nblocks, I, Hp]: per-block sums of x_k dI (dW_in^T), or null (dense)
  T* bias_part;         // [nblocks, Hp], or null (dense)
  T* wrec_part;         // [nblocks, H, Hp]: per-block sums of s_j dI (dW_rec^T)
};

template <Isa ISA, typename T, bool BINARY>
SRNN_INLINE void layer_backward_block(const LayerArgs<T>& a, const LayerGrads<T>& g, const Params<T>& params,
                                      const Neurons<T>& nrn, int64_t blk) {
  Params<T> p = params;
  p.binary = BINARY;
  const int64_t H = a.H, B = a.B, T_ = a.T_, K = a.K, Hp = a.Hp, I = a.I, W = spike_words(H);
  const int64_t R = kRowBlock, b0 = blk * R, nr = std::min(R, B - b0);
  // Segment buffers: u and eta [R, K+1, H] (the state before each step and after the last),
  // s_{t-1} [R, K, Hp] (rows padded: unpack_bits writes whole vectors), and the active
  // inputs / spikes of each step [R, K]. s_new takes the recomputed s_t (equal to the bits).
  std::vector<T> u_seg(R * (K + 1) * H), e_seg(R * (K + 1) * H), s_seg(R * K * Hp), s_new(H);
  std::vector<T> du(R * H), deta(R * H), ds(R * H, T(0)), sg(H), dI(R * Hp, T(0));
  std::vector<double> dalpha(R * H, 0.0), drho(R * H, 0.0);
  StepScratch<T> sc(Hp);
  std::vector<int32_t> xidx_seg(R * K * I), sidx_seg(R * K * H);
  std::vector<Active> act_seg(R * K);
  for (int64_t k = 0; k < R * K; ++k) act_seg[k] = Active{xidx_seg.data() + k * I, sidx_seg.data() + k * H, 0, 0};
  const T* dI_rows[kRowBlock];  // rows past nr stay zero
  for (int64_t r = 0; r < R; ++r) dI_rows[r] = dI.data() + r * Hp;
  const bool sparse_in = a.xp == nullptr;  // else dW_in and db are summed over g.dI afterwards
  T* win_g = sparse_in ? g.win_part + blk * I * Hp : nullptr;
  T* bias_g = sparse_in ? g.bias_part + blk * Hp : nullptr;
  T* wrec_g = g.wrec_part + blk * H * Hp;
  if (sparse_in) {
    std::fill(win_g, win_g + I * Hp, T(0));
    std::fill(bias_g, bias_g + Hp, T(0));
  }
  std::fill(wrec_g, wrec_g + H * Hp, T(0));
  for (int64_t r = 0; r < nr; ++r) {
    std::memcpy(du.data() + r * H, g.grad_u_T + (b0 + r) * H, H * sizeof(T));
    std::memcpy(deta.data() + r * H, g.grad_eta_T + (b0 + r) * H, H * sizeof(T));
  }
  // What the recomputation of step t reads for the block's rows: x_t (or its projection) and
  // the bits of s_{t-1}. The rows of one step are contiguous: one prefetch run covers them.
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
        std::memcpy(un, un - H, H * sizeof(T));
        std::memcpy(en, en - H, H * sizeof(T));
        layer_step<ISA, T, BINARY>(a, p, nrn, t * B + b, sp, sc, act, un, en, s_new.data());
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      if (t >= kPrefetchSteps) {  // the dL/ds rows (and dI rows to write) kPrefetchSteps steps on
        const int64_t ahead = (t - kPrefetchSteps) * B + b0;
        prefetch_row(g.grad_s + ahead * H, nr * H * sizeof(T));
        if (g.dI != nullptr) prefetch_row<true>(g.dI + ahead * H, nr * H * sizeof(T));
      }
      if (t - t0 < kPrefetchSteps && t0 > 0) prefetch_step_inputs(t - K);  // the next segment's first steps
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = b0 + r, j = t - t0;
        const T* u = u_seg.data() + (r * (K + 1) + j) * H;
        const T* e = e_seg.data() + (r * (K + 1) + j) * H;
        const T* sp = s_seg.data() + (r * K + j) * Hp;
        T* dIr = dI.data() + r * Hp;
        backward_neurons<ISA, T, BINARY>(p, nrn, H, sg.data(), u, u + H, e, e + H, sp, g.grad_s + (t * B + b) * H, dIr,
                                    ds.data() + r * H, du.data() + r * H, deta.data() + r * H,
                                    g.dalpha_num != nullptr ? dalpha.data() + r * H : nullptr,
                                    g.dalpha_num != nullptr ? drho.data() + r * H : nullptr);
        // dW_rec^T[j] += s_j dI over the active neurons; for sparse inputs also dW_in^T[k] +=
        // x_k dI over the nonzero inputs and db += dI.
        const Active& act = act_seg[r * K + j];
        add_to_rows<ISA>(wrec_g, Hp, act.s, act.ns, sp, dIr);
        if (sparse_in) {
          add_to_rows<ISA>(win_g, Hp, act.x, act.nx, a.x + (t * B + b) * I, dIr);
#pragma omp simd
          for (int64_t i = 0; i < Hp; ++i) bias_g[i] += dIr[i];
        }
        if (g.dI != nullptr) std::memcpy(g.dI + (t * B + b) * H, dIr, H * sizeof(T));
      }
      add_wT_dI<ISA>(a.w, dI_rows, nr, H, Hp, ds.data());
    }
  }
  store_block_grads(b0, nr, H, du.data(), deta.data(), ds.data(), dalpha.data(), drho.data(), g.grad_u0, g.grad_eta0,
                    g.grad_s0, g.dalpha_num, g.drho);
}

template <typename T, bool BINARY>
struct LayerBackward : CpuKernel<T> {
  template <Isa ISA>
  static void run(const LayerArgs<T>& a, const LayerGrads<T>& g, const Params<T>& p, const Neurons<T>& n,
                  int64_t blk_begin, int64_t blk_end) {
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) layer_backward_block<ISA, T, BINARY>(a, g, p, n, blk);
  }
};

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

// The fraction of nonzero inputs above which the projection b + W_in x_t runs as one GEMM
// over all steps (torch's BLAS) instead of inside the kernel over the nonzero inputs only.
// Measured on the bench shapes (bench/RESULTS.md): the kernel's sparse sum costs about
// (nonzeros x H) per step, three times (forward, recomputation, dW_in); the dense path costs
// I x H per step three times too (the x_proj GEMM, forward and recomputed, and the dW_in sum of
// dense_input_grads), at higher throughput.
constexpr double kDenseInput = 0.25;

// Whether x counts as dense, from its first steps: a pure function of x, so forward and
// backward decide alike, and cheap (the whole of x is not read).
bool dense_input(const at::Tensor& x) {
  const at::Tensor head = x.narrow(0, 0, std::min<int64_t>(x.size(0), 8));
  return double(head.count_nonzero().item<int64_t>()) > kDenseInput * double(head.numel());
}

// Scratch buffers of the dense-input path (x_proj, dI: [T, B, H], used within one op call),
// kept by the calling thread for its next call. A fresh buffer that size comes from mmap and
// goes back to the OS when freed (glibc), so every call paid a page fault and a zeroed page
// per 4 KB: a third of the S-MNIST stack's time (bench/RESULTS.md). Buffers over
// kScratchMaxBytes are not kept (memory held stays bounded: at most 2 x that per thread).
enum Scratch { kScratchXProj = 0, kScratchDI = 1 };
constexpr int64_t kScratchMaxBytes = int64_t(256) << 20;

// `pad` more elements after the tensor's end stay readable (values unspecified).
at::Tensor scratch(Scratch slot, at::IntArrayRef sizes, const at::TensorOptions& opts, int64_t pad = 0) {
  thread_local at::Tensor kept[2];
  const int64_t numel = c10::multiply_integers(sizes), total = numel + pad;
  at::Tensor fresh;  // a buffer over kScratchMaxBytes lives for this call only
  at::Tensor& buf = total * int64_t(opts.dtype().itemsize()) > kScratchMaxBytes ? fresh : kept[slot];
  if (!buf.defined() || buf.scalar_type() != opts.dtype().toScalarType() || buf.numel() < total) {
    buf = at::Tensor();  // free the old one first
    buf = at::empty({total}, opts);
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
LayerArgs<T> layer_args(const at::Tensor& x, const at::Tensor& xp, const at::Tensor& winT, const at::Tensor& b,
                        const at::Tensor& wT, const at::Tensor& w, const at::Tensor& u0, const at::Tensor& eta0,
                        const at::Tensor& s0, const LayerShape& sh, int64_t K) {
  return LayerArgs<T>{x.data_ptr<T>(),  xp.defined() ? xp.data_ptr<T>() : nullptr,
                      winT.data_ptr<T>(), b.data_ptr<T>(), wT.data_ptr<T>(), w.defined() ? w.data_ptr<T>() : nullptr,
                      u0.data_ptr<T>(), eta0.data_ptr<T>(), s0.data_ptr<T>(),
                      sh.T_, sh.B, sh.H, winT.size(1), sh.I, K};
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
  const at::Tensor wT = padded_rows(w_rec.t());
  const at::Tensor xp = dense_input(xc) ? project(xc, w_in, bias) : at::Tensor();
  const at::Tensor a_c = alpha.contiguous(), r_c = rho.contiguous();
  const at::Tensor u0c = u0.contiguous(), eta0c = eta0.contiguous(), s0c = s0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(w_rec.scalar_type(), "srnn_fast::layer_fwd", [&] {
    using T = scalar_t;
    check_decay_values<T>(a_c, "alpha", "tau_m", false);
    check_decay_values<T>(r_c, "rho", "tau_adp", true);
    const Params<T> p = make_params<T>(binary, b0, beta, dt, r_m);
    const Neurons<T> nrn(a_c.data_ptr<T>(), r_c.data_ptr<T>(), p.r_m, H);
    const LayerArgs<T> args = layer_args<T>(xc, xp, winT, bp, wT, at::Tensor(), u0c, eta0c, s0c, sh, K);
    const LayerOut<T> out{s.data_ptr<T>(), u_T.data_ptr<T>(), eta_T.data_ptr<T>(),
                          K > 0 ? u_ckpt.data_ptr<T>() : nullptr, K > 0 ? eta_ckpt.data_ptr<T>() : nullptr,
                          K > 0 && binary ? bits.data_ptr<int32_t>() : nullptr};
    const Isa isa = active_isa();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      binary ? run_kernel<LayerForward<T, true>>(isa, args, out, p, nrn, begin, end)
             : run_kernel<LayerForward<T, false>>(isa, args, out, p, nrn, begin, end);
    });
  });
  return {s, u_T, eta_T, u_ckpt, eta_ckpt, bits};
}

// out[i, k] = sum over blocks of part[blk, k, i] (part [nblocks, rows, Hp], out [H, rows]):
// the per-block partials of dW^T summed in block order in float64 (deterministic for any
// thread count), reading the partials row by row; parallel over k.
template <typename T>
void reduce_transposed(const T* part, int64_t nblocks, int64_t rows, int64_t Hp, int64_t H, T* out) {
  at::parallel_for(0, rows, 16, [&](int64_t k_begin, int64_t k_end) {
    std::vector<double> acc(H);
    for (int64_t k = k_begin; k < k_end; ++k) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const T* __restrict p = part + (blk * rows + k) * Hp;
        for (int64_t i = 0; i < H; ++i) acc[i] += double(p[i]);
      }
      for (int64_t i = 0; i < H; ++i) out[i * rows + k] = T(acc[i]);
    }
  });
}

// Tiles [tile_begin, tile_end) of the dense-input weight gradients (dense_dw_tile): tile t is
// inputs kGradInputs (t % n_ib) .. and columns kGradCols (t / n_ib) ..; the row chunks run
// outermost, so a chunk of dI and x stays in cache while the range's tiles read it.
template <typename T>
struct DenseInputGrad : CpuKernel<T> {
  template <Isa ISA>
  static void run(const T* dI, const T* x, int64_t N, int64_t H, int64_t I, bool with_bias, double* acc,
                  int64_t tile_begin, int64_t tile_end) {
    using S = Simd<ISA, T>;
    constexpr int64_t L = S::L, W = IsaTraits<ISA>::kWtChunks * L;  // columns per register tile
    static const T one = T(1);
    const int64_t inputs = I + (with_bias ? 1 : 0), n_ib = (inputs + kGradInputs - 1) / kGradInputs;
    for (int64_t r0 = 0; r0 < N; r0 += kGradChunkRows) {
      const int64_t n = std::min(kGradChunkRows, N - r0);
      for (int64_t t = tile_begin; t < tile_end; ++t) {
        const int64_t i0 = (t % n_ib) * kGradInputs, h_end = std::min(H, (t / n_ib + 1) * kGradCols);
        const int ni = int(std::min<int64_t>(kGradInputs, inputs - i0));
        const T* x_col[kGradInputs];
        int64_t x_step[kGradInputs];
        for (int k = 0; k < kGradInputs; ++k) {
          const int64_t i = i0 + std::min(k, ni - 1);
          x_col[k] = i < I ? x + r0 * I + i : &one;
          x_step[k] = i < I ? I : 0;
        }
        for (int64_t h0 = (t / n_ib) * kGradCols; h0 < h_end; h0 += W) {
          const int64_t cols = std::min(W, h_end - h0), nv = (cols + L - 1) / L;
          // The last vector of a row may read past column H, into the next row (or, after the
          // last row, the scratch's padding: dense_input_grads): lanes that dense_dw_tile
          // drops, which only spares a zero-padded copy of the columns.
          with_chunks<IsaTraits<ISA>::kWtChunks>(nv, [&](auto nc) {
            dense_dw_tile<ISA, T, nc()>(dI + r0 * H + h0, H, n, x_col, x_step, ni, cols, acc + i0 * H + h0, H);
          });
        }
      }
    }
  }
};

// grad_w_in = dI^T x and grad_bias = the column sums of dI for dense inputs (dI2 [N, H], x2
// [N, I]) by DenseInputGrad, in float64 and rounded once: the same for any thread count.
void dense_input_grads(const at::Tensor& dI2, const at::Tensor& x2, at::Tensor& grad_w_in, at::Tensor* grad_bias,
                       Isa isa) {
  const int64_t N = dI2.size(0), H = dI2.size(1), I = x2.size(1), inputs = I + (grad_bias ? 1 : 0);
  const int64_t tiles = (H + kGradCols - 1) / kGradCols * ((inputs + kGradInputs - 1) / kGradInputs);
  at::Tensor acc = at::zeros({inputs, H}, grad_w_in.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(dI2.scalar_type(), "srnn_fast::dense_input_grads", [&] {
    using T = scalar_t;
    const T *d = dI2.data_ptr<T>(), *x = x2.data_ptr<T>();
    double* a = acc.data_ptr<double>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      run_kernel<DenseInputGrad<T>>(isa, d, x, N, H, I, grad_bias != nullptr, a, begin, end);
    });
  });
  grad_w_in.copy_(acc.narrow(0, 0, I).t());
  if (grad_bias) grad_bias->copy_(acc.select(0, I));
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
  // Dense inputs: x_proj by GEMM (as in forward), and dW_in, db from dI afterwards (dense_input_grads).
  const bool dense = dense_input(xc);
  const at::Tensor xp = dense ? project(xc, w_in, bias) : at::Tensor();
  // dI [T, B, H] for the sums after the kernel: dW_in = dI^T x (dense), dL/dx = dI W_in (a GEMM).
  // Padded to a whole 64-byte vector past the last row: DenseInputGrad's last vector may read there.
  const int64_t dI_pad = padded(H, int64_t(opts.dtype().itemsize())) - H;
  const at::Tensor dI = dense || need_grad_x ? scratch(kScratchDI, {T_, B, H}, opts, dI_pad) : at::Tensor();
  at::Tensor part = at::empty({need_grad_tau ? 2 : 0, B, H}, opts.dtype(at::kDouble));
  at::Tensor win_part = at::empty({dense ? 0 : nblocks, I, Hp}, opts);
  at::Tensor bias_part = at::empty({dense ? 0 : nblocks, 1, Hp}, opts);
  at::Tensor wrec_part = at::empty({nblocks, H, Hp}, opts);
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
    const LayerArgs<T> args = layer_args<T>(xc, xp, winT, bp, wT, w, u0c, eta0c, s0c, sh, K);
    double* dalpha_part = need_grad_tau ? part.data_ptr<double>() : nullptr;
    double* drho_part = need_grad_tau ? dalpha_part + B * H : nullptr;
    const LayerGrads<T> g{gs.data_ptr<T>(), guT.data_ptr<T>(), geT.data_ptr<T>(), uck.data_ptr<T>(),
                          eck.data_ptr<T>(), binary ? spk.data_ptr<int32_t>() : nullptr,
                          binary ? nullptr : spk.data_ptr<T>(), dI.defined() ? dI.data_ptr<T>() : nullptr,
                          grad_u0.data_ptr<T>(), grad_eta0.data_ptr<T>(), grad_s0.data_ptr<T>(), dalpha_part,
                          drho_part, dense ? nullptr : win_part.data_ptr<T>(),
                          dense ? nullptr : bias_part.data_ptr<T>(), wrec_part.data_ptr<T>()};
    const Isa isa = active_isa();
    at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
      binary ? run_kernel<LayerBackward<T, true>>(isa, args, g, p, nrn, begin, end)
             : run_kernel<LayerBackward<T, false>>(isa, args, g, p, nrn, begin, end);
    });
    // Deterministic reductions in float64: over rows (tau grads) and blocks (weights).
    if (need_grad_tau)
      reduce_tau_grads(dalpha_part, drho_part, B, H, nrn, grad_alpha.data_ptr<T>(), grad_rho.data_ptr<T>());
    reduce_transposed(wrec_part.data_ptr<T>(), nblocks, H, Hp, H, grad_w_rec.data_ptr<T>());
    if (!dense) {
      reduce_transposed(win_part.data_ptr<T>(), nblocks, I, Hp, H, grad_w_in.data_ptr<T>());
      if (has_bias) reduce_transposed(bias_part.data_ptr<T>(), nblocks, 1, Hp, H, grad_bias.data_ptr<T>());
    }
  });
  const at::Tensor dI2 = dI.defined() ? dI.view({T_ * B, H}) : at::Tensor();
  if (dense) dense_input_grads(dI2, xc.view({T_ * B, I}), grad_w_in, has_bias ? &grad_bias : nullptr, active_isa());
  if (need_grad_x) {
    at::Tensor grad_x2 = grad_x.view({T_ * B, I});
    at::mm_out(grad_x2, dI2, w_in);
  }
  return {grad_x, grad_w_in, grad_bias, grad_w_rec, grad_alpha, grad_rho, grad_u0, grad_eta0, grad_s0};
}

}  // namespace
}  // namespace srnn

TORCH_LIBRARY_IMPL(srnn_fast, CPU, m) {
  m.impl("layer_fwd", &srnn::layer_fwd_cpu);
  m.impl("layer_bwd", &srnn::layer_bwd_cpu);
}
