// The emulator's runtime (see emulator.h): fibers, the block scheduler, barriers, warp
// collectives, mma.sync from the PTX ISA's fragment layouts, guarded memory and the
// fault handlers that name the kernel, block and thread.
#include "emulator.h"

#include <dlfcn.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

namespace emu {
namespace {

// ---- fibers: a hand-rolled switch of the callee-saved registers (x86-64 System V) ----

extern "C" void emu_switch_stack(void** save_sp, void* next_sp);
asm(R"(
.text
.globl emu_switch_stack
.type emu_switch_stack,@function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch_stack,.-emu_switch_stack
)");

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarp = 32;
constexpr unsigned char kPoison = 0xff;  // NaN in float32, bfloat16 and float16
constexpr unsigned char kCanary = 0xa5;

enum class Wait { kNone, kBarrier, kShuffle, kMma };
const char* wait_name(Wait w) {
  switch (w) {
    case Wait::kBarrier: return "__syncthreads";
    case Wait::kShuffle: return "__shfl_xor_sync";
    case Wait::kMma: return "mma.sync";
    default: return "nothing";
  }
}

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;  // kStackBytes above a guard page
  bool done = false;
  bool runnable = false;
  Wait wait = Wait::kNone;
  const char* file = nullptr;
  int line = 0;
  uint3 index{0, 0, 0};
};

// One warp's pending collective and the lanes' operands and results.
struct WarpSlot {
  int arrived = 0;
  int exited = 0;
  Wait kind = Wait::kNone;
  const char* file = nullptr;
  int line = 0;
  const char* shape = nullptr;
  uint64_t in[kWarp];
  int lane_mask[kWarp];
  uint64_t out[kWarp];
  uint32_t a[kWarp][4];
  uint32_t b[kWarp][2];
  float c[kWarp][4];
};

// ---- guarded memory ----

struct Region {
  std::string name;
  char* map;
  size_t map_bytes;
  char* usable;  // the accessible pages
  size_t usable_bytes;
  char* data;
  size_t bytes;
  bool read_only = false;
};

size_t page_size() {
  static const size_t size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

struct State {
  // configuration
  unsigned block_seed = 0, thread_seed = 0;
  bool guard_before = false;
  // the running kernel
  const char* kernel = nullptr;
  const char* context = nullptr;
  dim3 grid, block;
  uint3 block_index{0, 0, 0};
  uint64_t block_epoch = 0;
  std::vector<Fiber> fibers;
  std::vector<WarpSlot> warps;
  std::vector<int> order;     // thread order: position -> fiber
  int current = -1;           // running fiber, -1 in the scheduler
  void* scheduler_sp = nullptr;
  int barrier_arrived = 0;
  int exited = 0;
  const std::function<void()>* body = nullptr;
  unsigned char* dynamic = nullptr;
  size_t dynamic_bytes = 0;
  sigjmp_buf stop;
  std::string error;
  int launch_error = 0;
  std::map<const void*, int> max_dynamic;
  std::vector<Region*> regions;
  std::vector<char*> stacks;
  char* signal_stack = nullptr;
};
State& st() {
  static State s;
  return s;
}

std::string where() {
  State& s = st();
  char buf[512];
  if (!s.kernel) return "outside any kernel";
  // the launcher's template arguments: "[with W = ...]" of its __PRETTY_FUNCTION__
  const char* with = s.context ? strstr(s.context, "[with ") : nullptr;
  int n = snprintf(buf, sizeof buf, "kernel %s%s%s, block (%u,%u,%u)", s.kernel, with ? " " : "", with ? with : "",
                   s.block_index.x, s.block_index.y, s.block_index.z);
  if (s.current >= 0) {
    const uint3& t = s.fibers[s.current].index;
    snprintf(buf + n, sizeof buf - n, ", thread (%u,%u,%u)", t.x, t.y, t.z);
  }
  return buf;
}

[[noreturn]] void stop_kernel(const std::string& message) {
  State& s = st();
  s.error = message + " [" + where() + "]";
  siglongjmp(s.stop, 1);
}

Region* find_region(const void* p) {
  for (Region* r : st().regions) {
    const char* c = static_cast<const char*>(p);
    if (c >= r->map && c < r->map + r->map_bytes) return r;
  }
  return nullptr;
}

Region* make_region(const std::string& name, size_t bytes, bool guard_before) {
  const size_t page = page_size();
  const size_t usable = std::max<size_t>(1, (bytes + 16 + page - 1) / page) * page;
  auto* r = new Region;
  r->name = name;
  r->map_bytes = usable + 2 * page;
  r->map = static_cast<char*>(mmap(nullptr, r->map_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (r->map == MAP_FAILED) throw std::runtime_error("emu: mmap failed for " + name);
  r->usable = r->map + page;
  r->usable_bytes = usable;
  if (mprotect(r->usable, usable, PROT_READ | PROT_WRITE) != 0) throw std::runtime_error("emu: mprotect failed");
  // against the guard page after (16-byte aligned, as cudaMalloc's 256) or the one before
  r->data = guard_before ? r->usable
                         : reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(r->usable + usable - bytes) & ~uintptr_t(15));
  r->bytes = bytes;
  memset(r->usable, kCanary, usable);
  st().regions.push_back(r);
  return r;
}

void free_region(Region* r) {
  auto& rs = st().regions;
  rs.erase(std::remove(rs.begin(), rs.end(), r), rs.end());
  munmap(r->map, r->map_bytes);
  delete r;
}

// Writes into the slack between a buffer and its guard page (less than 16 bytes, or the
// rest of the page when the buffer sits against the guard before it).
void check_canaries() {
  for (Region* r : st().regions) {
    if (r->read_only) continue;
    const char* end = r->data + r->bytes;
    for (const char* p = r->usable; p < r->usable + r->usable_bytes; ++p) {
      if (p == r->data) p = end;
      if (p >= r->usable + r->usable_bytes) break;
      if (static_cast<unsigned char>(*p) != kCanary) {
        char buf[256];
        snprintf(buf, sizeof buf, "write outside buffer %s (%zu bytes) at byte offset %+td", r->name.c_str(), r->bytes,
                 p - r->data);
        stop_kernel(buf);
      }
    }
  }
}

// ---- faults ----

void on_fault(int sig, siginfo_t* info, void*) {
  State& s = st();
  char buf[512];
  if (sig == SIGILL) {
    // -fsanitize-undefined-trap-on-error: ud2 where a check failed
    Dl_info dl{};
    const bool known = dladdr(info->si_addr, &dl) != 0 && dl.dli_fname;
    snprintf(buf, sizeof buf, "sanitizer trap (a misaligned access or an index past a fixed-size array) at %s+0x%tx",
             known ? dl.dli_fname : "?",
             static_cast<const char*>(info->si_addr) - (known ? static_cast<const char*>(dl.dli_fbase) : nullptr));
  } else if (Region* r = find_region(info->si_addr)) {
    const char* p = static_cast<const char*>(info->si_addr);
    if (r->read_only && p >= r->data && p < r->data + r->bytes) {
      snprintf(buf, sizeof buf, "write to the read-only input buffer %s (%zu bytes) at byte offset %td", r->name.c_str(),
               r->bytes, p - r->data);
    } else {
      snprintf(buf, sizeof buf, "out-of-bounds access to buffer %s (%zu bytes) at byte offset %+td", r->name.c_str(),
               r->bytes, p - r->data);
    }
  } else {
    bool stack = false;
    for (char* base : s.stacks) {
      const char* p = static_cast<const char*>(info->si_addr);
      if (p >= base - page_size() && p < base) stack = true;
    }
    snprintf(buf, sizeof buf, "%s at address %p", stack ? "thread stack overflow" : strsignal(sig), info->si_addr);
  }
  if (s.kernel) stop_kernel(buf);
  fprintf(stderr, "emu: %s outside any kernel\n", buf);
  _exit(2);
}

void install_handlers() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  State& s = st();
  const size_t alt = 256 * 1024;
  s.signal_stack = static_cast<char*>(malloc(alt));
  stack_t ss{};
  ss.ss_sp = s.signal_stack;
  ss.ss_size = alt;
  sigaltstack(&ss, nullptr);
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGFPE}) sigaction(sig, &sa, nullptr);
}

