// Host side of the CUDA scan: argument checks, launch planning (cuda_plan.h) and launches
// of the kernels in scan_cuda_kernels.cuh. One source for two builds: scan_cuda.cu (CUDA
// tensors, the real GPU) and sim/cuda_sim.cpp (CPU tensors, the harness); what differs
// between them is srnn::gpu:: in gpu_compat.h. Contract of the ops: srnn_fast/scan.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda_plan.h"
#include "gpu_compat.h"
#include "scan_cuda_kernels.cuh"
#include "srnn_neuron.h"

namespace srnn {
namespace {

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return poisoned(at::empty(sizes, opts));
}

void check_common(const at::Tensor& w_rec, const at::Tensor& alpha, const at::Tensor& rho, const at::Tensor& u0,
                  const at::Tensor& eta0, const at::Tensor& s0, int64_t B, int64_t H) {
  TORCH_CHECK(w_rec.defined() && w_rec.device().type() == gpu::kDeviceType, "srnn_fast: ", gpu::kKernelsName,
              " need ", c10::DeviceTypeName(gpu::kDeviceType), " tensors; w_rec is ",
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
  constexpr auto persistent = fwd_persistent_kernel<T, X>;
  const ScanPlan plan = plan_forward(B, H, sizeof(T), gpu::device_limits<persistent>(x.get_device()));
  const X* xp = x.data_ptr<X>();
  int32_t* bp = save && p.binary ? bits.data_ptr<int32_t>() : nullptr;
  T* usp = save ? u_seq.data_ptr<T>() : nullptr;
  if (plan.persistent()) {
    gpu::allow_dynamic_smem<persistent>(plan.smem);
    gpu::launch<persistent>(plan.grid, dim3(plan.block_x, plan.rows), plan.smem, xp, w.data_ptr<T>(),
                            alpha.data_ptr<T>(), rho.data_ptr<T>(), u0.data_ptr<T>(), eta0.data_ptr<T>(),
                            s0.data_ptr<T>(), s.data_ptr<T>(), u_T.data_ptr<T>(), eta_T.data_ptr<T>(), usp, bp, T_, B,
                            H, p, save);
    return;
  }
  // Stepwise: rec = s_{t-1} W^T by GEMM, then the neuron update. u/eta live in u_T/eta_T.
  u_T.copy_(u0);
  eta_T.copy_(eta0);
  const at::Tensor w_t = w.t();
  at::Tensor rec = at::empty({B, H}, w.options());
  const int64_t BH = static_cast<int64_t>(B) * H, nw = spike_words(H);
  for (int k = 0; k < T_; ++k) {
    const at::Tensor s_prev = k == 0 ? s0 : s[k - 1];
    at::mm_out(rec, s_prev, w_t);
    gpu::launch<fwd_step_kernel<T, X>>(plan.grid, plan.block_x, 0, xp + k * BH, rec.data_ptr<T>(),
                                       alpha.data_ptr<T>(), rho.data_ptr<T>(), s_prev.data_ptr<T>(),
                                       u_T.data_ptr<T>(), eta_T.data_ptr<T>(), s.data_ptr<T>() + k * BH,
                                       usp ? usp + k * BH : nullptr,
                                       bp ? bp + static_cast<int64_t>(k) * B * nw : nullptr, B, H, p, save);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_fwd_gpu(
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
  const gpu::DeviceGuard guard(x_proj.device());
  // Below autograd: the stepwise path's GEMMs write into buffers (at::mm_out), which autograd
  // refuses where an input requires grad (a direct call of the op; autograd.Function calls
  // it without grad).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;

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
  constexpr auto persistent = bwd_persistent_kernel<T>;
  const ScanPlan plan = plan_backward(B, H, sizeof(T), gpu::device_limits<persistent>(u_seq.get_device()));
  const int32_t* bits = p.binary ? spikes.data_ptr<int32_t>() : nullptr;
  const T* vals = p.binary ? nullptr : spikes.data_ptr<T>();
  if (plan.persistent()) {
    at::Tensor part_alpha = at::empty({plan.grid, H}, w.options()), part_rho = at::empty({plan.grid, H}, w.options());
    gpu::allow_dynamic_smem<persistent>(plan.smem);
    gpu::launch<persistent>(plan.grid, dim3(plan.block_x, plan.rows), plan.smem, grad_s.data_ptr<T>(),
                            grad_u_T.data_ptr<T>(), grad_eta_T.data_ptr<T>(), w.data_ptr<T>(), alpha.data_ptr<T>(),
                            rho.data_ptr<T>(), u0.data_ptr<T>(), eta0.data_ptr<T>(), s0.data_ptr<T>(),
                            u_seq.data_ptr<T>(), bits, vals, grad_x.data_ptr<T>(), part_alpha.data_ptr<T>(),
                            part_rho.data_ptr<T>(), grad_u0.data_ptr<T>(), grad_eta0.data_ptr<T>(),
                            grad_s0.data_ptr<T>(), T_, B, H, p);
    gpu::launch<reduce_parts_kernel<T>>(plan.reduce_grid, kElemThreads, 0, part_alpha.data_ptr<T>(),
                                        part_rho.data_ptr<T>(), alpha.data_ptr<T>(), plan.grid, H,
                                        grad_alpha.data_ptr<T>(), grad_rho.data_ptr<T>());
    return;
  }
  // Stepwise: eta into the grad_x scratch, then t = T..1 with rec = dI_{t+1} W by GEMM.
  gpu::launch<eta_kernel<T>>(plan.grid, kElemThreads, 0, rho.data_ptr<T>(), eta0.data_ptr<T>(), s0.data_ptr<T>(),
                             bits, vals, grad_x.data_ptr<T>(), T_, B, H, p);
  grad_u0.copy_(grad_u_T);  // du, deta carried in the outputs
  grad_eta0.copy_(grad_eta_T);
  at::Tensor ds_local = at::zeros({B, H}, w.options());
  at::Tensor acc_alpha = at::zeros({B, H}, w.options()), acc_rho = at::zeros({B, H}, w.options());
  at::Tensor rec = at::empty({B, H}, w.options());
  for (int k = T_ - 1; k >= 0; --k) {
    const bool has_rec = k + 1 < T_;
    if (has_rec) at::mm_out(rec, grad_x[k + 1], w);  // (dI_{k+1} W)[b, j] = sum_i dI[b, i] W[i, j]
    gpu::launch<bwd_step_kernel<T>>(plan.grid, kElemThreads, 0, k, grad_s.data_ptr<T>(),
                                    has_rec ? rec.data_ptr<T>() : nullptr, alpha.data_ptr<T>(), rho.data_ptr<T>(),
                                    u0.data_ptr<T>(), eta0.data_ptr<T>(), s0.data_ptr<T>(), u_seq.data_ptr<T>(), bits,
                                    vals, grad_x.data_ptr<T>(), grad_u0.data_ptr<T>(), grad_eta0.data_ptr<T>(),
                                    ds_local.data_ptr<T>(), acc_alpha.data_ptr<T>(), acc_rho.data_ptr<T>(), B, H, p);
  }
  at::Tensor s0_out = grad_s0;  // mm_out takes a mutable reference
  at::mm_out(s0_out, grad_x[0], w);
  s0_out.add_(ds_local);
  gpu::launch<reduce_parts_kernel<T>>(plan.reduce_grid, kElemThreads, 0, acc_alpha.data_ptr<T>(),
                                      acc_rho.data_ptr<T>(), alpha.data_ptr<T>(), B, H, grad_alpha.data_ptr<T>(),
                                      grad_rho.data_ptr<T>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd_gpu(
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
  const gpu::DeviceGuard guard(dev);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as scan_fwd_gpu

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

}  // namespace
}  // namespace srnn
