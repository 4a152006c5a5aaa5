// The CUDA execution harness (see harness.h): fibers, barriers, schedules, launch checks.
#include "harness.h"

#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>

// AddressSanitizer must be told when the stack changes under it (fiber switches), or it
// reports false stack overflows and use-after-returns.
#if defined(__SANITIZE_ADDRESS__)
#define SRNN_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SRNN_ASAN 1
#endif
#endif
#ifdef SRNN_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Context switches. x86-64: a few instructions that save the callee-saved registers and the
// SSE / x87 control words on the old stack and load them from the new one (a switch is a
// barrier crossing for one thread, so it has to be cheap: swapcontext makes a system call
// each time, ~1 us). Elsewhere: ucontext.
#if defined(__x86_64__) && !defined(SRNN_SIM_UCONTEXT)
#define SRNN_SIM_ASM_SWITCH 1
extern "C" void srnn_sim_switch(void** save_sp, void* load_sp);
extern "C" void srnn_sim_start();
asm(R"(
    .text
    .p2align 4
    .type srnn_sim_switch, @function
srnn_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size srnn_sim_switch, .-srnn_sim_switch

    .p2align 4
    .type srnn_sim_start, @function
srnn_sim_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size srnn_sim_start, .-srnn_sim_start
)");
#endif