// ---- the scheduler ----

std::vector<int> permutation(size_t n, unsigned seed) {
  std::vector<int> p(n);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<int>(i);
  if (seed == 1) std::reverse(p.begin(), p.end());
  if (seed > 1) std::shuffle(p.begin(), p.end(), std::mt19937(seed));
  return p;
}

void fiber_main() {
  State& s = st();
  (*s.body)();
  Fiber& f = s.fibers[s.current];
  f.done = true;
  f.runnable = false;
  ++s.exited;
  WarpSlot& w = s.warps[s.current / kWarp];
  ++w.exited;
  if (w.arrived > 0) {
    char buf[256];
    snprintf(buf, sizeof buf, "thread exited while lanes of its warp wait at %s (%s:%d)", wait_name(w.kind), w.file,
             w.line);
    stop_kernel(buf);
  }
  if (s.barrier_arrived > 0) stop_kernel("thread exited while other threads of its block wait at __syncthreads");
  emu_switch_stack(&f.sp, s.scheduler_sp);
  __builtin_unreachable();
}

void start_fiber(Fiber& f, char* stack) {
  // the entry frame: fiber_main as the return address of emu_switch_stack, then six
  // callee-saved registers; fiber_main starts with the stack 16-byte aligned - 8
  auto* top = reinterpret_cast<uint64_t*>(stack + kStackBytes);
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);
  for (int i = 3; i <= 8; ++i) top[-i] = 0;
  f.sp = top - 8;
}

