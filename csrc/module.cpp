// The srnn_fast:: op schemas (one definition; CPU and CUDA register implementations under
// these names) and the Python module that lets `import srnn_fast._C` load them, with the
// functions that report and force the CPU kernels' instruction set (cpu_isa.h).
#include <Python.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu_isa.h"
#include "scan_schemas.h"

namespace {

// C++ errors become Python RuntimeErrors carrying the message alone (no C++ backtrace).
PyObject* raise_runtime_error(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  PyErr_SetString(PyExc_RuntimeError, c10_error != nullptr ? c10_error->what_without_backtrace() : e.what());
  return nullptr;
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(srnn::isa_name(srnn::active_isa()));
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
}

PyObject* supported_cpu_capabilities(PyObject*, PyObject*) {
  const auto isas = srnn::supported_isas();
  PyObject* out = PyList_New(Py_ssize_t(isas.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < isas.size(); ++i) PyList_SET_ITEM(out, Py_ssize_t(i), PyUnicode_FromString(srnn::isa_name(isas[i])));
  return out;
}

PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "set_cpu_capability expects a str: avx512, avx2 or default");
    return nullptr;
  }
  try {
    srnn::set_active_isa(PyUnicode_AsUTF8(arg));
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
  Py_RETURN_NONE;
}

// torch.set_flush_denormal(on) in the calling thread *and* in every intra-op worker thread.
// torch's own sets only the calling thread's MXCSR, so with 2 threads about half of a large
// op still computes with subnormals. bench/run.py uses this to time every contender with
// subnormals flushed, as the float32 kernels run anyway (FlushSubnormals, cpu_isa.h).
// Returns False where the CPU cannot flush (as torch.set_flush_denormal does).
PyObject* set_flush_denormal(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  try {
    if (!at::globalContext().setFlushDenormal(on != 0)) Py_RETURN_FALSE;
    // One index per thread (grain 1): ATen's OpenMP parallel_for gives thread k index k.
    at::parallel_for(0, at::get_num_threads(), 1,
                     [on](int64_t, int64_t) { at::globalContext().setFlushDenormal(on != 0); });
  } catch (const std::exception& e) {
    return raise_runtime_error(e);
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU kernels' build that runs: avx512, avx2 or default."},
    {"supported_cpu_capabilities", supported_cpu_capabilities, METH_NOARGS,
     "The builds this CPU can run, best first."},
    {"set_cpu_capability", set_cpu_capability, METH_O, "Forces a build (tests, benchmarks)."},
    {"set_flush_denormal", set_flush_denormal, METH_O,
     "torch.set_flush_denormal(on) in every intra-op thread; False if the CPU cannot."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing the module runs the static TORCH_LIBRARY registrations below (the ops are
// reached through torch.ops.srnn_fast); its Python functions say which CPU build runs.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(srnn_fast, m) {
  m.def(srnn::kScanFwdSchema);  // scan_schemas.h
  m.def(srnn::kScanBwdSchema);
  // Optional: dW_rec [H,H] = sum_t grad_x[t]^T s_{t-1} straight from the spike bits
  // [T,B,ceil(H/32)] (s_0 = s0), accumulating dI rows over the active columns only.
  // Backends without it unpack the bits and run one GEMM in Python (scan.py).
  m.def("grad_w_rec(Tensor grad_x, Tensor spk_bits, Tensor s0) -> Tensor");
  // The fused layer (input projection + recurrence), CPU: contract in srnn_fast/layer.py.
  m.def(
      "layer_fwd(Tensor x, Tensor w_in, Tensor? bias, Tensor w_rec, Tensor alpha, Tensor rho, Tensor u0, "
      "Tensor eta0, Tensor s0, bool binary, float b0, float beta, float dt, float r_m, int ckpt_every) "
      "-> (Tensor s, Tensor u_T, Tensor eta_T, Tensor u_ckpt, Tensor eta_ckpt, Tensor spk_bits)");
  m.def(
      "layer_bwd(Tensor grad_s, Tensor grad_u_T, Tensor grad_eta_T, Tensor x, Tensor w_in, Tensor? bias, "
      "Tensor w_rec, Tensor alpha, Tensor rho, Tensor u0, Tensor eta0, Tensor s0, Tensor u_ckpt, "
      "Tensor eta_ckpt, Tensor spikes, bool binary, int surrogate, float b0, float beta, float dt, float r_m, "
      "float sigma, float gamma, int ckpt_every, bool need_grad_x, bool need_grad_tau=True) "
      "-> (Tensor grad_x, Tensor grad_w_in, Tensor grad_bias, Tensor grad_w_rec, Tensor grad_alpha, "
      "Tensor grad_rho, Tensor grad_u0, Tensor grad_eta0, Tensor grad_s0)");
  // Whether the layer ops take x [T,B,I] as dense (the projection over every input) rather
  // than summing over its nonzeros: the choice they make, for tests and benchmarks.
  m.def("layer_dense_input(Tensor x) -> bool");
}
