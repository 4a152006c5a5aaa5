// srnn_fast._cuda_sim: the CUDA path of the scan (scan_cuda_host.h: checks, planning,
// launches; scan_cuda_kernels.cuh: the kernels) compiled by the host compiler against the
// execution harness (harness.h), registered as srnn_fast_sim::scan_fwd / scan_bwd on CPU
// tensors (backend "cuda_sim", tests only). Every op runs once under each schedule of the
// list (default: ascending and reversed thread order) and fails unless all give the same
// bits. The Python functions set the emulated device and schedules, read the launch log and
// plans, and run the harness's self-test kernels.
#include <Python.h>
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <exception>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../cuda_plan.h"
#include "../scan_cuda_host.h"
#include "../scan_schemas.h"
#include "harness.h"
#include "selftest_kernels.h"

namespace srnn {
namespace {

std::vector<sim::Schedule> g_schedules = {{sim::Order::kAscending, 0}, {sim::Order::kReversed, 0}};

// Where two runs' outputs differ, bit for bit ("" where they are equal).
std::string bit_difference(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return "shape or dtype differs";
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  const auto* p = static_cast<const unsigned char*>(x.data_ptr());
  const auto* q = static_cast<const unsigned char*>(y.data_ptr());
  const size_t n = x.numel(), size = x.element_size();
  int64_t count = 0, first = -1;
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(p + i * size, q + i * size, size) != 0) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++count;
    }
  }
  if (count == 0) return "";
  return std::to_string(count) + " of " + std::to_string(n) + " elements differ, the first at flat index " +
         std::to_string(first);
}

template <typename Tuple, size_t... I>
void compare_runs(const char* op, const Tuple& first, const Tuple& other, const sim::Schedule& s,
                  std::index_sequence<I...>) {
  const at::Tensor firsts[] = {std::get<I>(first)...}, others[] = {std::get<I>(other)...};
  for (size_t i = 0; i < sizeof...(I); ++i) {
    const std::string diff = bit_difference(firsts[i], others[i]);
    TORCH_CHECK(diff.empty(), "cuda_sim: ", op, " output ", i, " differs between thread schedules ",
                g_schedules[0].name(), " and ", s.name(), ": ", diff,
                " (a race: a missing __syncthreads or __syncwarp, or a shared-memory slot written by two threads)");
  }
}