char* fiber_stack(size_t i) {
  State& s = st();
  while (s.stacks.size() <= i) {
    const size_t page = page_size();
    char* map = static_cast<char*>(
        mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (map == MAP_FAILED) throw std::runtime_error("emu: cannot map a thread stack");
    mprotect(map, page, PROT_NONE);  // overflow faults
    s.stacks.push_back(map + page);
  }
  return s.stacks[i];
}

// The current fiber waits; back in the scheduler.
void block_current(Wait wait, const char* file, int line) {
  State& s = st();
  Fiber& f = s.fibers[s.current];
  f.wait = wait;
  f.file = file;
  f.line = line;
  f.runnable = false;
  emu_switch_stack(&f.sp, s.scheduler_sp);
}

// The current fiber lets the others run, staying runnable itself.
void yield_current() {
  State& s = st();
  Fiber& f = s.fibers[s.current];
  f.wait = Wait::kNone;
  emu_switch_stack(&f.sp, s.scheduler_sp);
}

void release(Fiber& f) {
  f.runnable = true;
  f.wait = Wait::kNone;
}

[[noreturn]] void deadlock() {
  State& s = st();
  std::string message = "deadlock: no thread can run;";
  int shown = 0;
  for (size_t i = 0; i < s.fibers.size() && shown < 4; ++i) {
    const Fiber& f = s.fibers[i];
    if (f.done) continue;
    char buf[256];
    snprintf(buf, sizeof buf, " thread (%u,%u,%u) waits at %s (%s:%d);", f.index.x, f.index.y, f.index.z,
             wait_name(f.wait), f.file, f.line);
    message += buf;
    ++shown;
  }
  s.current = -1;
  stop_kernel(message);
}

void run_block() {
  State& s = st();
  const size_t n = s.fibers.size();
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f = Fiber{};
    f.stack = fiber_stack(i);
    f.index = {static_cast<unsigned>(i % s.block.x), static_cast<unsigned>(i / s.block.x % s.block.y),
               static_cast<unsigned>(i / (s.block.x * s.block.y))};
    f.runnable = true;
    start_fiber(f, f.stack);
  }
  for (WarpSlot& w : s.warps) {
    w.arrived = 0;
    w.exited = 0;
  }
  s.barrier_arrived = 0;
  s.exited = 0;
  // Always the first runnable thread in the thread order: a thread runs on as far as it
  // can, so a missing barrier lets it overwrite what slower threads still read.
  for (;;) {
    int next = -1;
    for (int i : s.order) {
      if (s.fibers[i].runnable) {
        next = i;
        break;
      }
    }
    if (next < 0) break;
    s.current = next;
    emu_switch_stack(&s.scheduler_sp, s.fibers[next].sp);
    s.current = -1;
  }
  if (s.exited != static_cast<int>(n)) deadlock();
}

