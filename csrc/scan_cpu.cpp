// CPU kernels of the fused SRNN scan: the whole sequence of one layer per op call,
// parallel over the batch (at::parallel_for / OpenMP), float32 and float64.
// Contract (inputs, outputs, what is saved): srnn_fast/scan.py. Neuron math: srnn_neuron.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace srnn {
namespace {

// ---------------------------------------------------------------------------------------
// Forward: rows [b_begin, b_end) over all T steps.
// ---------------------------------------------------------------------------------------
template <typename T>
struct FwdArgs {
  const T* x;      // [T, B, H]
  const T* wT;     // [H, Hp], W^T zero-padded: row j = column j of W
  const T* u0;     // [B, H]
  const T* eta0;   // [B, H]
  const T* s0;     // [B, H], may be non-binary (user state)
  T* s;            // [T, B, H]
  T* u_T;          // [B, H]
  T* eta_T;        // [B, H]
  T* u_seq;        // [T, B, H] or null
  int32_t* bits;   // [T, B, W] or null
  int64_t T_, B, H, Hp;
};

template <Isa ISA, typename T, bool BINARY>
SRNN_INLINE void forward_rows(const FwdArgs<T>& a, const Params<T>& params, const Neurons<T>& nrn,
                              int64_t b_begin, int64_t b_end) {
  Params<T> p = params;
  p.binary = BINARY;  // a compile-time constant once inlined: the branch leaves the loop
  const int64_t H = a.H, B = a.B, W = spike_words(H), R = kFwdRowBlock;
  std::vector<T> u(R * H), eta(R * H), acc(a.Hp);
  std::vector<int32_t> idx(R * H), words(W);
  int64_t n_active[kFwdRowBlock];
  const T* s_prev[kFwdRowBlock];
  for (int64_t b0 = b_begin; b0 < b_end; b0 += R) {  // rows b0 .. b0 + nr - 1 in lockstep over t
    const int64_t nr = std::min(R, b_end - b0);
    std::memcpy(u.data(), a.u0 + b0 * H, nr * H * sizeof(T));
    std::memcpy(eta.data(), a.eta0 + b0 * H, nr * H * sizeof(T));
    for (int64_t r = 0; r < nr; ++r) {
      s_prev[r] = a.s0 + (b0 + r) * H;
      n_active[r] = nonzero_index<ISA>(s_prev[r], H, idx.data() + r * H);
    }
    for (int64_t t = 0; t < a.T_; ++t) {
      const int64_t off0 = (t * B + b0) * H;  // the block's rows of step t are contiguous
      if (t + kPrefetchSteps < a.T_) {
        const int64_t ahead = off0 + kPrefetchSteps * B * H;
        prefetch_row(a.x + ahead, nr * H * sizeof(T));
        prefetch_row<true>(a.s + ahead, nr * H * sizeof(T));
        if (a.u_seq) prefetch_row<true>(a.u_seq + ahead, nr * H * sizeof(T));
      }
      for (int64_t r = 0; r < nr; ++r) {
        // s0 is user state (multiply by its values); later spikes are 0/1 (BINARY): sums.
        recurrent_input<ISA>(a.wT, s_prev[r], idx.data() + r * H, n_active[r], BINARY && t > 0, a.Hp, acc.data());
        const int64_t off = off0 + r * H;
        T* __restrict uu = u.data() + r * H;
        T* __restrict ee = eta.data() + r * H;
        T* __restrict st = a.s + off;
        int32_t* bits = a.bits ? a.bits + (t * B + b0 + r) * W : words.data();
        forward_neurons<ISA>(p, nrn, H, a.x + off, acc.data(), s_prev[r], uu, ee, uu, ee, st, BINARY ? bits : nullptr);
        if (a.u_seq) std::memcpy(a.u_seq + off, uu, H * sizeof(T));
        s_prev[r] = st;
        if (BINARY) {  // the active set from the packed bits: cost grows with the spike count
          n_active[r] = bit_index(bits, W, idx.data() + r * H);
        } else {
          n_active[r] = nonzero_index<ISA>(st, H, idx.data() + r * H);
        }
      }
    }
    std::memcpy(a.u_T + b0 * H, u.data(), nr * H * sizeof(T));
    std::memcpy(a.eta_T + b0 * H, eta.data(), nr * H * sizeof(T));
  }
}

// The kernel of cpu_isa.h's run_kernel: built once per instruction set.
template <typename T, bool BINARY>
struct ScanForward : CpuKernel<T> {
  template <Isa ISA>
  static void run(const FwdArgs<T>& a, const Params<T>& p, const Neurons<T>& n, int64_t b, int64_t e) {
    forward_rows<ISA, T, BINARY>(a, p, n, b, e);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_fwd_cpu(
    const at::Tensor& x_proj, const at::Tensor& w_rec, const at::Tensor& alpha, const at::Tensor& rho,
    const at::Tensor& u0, const at::Tensor& eta0, const at::Tensor& s0, bool binary, double b0, double beta,
    double dt, double r_m, bool save) {
  TORCH_CHECK(x_proj.defined() && x_proj.dim() == 3, "srnn_fast: x_proj must be [T, B, H] (3-D); got ",
              x_proj.defined() ? describe(x_proj) : std::string("an undefined tensor"));
  const int64_t T_ = x_proj.size(0), B = x_proj.size(1), H = x_proj.size(2);
  TORCH_CHECK(T_ >= 1 && B >= 1 && H >= 1, "srnn_fast: x_proj must have T, B, H >= 1; got ", describe(x_proj));
  const at::Device dev = x_proj.device();
  TORCH_CHECK(w_rec.defined(), "srnn_fast: w_rec must be a tensor; got an undefined tensor");
  check_state_dtype(w_rec);
  const auto dtype = w_rec.scalar_type();
  check_x_dtype(x_proj, dtype);  // before the rest: a dtype mismatch is named as x_proj vs w_rec
  check_scan_params(w_rec, alpha, rho, u0, eta0, s0, B, H, dev);

  const auto opts = w_rec.options();
  at::Tensor s = new_output({T_, B, H}, opts);
  at::Tensor u_T = new_output({B, H}, opts), eta_T = new_output({B, H}, opts);
  at::Tensor u_seq = new_output(save ? at::IntArrayRef{T_, B, H} : at::IntArrayRef{0}, opts);
  at::Tensor bits = new_output(save && binary ? at::IntArrayRef{T_, B, spike_words(H)} : at::IntArrayRef{0},
                               opts.dtype(at::kInt));

  const at::Tensor x = x_proj.to(dtype).contiguous();
  const int64_t Hp = padded(H, w_rec.element_size());
  at::Tensor wT = at::zeros({H, Hp}, w_rec.options());
  wT.narrow(1, 0, H).copy_(w_rec.t());
  const at::Tensor a_c = alpha.contiguous(), r_c = rho.contiguous();
  const at::Tensor u0c = u0.contiguous(), eta0c = eta0.contiguous(), s0c = s0.contiguous();

  AT_DISPATCH_FLOATING_TYPES(dtype, "srnn_fast::scan_fwd", [&] {
    using T = scalar_t;
    check_decay_values<T>(a_c, "alpha", "tau_m", false);
    check_decay_values<T>(r_c, "rho", "tau_adp", true);
    const Params<T> p = make_params<T>(binary, b0, beta, dt, r_m);
    const Neurons<T> nrn(a_c.data_ptr<T>(), r_c.data_ptr<T>(), p.r_m, H);
    const FwdArgs<T> args{x.data_ptr<T>(), wT.data_ptr<T>(), u0c.data_ptr<T>(), eta0c.data_ptr<T>(),
                          s0c.data_ptr<T>(), s.data_ptr<T>(), u_T.data_ptr<T>(), eta_T.data_ptr<T>(),
                          save ? u_seq.data_ptr<T>() : nullptr,
                          save && binary ? bits.data_ptr<int32_t>() : nullptr, T_, B, H, Hp};
    const Isa isa = active_isa();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      binary ? run_kernel<ScanForward<T, true>>(isa, args, p, nrn, begin, end)
             : run_kernel<ScanForward<T, false>>(isa, args, p, nrn, begin, end);
    });
  });
  return {s, u_T, eta_T, u_seq, bits};
}

// ---------------------------------------------------------------------------------------
// Backward: rows [b_begin, b_end), t = T..1, recomputing eta_t (and theta_t) from eta0 and
// the saved spikes; u_t comes from u_seq.
// ---------------------------------------------------------------------------------------
template <typename T>
struct BwdArgs {
  const T* grad_s;      // [T, B, H]
  const T* grad_u_T;    // [B, H]
  const T* grad_eta_T;  // [B, H]
  const T* w;           // [H, Hp], W zero-padded: (W^T dI)[j] = sum_i W[i, j] dI[i], rows contiguous
  const T* u0;          // [B, H]
  const T* eta0;        // [B, H]
  const T* s0;          // [B, H]
  const T* u_seq;       // [T, B, H]
  const int32_t* bits;  // [T, B, W] (binary) or null
  const T* s_seq;       // [T, B, H] (relu) or null
  T* grad_x;            // [T, B, H]
  T* grad_u0;           // [B, H]
  T* grad_eta0;         // [B, H]
  T* grad_s0;           // [B, H]
  double* dalpha_num;   // [B, H] per-row sums, reduced over B in a fixed order afterwards; null
                        // (and drho too): no tau gradient asked for, the sums are skipped
  double* drho;         // [B, H]
  int64_t T_, B, H, Hp;
};


template <Isa ISA, typename T, bool BINARY>
SRNN_INLINE void backward_rows(const BwdArgs<T>& a, const Params<T>& params, const Neurons<T>& nrn,
                               int64_t b_begin, int64_t b_end) {
  Params<T> p = params;
  p.binary = BINARY;
  const int64_t H = a.H, B = a.B, T_ = a.T_, W = spike_words(H), R = kRowBlock;
  std::vector<T> eta_all(R * (T_ + 1) * H);  // [R, T+1, H]: eta_0 .. eta_T of each row
  const int64_t Hp = a.Hp;
  std::vector<T> s_buf(R * Hp), du(R * H), deta(R * H), ds(R * H), sg(H), zeros(H, T(0));
  std::vector<double> dalpha(R * H), drho(R * H);
  // s_{t-1} [H] of row b for step t (1-based): s0, or the saved spikes of step t-1.
  auto s_prev_of = [&](int64_t b, int64_t t, T* buf) -> const T* {
    if (t == 1) return a.s0 + b * H;
    const int64_t off = (t - 2) * B + b;
    if (!BINARY) return a.s_seq + off * H;
    unpack_bits<ISA>(a.bits + off * W, H, buf);
    return buf;
  };
  for (int64_t b0 = b_begin; b0 < b_end; b0 += R) {
    const int64_t nr = std::min(R, b_end - b0);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t b = b0 + r;
      T* eta = eta_all.data() + r * (T_ + 1) * H;
      std::memcpy(eta, a.eta0 + b * H, H * sizeof(T));
      for (int64_t t = 1; t <= T_; ++t) {  // the forward's eta update, bit for bit
        const T* __restrict sp = s_prev_of(b, t, s_buf.data());
        const T* __restrict e0 = eta + (t - 1) * H;
        T* __restrict e1 = eta + t * H;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) e1[i] = nrn.rho[i] * e0[i] + nrn.one_m_rho[i] * sp[i];
      }
      std::memcpy(du.data() + r * H, a.grad_u_T + b * H, H * sizeof(T));
      std::memcpy(deta.data() + r * H, a.grad_eta_T + b * H, H * sizeof(T));
    }
    std::fill(ds.begin(), ds.end(), T(0));  // dL/ds_t arriving from step t+1
    std::fill(dalpha.begin(), dalpha.end(), 0.0);
    std::fill(drho.begin(), drho.end(), 0.0);
    for (int64_t t = T_; t >= 1; --t) {
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t b = b0 + r, off = ((t - 1) * B + b) * H;
        if (t - 1 - kPrefetchSteps >= 0) {
          const int64_t behind = off - kPrefetchSteps * B * H;
          prefetch_row(a.u_seq + behind, H * sizeof(T));
          prefetch_row(a.grad_s + behind, H * sizeof(T));
          prefetch_row<true>(a.grad_x + behind, H * sizeof(T));
          if (BINARY) prefetch_row(a.bits + behind / H * W, W * sizeof(int32_t));
          else prefetch_row(a.s_seq + behind, H * sizeof(T));
        }
        const T* __restrict sp = s_prev_of(b, t, s_buf.data() + r * Hp);
        const T* __restrict u_prev = t == 1 ? a.u0 + b * H : a.u_seq + off - B * H;
        const T* __restrict u_cur = a.u_seq + off;
        const T* __restrict e_prev = eta_all.data() + (r * (T_ + 1) + t - 1) * H;
        const T* __restrict e_cur = e_prev + H;
        const T* __restrict gs = a.grad_s + off;
        T* __restrict dI = a.grad_x + off;
        T* __restrict du_r = du.data() + r * H;
        T* __restrict deta_r = deta.data() + r * H;
        T* __restrict ds_r = ds.data() + r * H;
        double* __restrict da_r = a.dalpha_num != nullptr ? dalpha.data() + r * H : nullptr;
        double* __restrict dr_r = a.dalpha_num != nullptr ? drho.data() + r * H : nullptr;
        backward_neurons<ISA, T, BINARY>(p, nrn, H, sg.data(), u_prev, u_cur, e_prev, e_cur, sp, gs, dI, ds_r, du_r,
                                    deta_r, da_r, dr_r);
      }
      const T* dI_rows[kRowBlock];
      for (int64_t r = 0; r < R; ++r) dI_rows[r] = r < nr ? a.grad_x + ((t - 1) * B + b0 + r) * H : zeros.data();
      add_wT_dI<ISA>(a.w, dI_rows, nr, H, Hp, ds.data());
    }
    store_block_grads(b0, nr, H, du.data(), deta.data(), ds.data(), dalpha.data(), drho.data(), a.grad_u0,
                      a.grad_eta0, a.grad_s0, a.dalpha_num, a.drho);
  }
}