// fn() under every schedule; the first run's outputs if all agree bit for bit.
template <typename Fn>
auto under_every_schedule(const char* op, Fn fn) {
  const sim::Schedule saved = sim::schedule();
  struct Restore {
    sim::Schedule s;
    ~Restore() { sim::set_schedule(s); }
  } restore{saved};
  sim::set_schedule(g_schedules[0]);
  auto first = fn();
  for (size_t i = 1; i < g_schedules.size(); ++i) {
    sim::set_schedule(g_schedules[i]);
    auto other = fn();
    compare_runs(op, first, other, g_schedules[i], std::make_index_sequence<std::tuple_size<decltype(first)>::value>{});
  }
  return first;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_fwd_sim(
    const at::Tensor& x_proj, const at::Tensor& w_rec, const at::Tensor& alpha, const at::Tensor& rho,
    const at::Tensor& u0, const at::Tensor& eta0, const at::Tensor& s0, bool binary, double b0, double beta,
    double dt, double r_m, bool save) {
  return under_every_schedule("scan_fwd", [&] {
    return scan_fwd_gpu(x_proj, w_rec, alpha, rho, u0, eta0, s0, binary, b0, beta, dt, r_m, save);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_bwd_sim(
    const at::Tensor& grad_s, const at::Tensor& grad_u_T, const at::Tensor& grad_eta_T, const at::Tensor& w_rec,
    const at::Tensor& alpha, const at::Tensor& rho, const at::Tensor& u0, const at::Tensor& eta0,
    const at::Tensor& s0, const at::Tensor& u_seq, const at::Tensor& spikes, bool binary, int64_t surrogate,
    double b0, double beta, double dt, double r_m, double sigma, double gamma, bool need_grad_tau) {
  return under_every_schedule("scan_bwd", [&] {
    return scan_bwd_gpu(grad_s, grad_u_T, grad_eta_T, w_rec, alpha, rho, u0, eta0, s0, u_seq, spikes, binary,
                        surrogate, b0, beta, dt, r_m, sigma, gamma, need_grad_tau);
  });
}

// ---------------------------------------------------------------------------------------
// The harness's self-test: a kernel of selftest_kernels.h on `blocks` blocks of `threads`
// threads (under the current schedule); returns its output, or raises the harness's error.
// ---------------------------------------------------------------------------------------
at::Tensor run_selftest(const std::string& name, int blocks, int threads) {
  using namespace selftest;
  const int64_t n = static_cast<int64_t>(blocks) * threads;
  at::Tensor out = at::full({n}, -1.0, at::kDouble);
  double* p = out.data_ptr<double>();
  const size_t smem = static_cast<size_t>(threads) * sizeof(double);
  if (name == "block_sum") {
    gpu::launch<block_sum>(blocks, threads, smem, p);
  } else if (name == "missing_barrier") {
    gpu::launch<missing_barrier>(blocks, threads, smem, p);
  } else if (name == "read_before_write") {
    gpu::launch<read_before_write>(blocks, threads, smem, p);
  } else if (name == "exit_before_barrier") {
    gpu::launch<exit_before_barrier>(blocks, threads, 0, p);
  } else if (name == "ballot_lane_missing") {
    gpu::launch<ballot_lane_missing>(blocks, threads, 0, p);
  } else if (name == "ballot_mask_without_caller") {
    gpu::launch<ballot_mask_without_caller>(blocks, threads, 0, p);
  } else if (name == "ballot_words") {
    gpu::launch<ballot_words>(blocks, threads, 0, p);
  } else if (name == "smem_attribute_over_limit") {  // cudaFuncSetAttribute past the opt-in limit
    const sim::Device& d = sim::device();
    gpu::allow_dynamic_smem<block_sum>(static_cast<size_t>(d.smem_optin - d.static_smem) + 1);
  } else if (name == "smem_without_attribute") {  // more than 48 KiB, attribute never raised
    gpu::launch<block_sum>(blocks, threads, 48 * 1024 + 8, p);
  } else {
    TORCH_CHECK(false, "cuda_sim.selftest: unknown kernel ", name);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Python functions
// ---------------------------------------------------------------------------------------
PyObject* raise_runtime_error(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  PyErr_SetString(PyExc_RuntimeError, c10_error != nullptr ? c10_error->what_without_backtrace() : e.what());
  return nullptr;
}

PyObject* set_device(PyObject*, PyObject* args) {
  sim::Device d;
  if (!PyArg_ParseTuple(args, "iii", &d.sms, &d.smem_optin, &d.static_smem)) return nullptr;
  if (d.sms < 1 || d.smem_optin < 0 || d.static_smem < 0 || d.static_smem > d.smem_optin) {
    PyErr_Format(PyExc_ValueError,
                 "cuda_sim: the emulated device needs sms >= 1 and 0 <= static_smem <= smem_optin; got %d, %d, %d",
                 d.sms, d.smem_optin, d.static_smem);
    return nullptr;
  }
  sim::device() = d;
  Py_RETURN_NONE;
}

PyObject* get_device(PyObject*, PyObject*) {
  const sim::Device& d = sim::device();
  return Py_BuildValue("(iii)", d.sms, d.smem_optin, d.static_smem);
}

sim::Schedule parse_schedule(const std::string& s) {
  if (s == "ascending") return {sim::Order::kAscending, 0};
  if (s == "reversed") return {sim::Order::kReversed, 0};
  if (s.rfind("shuffled:", 0) == 0 && s.size() > 9 && s.find_first_not_of("0123456789", 9) == std::string::npos)
    return {sim::Order::kShuffled, std::stoull(s.substr(9))};
  TORCH_CHECK(false, "cuda_sim: a schedule is 'ascending', 'reversed' or 'shuffled:SEED' (SEED digits); got '", s,
              "'");
}

PyObject* set_schedules(PyObject*, PyObject* arg) {
  PyObject* seq = PySequence_Fast(arg, "set_schedules expects a list of str");
  if (seq == nullptr) return nullptr;
  std::vector<sim::Schedule> out;
  try {
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
      PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
      const char* text = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : nullptr;
      TORCH_CHECK(text != nullptr, "cuda_sim: set_schedules expects a list of str");
      out.push_back(parse_schedule(text));
    }
    TORCH_CHECK(!out.empty(), "cuda_sim: set_schedules needs at least one schedule");
  } catch (const std::exception& e) {
    Py_DECREF(seq);
    return raise_runtime_error(e);
  }
  Py_DECREF(seq);
  g_schedules = out;
  Py_RETURN_NONE;
}

PyObject* get_schedules(PyObject*, PyObject*) {
  PyObject* out = PyList_New(Py_ssize_t(g_schedules.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < g_schedules.size(); ++i)
    PyList_SET_ITEM(out, Py_ssize_t(i), PyUnicode_FromString(g_schedules[i].name().c_str()));
  return out;
}

PyObject* launch_log(PyObject*, PyObject*) {
  const auto& log = sim::launch_log();
  PyObject* out = PyList_New(Py_ssize_t(log.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < log.size(); ++i) {
    const sim::LaunchRecord& r = log[i];
    PyList_SET_ITEM(out, Py_ssize_t(i),
                    Py_BuildValue("(s(III)(III)nL)", r.kernel.c_str(), r.grid.x, r.grid.y, r.grid.z, r.block.x,
                                  r.block.y, r.block.z, Py_ssize_t(r.smem), static_cast<long long>(r.count)));
  }
  return out;
}

PyObject* clear_launch_log(PyObject*, PyObject*) {
  sim::launch_log().clear();
  Py_RETURN_NONE;
}

// (rows, grid, block_x, smem) of plan_forward / plan_backward on the emulated device.
PyObject* plan(PyObject*, PyObject* args) {
  int B, H, is_double, forward;
  if (!PyArg_ParseTuple(args, "iipp", &B, &H, &is_double, &forward)) return nullptr;
  if (B < 1 || H < 1 || H > (1 << 25)) {
    PyErr_Format(PyExc_ValueError, "cuda_sim.plan: needs B >= 1 and 1 <= H <= 2^25; got B = %d, H = %d", B, H);
    return nullptr;
  }
  const sim::Device& d = sim::device();
  const gpu::DeviceLimits limits{d.smem_optin - d.static_smem, d.sms};
  const size_t elem = is_double ? sizeof(double) : sizeof(float);
  const ScanPlan p = forward ? plan_forward(B, H, elem, limits) : plan_backward(B, H, elem, limits);
  return Py_BuildValue("(iiin)", p.rows, p.grid, p.block_x, Py_ssize_t(p.smem));
}

PyObject* selftest(PyObject*, PyObject* args) {
  const char* name;
  int blocks, threads, every_schedule = 0;
  if (!PyArg_ParseTuple(args, "sii|p", &name, &blocks, &threads, &every_schedule)) return nullptr;
  try {
    // every_schedule: as the scan ops run, under each schedule of the list, compared.
    const at::Tensor out = every_schedule ? std::get<0>(under_every_schedule("selftest", [&] {
      return std::make_tuple(run_selftest(name, blocks, threads));
    })) : run_selftest(name, blocks, threads);
    PyObject* list = PyList_New(Py_ssize_t(out.numel()));
    if (list == nullptr) return nullptr;
    const double* p = out.data_ptr<double>();
    for (int64_t i = 0; i < out.numel(); ++i) PyList_SET_ITEM(list, Py_ssize_t(i), PyFloat_FromDouble(p[i]));
    return list;
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
}

PyObject* set_schedule_now(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "set_schedule expects a str");
    return nullptr;
  }
  try {
    sim::set_schedule(parse_schedule(PyUnicode_AsUTF8(arg)));
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_device", set_device, METH_VARARGS, "set_device(sms, smem_optin, static_smem): the emulated device."},
    {"get_device", get_device, METH_NOARGS, "(sms, smem_optin, static_smem) of the emulated device."},
    {"set_schedules", set_schedules, METH_O, "The thread schedules every op runs under (list of str)."},
    {"get_schedules", get_schedules, METH_NOARGS, "The thread schedules every op runs under."},
    {"set_schedule", set_schedule_now, METH_O, "The schedule of a direct launch (selftest)."},
    {"launch_log", launch_log, METH_NOARGS, "[(kernel, grid, block, smem, count)] since the last clear."},
    {"clear_launch_log", clear_launch_log, METH_NOARGS, "Empties the launch log."},
    {"plan", plan, METH_VARARGS, "plan(B, H, double, forward) -> (rows, grid, block_x, smem) on the emulated device."},
    {"selftest", selftest, METH_VARARGS, "selftest(kernel, blocks, threads, every_schedule=False) -> output list, or RuntimeError."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace srnn

extern "C" {
PyObject* PyInit__cuda_sim(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_sim", nullptr, -1, srnn::methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(srnn_fast_sim, m) {
  m.def(srnn::kScanFwdSchema);
  m.def(srnn::kScanBwdSchema);
}

TORCH_LIBRARY_IMPL(srnn_fast_sim, CPU, m) {
  m.impl("scan_fwd", &srnn::scan_fwd_sim);
  m.impl("scan_bwd", &srnn::scan_bwd_sim);
}