WarpSlot& arrive(Wait kind, const char* file, int line) {
  State& s = st();
  const int lane = s.current % kWarp;
  if (s.fibers.size() % kWarp != 0) fail("%s in a block of %zu threads (not whole warps)", wait_name(kind), s.fibers.size());
  WarpSlot& w = s.warps[s.current / kWarp];
  if (w.exited > 0) fail("%s at %s:%d while %d lanes of the warp have exited", wait_name(kind), file, line, w.exited);
  if (w.arrived == 0) {
    w.kind = kind;
    w.file = file;
    w.line = line;
  } else if (w.kind != kind || w.line != line || strcmp(w.file, file) != 0) {
    fail("divergent warp collective: lane %d at %s (%s:%d) while other lanes wait at %s (%s:%d)", lane,
         wait_name(kind), file, line, wait_name(w.kind), w.file, w.line);
  }
  return w;
}

// After arriving at a collective: the last lane (its results formed) releases the warp
// and yields; the others wait until it does.
void wait_for_warp(WarpSlot& w, Wait kind, const char* file, int line) {
  State& s = st();
  if (w.arrived == kWarp) {
    w.arrived = 0;
    const int first = s.current - s.current % kWarp;
    for (int l = 0; l < kWarp; ++l) release(s.fibers[first + l]);
    yield_current();
  } else {
    block_current(kind, file, line);
  }
}

// ---- mma.sync: the fragment layouts of the PTX ISA (9.7.14.5.7 "Matrix Fragments for
// mma.m16n8k8", 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point
// type"), groupID = lane >> 2, threadID_in_group = lane % 4 ----

enum class Operand { kBf16, kF16, kTf32 };

struct Shape {
  const char* name;
  Operand type;
  int k;           // 16 or 8
  int a_elements;  // per lane: 8 (16-bit, two per register) or 4 (tf32)
  int b_elements;  // 4 or 2
};
const Shape kShapes[] = {
    {"m16n8k16.row.col.f32.bf16.bf16.f32", Operand::kBf16, 16, 8, 4},
    {"m16n8k16.row.col.f32.f16.f16.f32", Operand::kF16, 16, 8, 4},
    {"m16n8k8.row.col.f32.tf32.tf32.f32", Operand::kTf32, 8, 4, 2},
};

struct Position {
  int row, col;
};
// Element i of lane's A fragment.
Position a_position(const Shape& sh, int lane, int i) {
  const int group = lane >> 2, in_group = lane % 4;
  if (sh.k == 16) {  // a0..a7: rows groupID (a0, a1, a4, a5) or groupID + 8; cols 2 tig + (i & 1) (+ 8 from a4)
    const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
    const int col = in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    return {row, col};
  }
  // tf32 a0..a3: rows groupID (a0, a2) or groupID + 8 (a1, a3); cols tig (a0, a1) or tig + 4
  return {(i == 0 || i == 2) ? group : group + 8, (i < 2) ? in_group : in_group + 4};
}
// Element i of lane's B fragment (K x 8).
Position b_position(const Shape& sh, int lane, int i) {
  const int group = lane >> 2, in_group = lane % 4;
  if (sh.k == 16) return {in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0), group};  // b0..b3
  return {i == 0 ? in_group : in_group + 4, group};                          // tf32 b0, b1
}
// Element i of lane's accumulator fragment (16 x 8, float32).
Position c_position(int lane, int i) {
  const int group = lane >> 2, in_group = lane % 4;
  return {i < 2 ? group : group + 8, in_group * 2 + (i & 1)};
}

