// Per-element SRNN neuron math, shared by the CPU (C++) and CUDA kernels.
//
// One neuron, one batch row, step t (srnn_fast/reference.py states the same equations):
//   eta_t   = rho * eta_{t-1} + (1 - rho) * s_{t-1}
//   theta_t = b0 + beta * eta_t
//   u_t     = alpha * u_{t-1} + (1 - alpha) * r_m * I_t - theta_t * s_{t-1} * dt
//   s_t     = H(u_t - theta_t)  (binary)   or   relu(u_t - theta_t)
// where I_t = x_proj[t] + (W_rec s_{t-1}) is summed by the caller. Every expression keeps
// the reference's order of operations so that float64 spikes match it exactly.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SRNN_HD __host__ __device__ __forceinline__
#else
#define SRNN_HD inline
#endif

namespace srnn {

enum Surrogate : int { kGaussian = 0, kMultiGaussian = 1 };

// Scalars of one scan, cast once to the state type T so each product rounds like the
// reference's tensor-times-Python-float ops.
template <typename T>
struct Params {
  T b0, beta, dt, r_m, sigma, gamma;
  bool binary;    // spiking (s in {0, 1}) or "relu"
  int surrogate;  // Surrogate
};

template <typename T>
Params<T> make_params(bool binary, double b0, double beta, double dt, double r_m, double sigma = 0.5,
                      double gamma = 0.5, int surrogate = kGaussian) {
  return Params<T>{T(b0), T(beta), T(dt), T(r_m), T(sigma), T(gamma), binary, surrogate};
}

// Per-neuron constants from alpha = exp(-dt/tau_m), rho = exp(-dt/tau_adp).
template <typename T>
struct Decay {
  T alpha, rho;
  T in_gain;      // (1 - alpha) * r_m
  T one_m_rho;    // 1 - rho
  T one_m_alpha;  // 1 - alpha
};

template <typename T>
SRNN_HD Decay<T> make_decay(T alpha, T rho, T r_m) {
  return Decay<T>{alpha, rho, (T(1) - alpha) * r_m, T(1) - rho, T(1) - alpha};
}

SRNN_HD float exp_t(float x) { return expf(x); }
SRNN_HD double exp_t(double x) { return exp(x); }

// V is T, or (CPU) a vector of T: the same expression lane by lane.
template <typename T, typename V>
SRNN_HD V threshold(const Params<T>& p, V eta) { return p.b0 + p.beta * eta; }

// One forward step. In: u = u_{t-1}, eta = eta_{t-1}, s_prev, current = I_t.
// Out: u = u_t, eta = eta_t; returns s_t. V is T, or (CPU) a vector of T with Decay<V> of
// vectors: the same operations lane by lane (GCC's vector ?: selects per lane).
template <typename T, typename V>
SRNN_HD V forward_step(const Params<T>& p, const Decay<V>& d, V current, V s_prev, V& u, V& eta) {
  eta = d.rho * eta + d.one_m_rho * s_prev;
  const V theta = threshold(p, eta);
  u = d.alpha * u + d.in_gain * current - theta * s_prev * p.dt;
  const V v = u - theta;
  if (p.binary) return v > V{} ? V{} + T(1) : V{};
  return v > V{} ? v : V{};
}

// The exp used by the surrogate: libm / CUDA's by default; the CPU kernels pass a
// vectorizable one (scan_cpu.cpp) so the surrogate loop runs in SIMD lanes.
struct LibmExp {
  template <typename T>
  SRNN_HD T operator()(T x) const { return exp_t(x); }
};

template <typename T, typename V, typename Exp>
SRNN_HD V normal_pdf(V x, T mu, T sigma, Exp exp_fn) {
  const V z = x - mu;
  return exp_fn(-(z * z) / (T(2) * sigma * sigma)) * (T(0.3989422804014327) / sigma);
}

// The surrogate d s_t / d v_t of binary neurons at v = u_t - theta_t. V is T, or (CPU) a
// vector of T, computed lane by lane with the same operations.
template <typename T, typename V, typename Exp>
SRNN_HD V surrogate_grad(const Params<T>& p, V v, Exp exp_fn) {
  if (p.surrogate == kGaussian) return p.gamma * normal_pdf(v, T(0), p.sigma, exp_fn);
  const T wide = T(6) * p.sigma;
  return p.gamma * (T(1.15) * normal_pdf(v, T(0), p.sigma, exp_fn) - T(0.15) * normal_pdf(v, p.sigma, wide, exp_fn) -
                    T(0.15) * normal_pdf(v, -p.sigma, wide, exp_fn));
}

// d s_t / d v_t: the surrogate for binary neurons, the step for relu.
template <typename T, typename Exp = LibmExp>
SRNN_HD T spike_grad(const Params<T>& p, T v, Exp exp_fn = Exp()) {
  if (!p.binary) return v > T(0) ? T(1) : T(0);
  return surrogate_grad(p, v, exp_fn);
}

// What one backward step hands to the caller.
template <typename T>
struct StepGrads {
  T d_current;     // dL/dI_t (= dL/dx_proj[t]); the caller adds W^T dI_t to ds_prev
  T ds_prev;       // dL/ds_{t-1} from this neuron's own equations (eta and reset term)
  T dalpha_num;    // dL/dalpha contribution times (1 - alpha): divide the sum once at the end
  T drho;          // dL/drho contribution
};

// One backward step, t descending. In: the forward values u_prev = u_{t-1}, u = u_t,
// eta_prev = eta_{t-1}, eta = eta_t, s_prev = s_{t-1}; g_s = dL/ds_t (output gradient plus
// what step t+1 sent back). In/out carries: du = dL/du_t arriving from step t+1 (alpha *
// du_{t+1}), leaving as the same for step t-1; deta likewise with rho.
//
// d u_t / d alpha = u_{t-1} - r_m I_t = (u_{t-1} - u_t - theta_t s_{t-1} dt) / (1 - alpha):
// the identity spares saving I_t (or x_proj) for backward.
//
// backward_step_sg takes sg = spike_grad(p, u_t - theta_t) precomputed (V: T, or a vector of T
// on the CPU, lane by lane the same operations); backward_step computes it.
template <typename T, typename V>
SRNN_HD StepGrads<V> backward_step_sg(const Params<T>& p, const Decay<V>& d, V sg, V u_prev, V u, V eta_prev,
                                      V eta, V s_prev, V g_s, V& du, V& deta) {
  const V theta = threshold(p, eta);
  const V dv = g_s * sg;
  const V du_t = du + dv;
  const V dtheta = -dv - du_t * s_prev * p.dt;
  const V deta_t = deta + p.beta * dtheta;
  StepGrads<V> g;
  g.d_current = du_t * d.in_gain;
  g.ds_prev = d.one_m_rho * deta_t - theta * p.dt * du_t;
  g.dalpha_num = du_t * (u_prev - u - theta * s_prev * p.dt);
  g.drho = deta_t * (eta_prev - s_prev);
  du = d.alpha * du_t;
  deta = d.rho * deta_t;
  return g;
}

template <typename T>
SRNN_HD StepGrads<T> backward_step(const Params<T>& p, const Decay<T>& d, T u_prev, T u, T eta_prev, T eta,
                                   T s_prev, T g_s, T& du, T& deta) {
  const T sg = spike_grad(p, u - threshold(p, eta));
  return backward_step_sg(p, d, sg, u_prev, u, eta_prev, eta, s_prev, g_s, du, deta);
}

}  // namespace srnn