template <typename T, bool BINARY>
struct ScanBackward : CpuKernel<T> {
  template <Isa ISA>
  static void run(const BwdArgs<T>& a, const Params<T>& p, const Neurons<T>& n, int64_t b, int64_t e) {
    backward_rows<ISA, T, BINARY>(a, p, n, b, e);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd_cpu(
    const at::Tensor& grad_s, const at::Tensor& grad_u_T, const at::Tensor& grad_eta_T, const at::Tensor& w_rec,
    const at::Tensor& alpha, const at::Tensor& rho, const at::Tensor& u0, const at::Tensor& eta0,
    const at::Tensor& s0, const at::Tensor& u_seq, const at::Tensor& spikes, bool binary, int64_t surrogate,
    double b0, double beta, double dt, double r_m, double sigma, double gamma, bool need_grad_tau) {
  TORCH_CHECK(grad_s.defined() && grad_s.dim() == 3, "srnn_fast: grad_s must be [T, B, H] (3-D); got ",
              grad_s.defined() ? describe(grad_s) : std::string("an undefined tensor"));
  const int64_t T_ = grad_s.size(0), B = grad_s.size(1), H = grad_s.size(2);
  TORCH_CHECK(T_ >= 1 && B >= 1 && H >= 1, "srnn_fast: grad_s must have T, B, H >= 1; got ", describe(grad_s));
  check_surrogate(surrogate);
  const at::Device dev = grad_s.device();
  check_scan_params(w_rec, alpha, rho, u0, eta0, s0, B, H, dev);
  const auto dtype = w_rec.scalar_type();
  check_input(u_seq, "u_seq", {T_, B, H}, "[T, B, H]", dtype, dev);
  check_backward_inputs(grad_s, grad_u_T, grad_eta_T, spikes, binary, T_, B, H, dtype, dev);

  const auto opts = w_rec.options();
  at::Tensor grad_x = new_output({T_, B, H}, opts);
  // Without need_grad_tau (frozen time constants) grad_alpha and grad_rho are [0] and their
  // per-step terms are never computed.
  const std::vector<int64_t> tau_shape{need_grad_tau ? H : 0};
  at::Tensor grad_alpha = new_output(tau_shape, opts), grad_rho = new_output(tau_shape, opts);
  at::Tensor grad_u0 = new_output({B, H}, opts), grad_eta0 = new_output({B, H}, opts);
  at::Tensor grad_s0 = new_output({B, H}, opts);
  // Per-row partial sums in float64, reduced over B in row order: deterministic for any
  // thread count, and no float32 drift over T * B terms.
  at::Tensor part = at::empty({need_grad_tau ? 2 : 0, B, H}, opts.dtype(at::kDouble));

  const at::Tensor gs = grad_s.contiguous(), guT = grad_u_T.contiguous(), getaT = grad_eta_T.contiguous();
  const int64_t Hp = padded(H, w_rec.element_size());
  at::Tensor w = at::zeros({H, Hp}, w_rec.options());
  w.narrow(1, 0, H).copy_(w_rec);
  const at::Tensor a_c = alpha.contiguous(), r_c = rho.contiguous();
  const at::Tensor u0c = u0.contiguous(), eta0c = eta0.contiguous(), s0c = s0.contiguous();
  const at::Tensor useq = u_seq.contiguous(), spk = spikes.contiguous();

  AT_DISPATCH_FLOATING_TYPES(dtype, "srnn_fast::scan_bwd", [&] {
    using T = scalar_t;
    check_decay_values<T>(a_c, "alpha", "tau_m", false);
    check_decay_values<T>(r_c, "rho", "tau_adp", true);
    const Params<T> p = make_params<T>(binary, b0, beta, dt, r_m, sigma, gamma, int(surrogate));
    const Neurons<T> nrn(a_c.data_ptr<T>(), r_c.data_ptr<T>(), p.r_m, H);
    double* dalpha_part = need_grad_tau ? part.data_ptr<double>() : nullptr;
    double* drho_part = need_grad_tau ? dalpha_part + B * H : nullptr;
    const BwdArgs<T> args{gs.data_ptr<T>(), guT.data_ptr<T>(), getaT.data_ptr<T>(), w.data_ptr<T>(),
                          u0c.data_ptr<T>(), eta0c.data_ptr<T>(), s0c.data_ptr<T>(), useq.data_ptr<T>(),
                          binary ? spk.data_ptr<int32_t>() : nullptr, binary ? nullptr : spk.data_ptr<T>(),
                          grad_x.data_ptr<T>(), grad_u0.data_ptr<T>(), grad_eta0.data_ptr<T>(),
                          grad_s0.data_ptr<T>(), dalpha_part, drho_part, T_, B, H, Hp};
    // Blocks of whole kRowBlock rows per task, so the W^T dI products are shared.
    const Isa isa = active_isa();
    at::parallel_for(0, (B + kRowBlock - 1) / kRowBlock, 1, [&](int64_t begin, int64_t end) {
      const int64_t b_begin = begin * kRowBlock, b_end = std::min(B, end * kRowBlock);
      binary ? run_kernel<ScanBackward<T, true>>(isa, args, p, nrn, b_begin, b_end)
             : run_kernel<ScanBackward<T, false>>(isa, args, p, nrn, b_begin, b_end);
    });
    if (need_grad_tau)
      reduce_tau_grads(dalpha_part, drho_part, B, H, nrn, grad_alpha.data_ptr<T>(), grad_rho.data_ptr<T>());
  });
  return {grad_x, grad_alpha, grad_rho, grad_u0, grad_eta0, grad_s0};
}

// dW_rec = sum_{t,b} dI[t,b,:]^T s_{t-1}[b,:] from the spike bits: for binary spikes a sum of
// dI rows into the rows of dW^T of the neurons that spiked, so the cost follows the spike
// count. Rows (t, b) are split into a fixed number of chunks, each summed in float64 into its
// own partial, and the partials are added in chunk order: deterministic for any thread count.
constexpr int64_t kOuterChunks = 32;

at::Tensor grad_w_rec_cpu(const at::Tensor& grad_x, const at::Tensor& spk_bits, const at::Tensor& s0) {
  TORCH_CHECK(s0.defined() && s0.dim() == 2, "srnn_fast: s0 must be [B, H] (2-D); got ",
              s0.defined() ? describe(s0) : std::string("an undefined tensor"));
  check_state_dtype(s0);
  TORCH_CHECK(grad_x.defined() && grad_x.dim() == 3 && grad_x.size(0) >= 1,
              "srnn_fast: grad_x must be [T, B, H] with T >= 1; got ",
              grad_x.defined() ? describe(grad_x) : std::string("an undefined tensor"));
  const int64_t T_ = grad_x.size(0), B = s0.size(0), H = s0.size(1), W = spike_words(H);
  check_input(grad_x, "grad_x", {T_, B, H}, "[T, B, H]", s0.scalar_type(), s0.device());
  check_input(spk_bits, "spk_bits", {T_, B, W}, "[T, B, ceil(H/32)]", at::kInt, s0.device());
  const at::Tensor gx = grad_x.contiguous(), bits = spk_bits.contiguous(), s0c = s0.contiguous();
  const int64_t N = T_ * B, chunks = std::min(N, kOuterChunks), Hp = padded(H, sizeof(double));
  at::Tensor part = at::zeros({chunks, H, Hp}, s0.options().dtype(at::kDouble));  // dW^T partials
  at::Tensor out = new_output({H, H}, s0.options());
  AT_DISPATCH_FLOATING_TYPES(s0.scalar_type(), "srnn_fast::grad_w_rec", [&] {
    using T = scalar_t;
    const T* dI = gx.data_ptr<T>();
    const T* s0p = s0c.data_ptr<T>();
    const int32_t* src = bits.data_ptr<int32_t>();
    double* parts = part.data_ptr<double>();
    at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        double* __restrict acc = parts + c * H * Hp;  // [H, Hp]: row j = column j of dW
        for (int64_t n = c * N / chunks; n < (c + 1) * N / chunks; ++n) {
          const T* __restrict d = dI + n * H;
          if (n < B) {  // t = 0: s_0 is user state, any real value
            for (int64_t j = 0; j < H; ++j) {
              const double sj = double(s0p[n * H + j]);
              if (sj == 0.0) continue;
              double* __restrict row = acc + j * Hp;
              for (int64_t i = 0; i < H; ++i) row[i] += sj * double(d[i]);
            }
            continue;
          }
          const int32_t* w = src + (n - B) * W;  // s_{t-1} of row (t, b) = bits of (t-1, b)
          for (int64_t k = 0; k < W; ++k)
            for (uint32_t word = uint32_t(w[k]); word != 0; word &= word - 1) {
              double* __restrict row = acc + (k * 32 + __builtin_ctz(word)) * Hp;
              for (int64_t i = 0; i < H; ++i) row[i] += double(d[i]);
            }
        }
      }
    });
    T* o = out.data_ptr<T>();
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < H; ++j) {
        double sum = 0.0;
        for (int64_t c = 0; c < chunks; ++c) sum += parts[(c * H + j) * Hp + i];
        o[i * H + j] = T(sum);
      }
  });
  return out;
}

}  // namespace
}  // namespace srnn

TORCH_LIBRARY_IMPL(srnn_fast, CPU, m) {
  m.impl("scan_fwd", &srnn::scan_fwd_cpu);
  m.impl("scan_bwd", &srnn::scan_bwd_cpu);
  m.impl("grad_w_rec", &srnn::grad_w_rec_cpu);
}