// Every element of A (16 x K), B (K x 8) and C (16 x 8) held by exactly one (lane, element).
void check_layout(const Shape& sh) {
  std::vector<int> a(16 * sh.k, 0), b(sh.k * 8, 0), c(16 * 8, 0);
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int i = 0; i < sh.a_elements; ++i) {
      const Position p = a_position(sh, lane, i);
      ++a[p.row * sh.k + p.col];
    }
    for (int i = 0; i < sh.b_elements; ++i) {
      const Position p = b_position(sh, lane, i);
      ++b[p.row * 8 + p.col];
    }
    for (int i = 0; i < 4; ++i) {
      const Position p = c_position(lane, i);
      ++c[p.row * 8 + p.col];
    }
  }
  for (const auto* v : {&a, &b, &c}) {
    for (int count : *v) {
      if (count != 1) fail("the fragment layout of %s does not hold every element once", sh.name);
    }
  }
}

// Element i of a fragment's registers: 16-bit elements two per register, low half first.
float element(Operand type, const uint32_t* regs, int i) {
  if (type == Operand::kTf32) {
    uint32_t bits = regs[i] & 0xffffe000u;  // a .tf32 operand: the low 13 bits are not read
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
  }
  const uint16_t half = static_cast<uint16_t>(regs[i / 2] >> (16 * (i % 2)));
  if (type == Operand::kF16) return half_bits_to_float(half);
  const uint32_t bits = static_cast<uint32_t>(half) << 16;
  float v;
  memcpy(&v, &bits, sizeof v);
  return v;
}

// D = A x B + C from the 32 lanes' registers, into the lanes' results.
void warp_mma(WarpSlot& w, const Shape& sh) {
  double a[16][16], b[16][8], d[16][8];
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int i = 0; i < sh.a_elements; ++i) {
      const Position p = a_position(sh, lane, i);
      a[p.row][p.col] = element(sh.type, w.a[lane], i);
    }
    for (int i = 0; i < sh.b_elements; ++i) {
      const Position p = b_position(sh, lane, i);
      b[p.row][p.col] = element(sh.type, w.b[lane], i);
    }
    for (int i = 0; i < 4; ++i) {
      const Position p = c_position(lane, i);
      d[p.row][p.col] = w.c[lane][i];
    }
  }
  // products exact, the sum in float64, rounded once to float32
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      double acc = d[m][n];
      for (int k = 0; k < sh.k; ++k) acc += a[m][k] * b[k][n];
      d[m][n] = acc;
    }
  }
  for (int lane = 0; lane < kWarp; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const Position p = c_position(lane, i);
      w.c[lane][i] = static_cast<float>(d[p.row][p.col]);
    }
  }
}

const Shape& shape_of(const char* name) {
  static bool checked = false;
  if (!checked) {
    for (const Shape& sh : kShapes) check_layout(sh);
    checked = true;
  }
  for (const Shape& sh : kShapes) {
    if (strcmp(sh.name, name) == 0) return sh;
  }
  fail("mma.sync.aligned.%s is not emulated", name);
}

uint16_t round_to_format(double v, int mantissa_bits, int min_exponent, int max_exponent, int exponent_bias) {
  // sign, then the magnitude rounded to nearest even at the format's precision
  uint16_t sign = std::signbit(v) ? 0x8000 : 0;
  const int exp_bits = mantissa_bits == 7 ? 8 : 5;
  const uint16_t inf = static_cast<uint16_t>(((1u << exp_bits) - 1) << mantissa_bits);
  if (std::isnan(v)) return static_cast<uint16_t>(sign | inf | (1u << (mantissa_bits - 1)));
  double a = std::fabs(v);
  if (std::isinf(a)) return sign | inf;
  if (a == 0) return sign;
  int e;
  std::frexp(a, &e);  // a = f 2^e, f in [0.5, 1): the leading bit has exponent e - 1
  int lead = std::max(e - 1, min_exponent);
  const double step = std::ldexp(1.0, lead - mantissa_bits);
  double q = std::nearbyint(a / step);  // the current rounding mode: to nearest even
  double r = q * step;
  if (r != 0 && std::ilogb(r) > max_exponent) return sign | inf;
  if (r == 0) return sign;
  const int re = std::max(std::ilogb(r), min_exponent);
  const bool normal = std::ilogb(r) >= min_exponent;
  const uint32_t mant = static_cast<uint32_t>(std::ldexp(r, mantissa_bits - re)) & ((1u << mantissa_bits) - 1);
  const uint32_t biased = normal ? static_cast<uint32_t>(re + exponent_bias) : 0;
  return static_cast<uint16_t>(sign | (biased << mantissa_bits) | mant);
}

}  // namespace

