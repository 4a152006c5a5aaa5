// The schemas of the scan ops, for the library that defines them (module.cpp: srnn_fast::)
// and the CUDA harness's copy of the CUDA path (sim/cuda_sim.cpp: srnn_fast_sim::).
// Contract: srnn_fast/scan.py. alpha = exp(-dt/tau_m), rho = exp(-dt/tau_adp), [H].
// need_grad_tau = false (frozen time constants): grad_alpha and grad_rho come back [0],
// and kernels may skip the work that makes them.
#pragma once

namespace srnn {

constexpr const char* kScanFwdSchema =
    "scan_fwd(Tensor x_proj, Tensor w_rec, Tensor alpha, Tensor rho, Tensor u0, Tensor eta0, Tensor s0, "
    "bool binary, float b0, float beta, float dt, float r_m, bool save) "
    "-> (Tensor s, Tensor u_T, Tensor eta_T, Tensor u_seq, Tensor spk_bits)";

constexpr const char* kScanBwdSchema =
    "scan_bwd(Tensor grad_s, Tensor grad_u_T, Tensor grad_eta_T, Tensor w_rec, Tensor alpha, Tensor rho, "
    "Tensor u0, Tensor eta0, Tensor s0, Tensor u_seq, Tensor spikes, bool binary, int surrogate, float b0, "
    "float beta, float dt, float r_m, float sigma, float gamma, bool need_grad_tau=True) "
    "-> (Tensor grad_x, Tensor grad_alpha, Tensor grad_rho, Tensor grad_u0, Tensor grad_eta0, Tensor grad_s0)";

}  // namespace srnn
