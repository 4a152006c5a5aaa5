// Which build of the CPU kernels runs (cpu_isa.h): the best this CPU supports, or the one
// SRNN_FAST_CPU_CAPABILITY names.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

namespace srnn {
namespace {

constexpr const char* kEnvVar = "SRNN_FAST_CPU_CAPABILITY";

// _SRNN_FAST_TEST_CPU_MAX=avx2|default makes this CPU look as if it had no more than that
// (tests of the error for a build the CPU lacks, on any host).
bool capped_by_test(Isa isa) {
  const char* v = std::getenv("_SRNN_FAST_TEST_CPU_MAX");
  if (v == nullptr || v[0] == '\0') return false;
  const std::string cap(v);
  return (cap == "default" && isa != Isa::kDefault) || (cap == "avx2" && isa == Isa::kAvx512);
}

bool cpu_supports(Isa isa) {
  if (capped_by_test(isa)) return false;
#if SRNN_X86_ISAS
  __builtin_cpu_init();  // the checks below also cover the OS saving the vector state (XCR0)
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("avx") &&
                  __builtin_cpu_supports("sse4.2");
  if (isa == Isa::kAvx2) return v3;
  if (isa == Isa::kAvx512)
    return v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  return isa == Isa::kDefault;
}

std::string supported_list() {
  std::string out;
  for (Isa isa : supported_isas()) out += std::string(out.empty() ? "" : ", ") + isa_name(isa);
  return out;
}

Isa parse(const std::string& name, const char* source) {
  std::string v;
  for (char c : name)
    if (!std::isspace(static_cast<unsigned char>(c))) v += char(std::tolower(static_cast<unsigned char>(c)));
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kDefault})
    if (v == isa_name(isa)) {
      TORCH_CHECK(cpu_supports(isa), "srnn_fast: ", source, " asks for the ", isa_name(isa),
                  " CPU kernels, but this CPU (or this ", SRNN_X86_ISAS ? "x86-64" : "non-x86",
                  " build) supports only: ", supported_list());
      return isa;
    }
  TORCH_CHECK(false, "srnn_fast: ", source, " must be one of avx512, avx2, default; got '", name, "'");
}

// -1 until chosen; then the Isa. Chosen on first use, not at load: a bad environment
// variable must raise a Python error where the kernels are used, not break the import.
std::atomic<int> g_active{-1};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kDefault})
    if (cpu_supports(isa)) out.push_back(isa);
  return out;
}

Isa active_isa() {
  const int cached = g_active.load(std::memory_order_relaxed);
  if (cached >= 0) return Isa(cached);
  const char* env = std::getenv(kEnvVar);
  const Isa isa = (env != nullptr && env[0] != '\0')
                      ? parse(env, (std::string(kEnvVar) + "=" + env).c_str())  // not cached if it raises
                      : supported_isas().front();
  g_active.store(int(isa), std::memory_order_relaxed);
  return isa;
}

void set_active_isa(const std::string& name) {
  g_active.store(int(parse(name, "the requested CPU capability")), std::memory_order_relaxed);
}

}  // namespace srnn