// ---- the interface ----

void configure(unsigned block_seed, unsigned thread_seed, bool guard_before) {
  State& s = st();
  s.block_seed = block_seed;
  s.thread_seed = thread_seed;
  s.guard_before = guard_before;
}

void fail(const char* format, ...) {
  char buf[1024];
  va_list args;
  va_start(args, format);
  vsnprintf(buf, sizeof buf, format, args);
  va_end(args);
  if (st().kernel) stop_kernel(buf);
  throw KernelError(buf);
}

const uint3& thread_index() { return st().fibers[st().current].index; }
const uint3& block_index() { return st().block_index; }
const dim3& block_dim() { return st().block; }
const dim3& grid_dim() { return st().grid; }

void syncthreads(const char* file, int line) {
  State& s = st();
  if (s.exited > 0) fail("__syncthreads at %s:%d after %d threads of the block exited", file, line, s.exited);
  for (const Fiber& f : s.fibers) {
    if (f.wait == Wait::kBarrier && (f.line != line || strcmp(f.file, file) != 0)) {
      fail("divergent __syncthreads: %s:%d while thread (%u,%u,%u) waits at %s:%d", file, line, f.index.x,
           f.index.y, f.index.z, f.file, f.line);
    }
  }
  if (++s.barrier_arrived == static_cast<int>(s.fibers.size())) {
    s.barrier_arrived = 0;
    for (Fiber& f : s.fibers) release(f);
    yield_current();  // the scheduler picks the first thread in the order
    return;
  }
  block_current(Wait::kBarrier, file, line);
}

uint64_t shfl_xor_bits(const char* file, int line, unsigned mask, uint64_t bits, int lane_mask, int width) {
  State& s = st();
  if (mask != 0xffffffffu) fail("__shfl_xor_sync at %s:%d with the partial mask 0x%08x", file, line, mask);
  if (width != kWarp || lane_mask < 0 || lane_mask >= kWarp)
    fail("__shfl_xor_sync at %s:%d with width %d, lane mask %d", file, line, width, lane_mask);
  const int lane = s.current % kWarp;
  WarpSlot& w = arrive(Wait::kShuffle, file, line);
  w.in[lane] = bits;
  w.lane_mask[lane] = lane_mask;
  if (++w.arrived == kWarp) {
    for (int l = 0; l < kWarp; ++l) w.out[l] = w.in[l ^ w.lane_mask[l]];
  }
  wait_for_warp(w, Wait::kShuffle, file, line);
  return w.out[lane];
}

void mma_sync(const char* file, int line, const char* shape_and_types, float (&c)[4], const uint32_t (&a)[4],
              const uint32_t (&b)[2]) {
  State& s = st();
  const Shape& sh = shape_of(shape_and_types);
  const int lane = s.current % kWarp;
  WarpSlot& w = arrive(Wait::kMma, file, line);
  if (w.arrived == 0) {
    w.shape = sh.name;
  } else if (w.shape != sh.name) {
    fail("mma.sync.%s while other lanes of the warp run mma.sync.%s", sh.name, w.shape);
  }
  memcpy(w.a[lane], a, sizeof w.a[lane]);
  memcpy(w.b[lane], b, sizeof w.b[lane]);
  memcpy(w.c[lane], c, sizeof w.c[lane]);
  if (++w.arrived == kWarp) warp_mma(w, sh);
  wait_for_warp(w, Wait::kMma, file, line);
  memcpy(c, w.c[lane], sizeof c);
}

unsigned char* dynamic_shared() {
  if (!st().dynamic) fail("extern __shared__ memory used by a launch that gave it 0 bytes");
  return st().dynamic;
}

SharedSlot::SharedSlot(const char* name, size_t bytes) : name_(std::string("__shared__ ") + name), bytes_(bytes) {}

