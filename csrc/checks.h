// Host-side argument checks for the srnn_fast:: ops, shared by the CPU and CUDA kernels.
//
// Every op checks all its tensors here before any kernel runs, so kernels may assume
// validated input; each message names the argument, what it got (shape, dtype, device)
// and what was expected. Device-agnostic: nothing here reads tensor data
// (poisoning writes outputs through ATen, on whatever device they live).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>

namespace srnn {

// SRNN_FAST_POISON=1 fills every output with NaN (spike words with all bits set) before the
// kernels run, so a test sees any element a kernel forgot to write; otherwise outputs are
// left uninitialised. `poisoned` takes a fresh output and returns it.
inline bool poison_outputs() {
  const char* v = std::getenv("SRNN_FAST_POISON");
  return v != nullptr && v[0] == '1';
}

inline at::Tensor poisoned(at::Tensor t) {
  if (poison_outputs()) {
    if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
    else t.fill_(-1);
  }
  return t;
}

inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << t.scalar_type() << ", device " << t.device();
  return os.str();
}

// Checks that `t` is defined, has exactly `shape` (spelled `dims` in the message, e.g.
// "[B, H]"), the given dtype and device. Contiguity is not required: ops make their own
// contiguous copies where they need them.
inline void check_input(const at::Tensor& t, const char* name, std::initializer_list<int64_t> shape,
                        const char* dims, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.defined(), "srnn_fast: ", name, " must be a tensor; got an undefined tensor");
  const at::IntArrayRef expected(shape);
  TORCH_CHECK(t.sizes() == expected, "srnn_fast: ", name, " must be ", dims, " = ", expected, "; got ",
              describe(t));
  TORCH_CHECK(t.scalar_type() == dtype, "srnn_fast: ", name, " must have dtype ", dtype, "; got ", describe(t));
  TORCH_CHECK(t.device() == device, "srnn_fast: ", name, " must be on ", device, " like the other inputs; got ",
              describe(t));
}

// The state dtype of a scan (w_rec's): the kernels compute in float32 or float64.
inline void check_state_dtype(const at::Tensor& w_rec) {
  const auto d = w_rec.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble,
              "srnn_fast: w_rec must be float32 or float64 (the kernels' state dtype); got ", describe(w_rec));
}

// x_proj shares the state dtype, or is float16/bfloat16 with float32 state.
inline void check_x_dtype(const at::Tensor& x_proj, at::ScalarType state) {
  const auto d = x_proj.scalar_type();
  TORCH_CHECK(d == state || (state == at::kFloat && (d == at::kHalf || d == at::kBFloat16)),
              "srnn_fast: x_proj must have dtype ", state,
              " like w_rec, or float16/bfloat16 with float32 w_rec; got ", describe(x_proj));
}

// The tensors every scan op takes (parameters and initial state), in the state dtype of
// w_rec and on `device`.
inline void check_scan_params(const at::Tensor& w_rec, const at::Tensor& alpha, const at::Tensor& rho,
                              const at::Tensor& u0, const at::Tensor& eta0, const at::Tensor& s0, int64_t B,
                              int64_t H, const at::Device& device) {
  TORCH_CHECK(w_rec.defined(), "srnn_fast: w_rec must be a tensor; got an undefined tensor");
  check_state_dtype(w_rec);
  const auto dtype = w_rec.scalar_type();
  check_input(w_rec, "w_rec", {H, H}, "[H, H]", dtype, device);
  check_input(alpha, "alpha", {H}, "[H]", dtype, device);
  check_input(rho, "rho", {H}, "[H]", dtype, device);
  check_input(u0, "u0", {B, H}, "[B, H]", dtype, device);
  check_input(eta0, "eta0", {B, H}, "[B, H]", dtype, device);
  check_input(s0, "s0", {B, H}, "[B, H]", dtype, device);
}

inline void check_surrogate(int64_t surrogate) {
  TORCH_CHECK(surrogate == 0 || surrogate == 1,
              "srnn_fast: surrogate must be 0 (gaussian) or 1 (multi_gaussian); got ", surrogate);
}

// Number of int32 words holding one row of H spike bits.
inline int64_t spike_words(int64_t H) { return (H + 31) / 32; }

// The tensors every backward op takes besides its forward's inputs: the output gradients
// and the saved spikes (bits for spiking neurons, the activations for relu).
inline void check_backward_inputs(const at::Tensor& grad_s, const at::Tensor& grad_u_T, const at::Tensor& grad_eta_T,
                                  const at::Tensor& spikes, bool binary, int64_t T, int64_t B, int64_t H,
                                  at::ScalarType dtype, const at::Device& device) {
  check_input(grad_s, "grad_s", {T, B, H}, "[T, B, H]", dtype, device);
  check_input(grad_u_T, "grad_u_T", {B, H}, "[B, H]", dtype, device);
  check_input(grad_eta_T, "grad_eta_T", {B, H}, "[B, H]", dtype, device);
  if (binary)
    check_input(spikes, "spikes (spike bits)", {T, B, spike_words(H)}, "[T, B, ceil(H/32)]", at::kInt, device);
  else
    check_input(spikes, "spikes (relu activations)", {T, B, H}, "[T, B, H]", dtype, device);
}

}  // namespace srnn