namespace srnn {
namespace sim {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute
#ifdef SRNN_ASAN
constexpr size_t kStackBytes = 1 << 20;  // ASan's redzones make frames much larger
#else
constexpr size_t kStackBytes = 256 * 1024;
#endif

enum class State { kRunnable, kAtSyncthreads, kAtWarp, kExited, kFaulted };

// A fiber stack with a guard page below it: an overflow faults instead of corrupting.
struct Stack {
  void* base = nullptr;
  size_t bytes = 0;
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes = kStackBytes + page;
    base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "cuda_sim: cannot map a fiber stack of ", bytes, " bytes");
    mprotect(base, page, PROT_NONE);
  }
  ~Stack() { munmap(base, bytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* bottom() const { return static_cast<char*>(base) + (bytes - kStackBytes); }
};

struct Context {
#ifdef SRNN_SIM_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

void switch_context(Context& from, Context& to) {
#ifdef SRNN_SIM_ASM_SWITCH
  srnn_sim_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

struct Fiber;
void fiber_main(Fiber* f);

#ifndef SRNN_SIM_ASM_SWITCH
void fiber_main_ints(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

// One CUDA thread's fiber. It lives across blocks and launches: after the kernel body it
// waits as kExited until the scheduler hands it the next block.
struct Fiber {
  Context ctx;
  Stack stack;
  ThreadState ts;
  State state = State::kExited;
  int linear = 0;  // x + y * bx + z * bx * by: warps are 32 consecutive linear ids
  unsigned warp_mask = 0;
  bool warp_pred = false;
  unsigned warp_result = 0;

  // A fresh entry into fiber_main (first use, or after a fault or deadlock abandoned it).
  void reset() {
#ifdef SRNN_ASAN
    __asan_unpoison_memory_region(stack.bottom(), kStackBytes);  // frames left by an abandoned run
#endif
#ifdef SRNN_SIM_ASM_SWITCH
    auto* top = reinterpret_cast<uint64_t*>(stack.bottom() + kStackBytes);  // 16-byte aligned
    uint64_t* sp = top - 8;
    sp[0] = 0x037F'00001F80ull;  // MXCSR 0x1F80 (no flush to zero), x87 control word 0x037F
    sp[1] = 0;                                                  // r15
    sp[2] = 0;                                                  // r14
    sp[3] = reinterpret_cast<uint64_t>(&fiber_main);            // r13: what srnn_sim_start calls
    sp[4] = reinterpret_cast<uint64_t>(this);                   // r12: its argument
    sp[5] = 0;                                                  // rbx
    sp[6] = 0;                                                  // rbp
    sp[7] = reinterpret_cast<uint64_t>(&srnn_sim_start);        // return address
    ctx.sp = sp;
#else
    getcontext(&ctx.uc);
    ctx.uc.uc_stack.ss_sp = stack.bottom();
    ctx.uc.uc_stack.ss_size = kStackBytes;
    ctx.uc.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(this);
    makecontext(&ctx.uc, reinterpret_cast<void (*)()>(fiber_main_ints), 2, static_cast<unsigned>(p & 0xffffffffu),
                static_cast<unsigned>(p >> 32));
#endif
    state = State::kExited;
  }
  Fiber() { reset(); }
};

// One block in flight.
struct BlockRun {
  std::string kernel;
  uint3 block_idx;
  int n = 0;  // threads in the block: fibers [0, n) of the pool
  Context scheduler;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  std::string fault;  // set by a thread that broke a rule; the scheduler throws it
};

#ifdef SRNN_ASAN
// The scheduler's stack, as ASan reports it to each fiber switched to from there.
thread_local const void* g_sched_stack_bottom = nullptr;
thread_local size_t g_sched_stack_size = 0;
#endif

thread_local BlockRun* g_block = nullptr;
std::vector<std::unique_ptr<Fiber>> g_fibers;  // the pool, reused across launches
std::map<const void*, size_t> g_max_dynamic_smem;
Device g_device;
Schedule g_schedule;
std::vector<LaunchRecord> g_log;

Fiber& fiber(int t) { return *g_fibers[t]; }

std::string fmt3(unsigned x, unsigned y, unsigned z) {
  std::ostringstream os;
  os << "(" << x << ", " << y << ", " << z << ")";
  return os.str();
}
std::string where(const BlockRun& b, const Fiber& f) {
  return b.kernel + ", block " + fmt3(b.block_idx.x, b.block_idx.y, b.block_idx.z) + ", thread " +
         fmt3(f.ts.thread_idx.x, f.ts.thread_idx.y, f.ts.thread_idx.z);
}

// The fiber side of a switch. Nothing of the BlockRun is used after it: the fiber may be
// resumed by a later block or launch.
void to_scheduler(Fiber& f) {
#ifdef SRNN_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_sched_stack_bottom, g_sched_stack_size);
#endif
  switch_context(f.ctx, g_block->scheduler);
#ifdef SRNN_ASAN
  __sanitizer_finish_switch_fiber(fake, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
}

void to_fiber(BlockRun& b, Fiber& f) {
  b.running = &f;
#ifdef SRNN_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack.bottom(), kStackBytes);
#endif
  switch_context(b.scheduler, f.ctx);
#ifdef SRNN_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  b.running = nullptr;
}

// A thread that broke a rule stops here; the scheduler reports it and resets the fiber.
[[noreturn]] void fault(const std::string& what) {
  BlockRun& b = *g_block;
  Fiber& f = *b.running;
  if (b.fault.empty()) b.fault = "cuda_sim: " + where(b, f) + ": " + what;
  f.state = State::kFaulted;
  to_scheduler(f);
  std::abort();  // a faulted fiber is never resumed
}

void fiber_main(Fiber* f) {
#ifdef SRNN_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
  for (;;) {
    std::string error;
    try {
      (*g_block->body)();
    } catch (const std::exception& e) {
      error = e.what();  // leave the handler before switching away for good
    }
    if (!error.empty()) fault("exception in the kernel: " + error);
    f->state = State::kExited;
    to_scheduler(*f);  // resumed for the next block
  }
}

std::vector<int> thread_order(int n, const uint3& block_idx, int phase) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (g_schedule.order == Order::kReversed) {
    std::reverse(order.begin(), order.end());
  } else if (g_schedule.order == Order::kShuffled) {
    std::seed_seq seq{static_cast<uint32_t>(g_schedule.seed), static_cast<uint32_t>(g_schedule.seed >> 32),
                      block_idx.x, block_idx.y, block_idx.z, static_cast<uint32_t>(phase)};
    std::mt19937 rng(seq);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

// All fibers blocked or done: release a complete block barrier, or explain the deadlock.
// Returns false when every thread has exited.
bool resolve_blocked(BlockRun& b) {
  int at_sync = 0, exited = 0;
  const Fiber *first_exited = nullptr, *first_sync = nullptr;
  const int n = b.n;
  for (int t = 0; t < n; ++t) {
    const Fiber& f = fiber(t);
    if (f.state == State::kAtSyncthreads) {
      ++at_sync;
      if (!first_sync) first_sync = &f;
    } else if (f.state == State::kExited) {
      ++exited;
      if (!first_exited) first_exited = &f;
    }
  }
  for (int t = 0; t < n; ++t) {
    const Fiber& f = fiber(t);
    if (f.state != State::kAtWarp) continue;
    // A warp intrinsic that cannot complete: name a lane of the mask that is elsewhere.
    const int warp0 = f.linear / kWarpSize * kWarpSize;
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!(f.warp_mask >> lane & 1u)) continue;
      const Fiber& g = fiber(warp0 + lane);
      if (g.state == State::kAtWarp && g.warp_mask == f.warp_mask) continue;
      const char* why = g.state == State::kExited         ? "left the kernel"
                        : g.state == State::kAtSyncthreads ? "waits at __syncthreads"
                                                           : "waits at a warp intrinsic with another mask";
      std::ostringstream os;
      os << "cuda_sim: " << where(b, f) << ": __ballot_sync with mask 0x" << std::hex << f.warp_mask << std::dec
         << " is never reached by lane " << lane << " (thread "
         << fmt3(g.ts.thread_idx.x, g.ts.thread_idx.y, g.ts.thread_idx.z) << "), which " << why;
      TORCH_CHECK(false, os.str());
    }
  }
  if (exited == n) return false;
  if (at_sync == n) {
    for (int t = 0; t < n; ++t) fiber(t).state = State::kRunnable;
    return true;
  }
  TORCH_CHECK(false, "cuda_sim: ", where(b, *first_exited), " left the kernel while ", at_sync,
              " threads wait at __syncthreads (e.g. thread ",
              fmt3(first_sync->ts.thread_idx.x, first_sync->ts.thread_idx.y, first_sync->ts.thread_idx.z),
              "): the barrier can never complete");
  return false;
}

void check_launch(const std::string& name, const void* kernel, dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 && block.y <= 1024 &&
                  block.z <= 64 && threads <= 1024,
              "cuda_sim: launch of ", name, " refused (invalid configuration argument): block ",
              fmt3(block.x, block.y, block.z), " (at most 1024 threads; x, y <= 1024, z <= 64)");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535 &&
                  grid.z <= 65535,
              "cuda_sim: launch of ", name, " refused (invalid configuration argument): grid ",
              fmt3(grid.x, grid.y, grid.z));
  const auto it = g_max_dynamic_smem.find(kernel);
  const size_t allowed = it == g_max_dynamic_smem.end() ? kDefaultDynamicSmem : it->second;
  TORCH_CHECK(smem <= allowed, "cuda_sim: launch of ", name, " refused: ", smem,
              " bytes of dynamic shared memory, above the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize of ",
              allowed, it == g_max_dynamic_smem.end() ? " (the default; cudaFuncSetAttribute was not called)" : "");
}

void record(const std::string& name, dim3 grid, dim3 block, size_t smem) {
  for (LaunchRecord& r : g_log) {
    if (r.kernel == name && r.grid.x == grid.x && r.grid.y == grid.y && r.grid.z == grid.z && r.block.x == block.x &&
        r.block.y == block.y && r.block.z == block.z && r.smem == smem) {
      ++r.count;
      return;
    }
  }
  g_log.push_back(LaunchRecord{name, grid, block, smem, 1});
}

}  // namespace

Device& device() { return g_device; }
void set_schedule(const Schedule& s) { g_schedule = s; }
const Schedule& schedule() { return g_schedule; }
std::vector<LaunchRecord>& launch_log() { return g_log; }

std::string Schedule::name() const {
  switch (order) {
    case Order::kAscending:
      return "ascending";
    case Order::kReversed:
      return "reversed";
    default:
      return "shuffled:" + std::to_string(seed);
  }
}

void set_max_dynamic_smem(const void* kernel, const std::string& name, size_t bytes) {
  const int64_t limit = int64_t(g_device.smem_optin) - g_device.static_smem;
  TORCH_CHECK(static_cast<int64_t>(bytes) <= limit, "cuda_sim: cudaFuncSetAttribute(", name,
              ", MaxDynamicSharedMemorySize, ", bytes, ") fails (invalid value): the device allows ",
              g_device.smem_optin, " bytes per block, less ", g_device.static_smem, " static");
  g_max_dynamic_smem[kernel] = bytes;
}

ThreadState& current() { return g_block->running->ts; }

void syncthreads() {
  Fiber& f = *g_block->running;
  f.state = State::kAtSyncthreads;
  to_scheduler(f);
}

unsigned ballot_sync(unsigned mask, bool pred) {
  BlockRun& b = *g_block;
  Fiber& f = *b.running;
  const int n = b.n;
  const int warp0 = f.linear / kWarpSize * kWarpSize, lane = f.linear - warp0;
  const int lanes = std::min(kWarpSize, n - warp0);
  if (!(mask >> lane & 1u)) {
    std::ostringstream os;
    os << "__ballot_sync with mask 0x" << std::hex << mask << " that leaves out the calling lane " << std::dec << lane;
    fault(os.str());
  }
  if (lanes < kWarpSize && (mask >> lanes) != 0) {
    std::ostringstream os;
    os << "__ballot_sync with mask 0x" << std::hex << mask << std::dec << " names lanes past the last lane ("
       << lanes - 1 << ") of this warp";
    fault(os.str());
  }
  f.state = State::kAtWarp;
  f.warp_mask = mask;
  f.warp_pred = pred;
  unsigned result = 0;
  for (int l = 0; l < lanes; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& g = fiber(warp0 + l);
    if (g.state != State::kAtWarp || g.warp_mask != mask) {
      to_scheduler(f);  // the last lane to arrive completes it for all
      return f.warp_result;
    }
    if (g.warp_pred) result |= 1u << l;
  }
  for (int l = 0; l < lanes; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& g = fiber(warp0 + l);
    g.warp_result = result;
    g.state = State::kRunnable;
  }
  return result;  // the arriving lane continues without a switch
}

void run_launch(const void* kernel, const std::string& name, dim3 grid, dim3 block, size_t smem,
                const std::function<void()>& body) {
  TORCH_CHECK(g_block == nullptr, "cuda_sim: a kernel launched from inside a kernel (not supported)");
  check_launch(name, kernel, grid, block, smem);
  record(name, grid, block, smem);
  const int n = static_cast<int>(block.x * block.y * block.z);
  while (static_cast<int>(g_fibers.size()) < n) g_fibers.push_back(std::make_unique<Fiber>());
  // Exactly the requested bytes (ASan flags any access past them), poisoned per block.
  std::unique_ptr<unsigned char[]> shared(smem > 0 ? new unsigned char[smem] : nullptr);
  BlockRun b;
  b.kernel = name;
  b.body = &body;
  b.n = n;
  g_block = &b;
  struct Reset {
    ~Reset() { g_block = nullptr; }
  } reset;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.block_idx = uint3{bx, by, bz};
        if (smem > 0) std::memset(shared.get(), 0xff, smem);
        for (int t = 0; t < n; ++t) {
          Fiber& f = fiber(t);
          if (f.state != State::kExited) f.reset();  // left mid-kernel by an earlier fault
          f.state = State::kRunnable;
          f.linear = t;
          f.ts = ThreadState{uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)}, b.block_idx, block,
                             grid, shared.get()};
        }
        for (int phase = 0;; ++phase) {
          const std::vector<int> order = thread_order(n, b.block_idx, phase);
          for (bool progress = true; progress;) {
            progress = false;
            for (int t : order) {
              Fiber& f = fiber(t);
              if (f.state != State::kRunnable) continue;
              to_fiber(b, f);
              progress = true;
              TORCH_CHECK(b.fault.empty(), b.fault);
            }
          }
          if (!resolve_blocked(b)) break;
        }
      }
}

std::string kernel_name_from(const char* pretty) {
  std::string s(pretty);
  size_t start = s.find("Kernel = ");
  if (start == std::string::npos) return s;
  start += 9;
  size_t end = start;
  for (int depth = 0; end < s.size(); ++end) {  // up to the ']' or ';' that ends the argument
    const char c = s[end];
    if (c == '<' || c == '(') ++depth;
    if (c == '>' || c == ')') --depth;
    if (depth == 0 && (c == ']' || c == ';')) break;
  }
  std::string name = s.substr(start, end - start);
  if (!name.empty() && name[0] == '&') name.erase(0, 1);
  const size_t lt = name.find('<');
  const size_t colon = name.rfind("::", lt);  // drop the namespaces
  if (colon != std::string::npos) name.erase(0, colon + 2);
  return name;
}

}  // namespace sim
}  // namespace srnn