void* SharedSlot::get() {
  if (!data_) {
    if (bytes_ > static_cast<size_t>(kDefaultDynamicShared)) fail("%s: %zu bytes of static shared memory", name_.c_str(), bytes_);
    data_ = make_region(name_, bytes_, false)->data;
  }
  if (epoch_ != st().block_epoch) {  // the block's first thread here: poison it
    memset(data_, kPoison, bytes_);
    epoch_ = st().block_epoch;
  }
  return data_;
}

void* device_alloc(const char* name, size_t bytes, bool poison) {
  Region* r = make_region(name, bytes, st().guard_before);
  if (poison) memset(r->data, kPoison, bytes);
  return r->data;
}

void device_free(void* p) {
  if (Region* r = find_region(p)) free_region(r);
}

void device_read_only(void* p) {
  Region* r = find_region(p);
  if (!r) throw std::logic_error("emu: not a device buffer");
  r->read_only = true;
  mprotect(r->usable, r->usable_bytes, PROT_READ);
}

int take_launch_error() {
  const int e = st().launch_error;
  st().launch_error = 0;
  return e;
}

int set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > kMaxSharedPerBlock) return 1;
  st().max_dynamic[kernel] = bytes;
  return 0;
}

uint16_t round_to_bfloat16(double v) { return round_to_format(v, 7, -126, 127, 127); }
uint16_t round_to_half(double v) { return round_to_format(v, 10, -14, 15, 15); }

float half_bits_to_float(uint16_t bits) {
  const int sign = bits >> 15, exponent = (bits >> 10) & 0x1f, mantissa = bits & 0x3ff;
  float v;
  if (exponent == 0x1f) {
    v = mantissa ? NAN : INFINITY;
  } else if (exponent == 0) {
    v = std::ldexp(static_cast<float>(mantissa), -24);
  } else {
    v = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
  return sign ? -v : v;
}

void run_grid(const char* kernel, const char* context, const void* kernel_id, dim3 grid, dim3 block,
              size_t dynamic_bytes, const std::function<void()>& thread_body) {
  State& s = st();
  install_handlers();
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  const auto limit = s.max_dynamic.find(kernel_id);
  const size_t max_dynamic = limit == s.max_dynamic.end() ? kDefaultDynamicShared : limit->second;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || threads == 0 ||
      threads > 1024 || block.z > 64 || dynamic_bytes > max_dynamic) {
    s.launch_error = 9;  // cudaErrorInvalidConfiguration
    return;
  }
  s.kernel = kernel;
  s.context = context;
  s.grid = grid;
  s.block = block;
  s.fibers.assign(threads, Fiber{});
  s.warps.assign((threads + kWarp - 1) / kWarp, WarpSlot{});
  s.order = permutation(threads, s.thread_seed);
  s.body = &thread_body;
  Region* dynamic = dynamic_bytes ? make_region("extern __shared__", dynamic_bytes, s.guard_before) : nullptr;
  s.dynamic = dynamic ? reinterpret_cast<unsigned char*>(dynamic->data) : nullptr;
  s.dynamic_bytes = dynamic_bytes;
  const size_t blocks = static_cast<size_t>(grid.x) * grid.y * grid.z;
  const std::vector<int> block_order = permutation(blocks, s.block_seed);
  if (sigsetjmp(s.stop, 1) == 0) {
    for (int b : block_order) {
      s.block_index = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                       static_cast<unsigned>(b / (static_cast<size_t>(grid.x) * grid.y))};
      ++s.block_epoch;
      if (dynamic) memset(dynamic->data, kPoison, dynamic_bytes);
      run_block();
      check_canaries();
    }
  } else {
    // stopped: the fibers are abandoned where they stand
    s.kernel = nullptr;
    s.current = -1;
    if (dynamic) free_region(dynamic);
    s.dynamic = nullptr;
    throw KernelError(s.error);
  }
  s.kernel = nullptr;
  s.current = -1;
  if (dynamic) free_region(dynamic);
  s.dynamic = nullptr;
}

}  // namespace emu
