// msl_runtime.cpp -- the CPU execution model behind msl_shim.h (built once per compiler and flags).
//
// One dispatch runs its threadgroups one after another. Inside a threadgroup every GPU thread is a
// fiber (small mmap'd stack with a guard page); a fiber runs until it blocks at a
// threadgroup_barrier or a simd_* collective, and the scheduler releases a barrier only when every
// thread of the group (or every lane of the simdgroup) waits at the same call. Everything that would
// be undefined behaviour on a GPU and that the emulator can see is reported as an error string that
// the Python runner raises:
//   * a thread exits while others wait at a barrier; threads wait at different barriers,
//   * lanes of a simdgroup reach different simd_* calls, or some lanes skip one (divergent control flow),
//   * threadgroup memory: a read of bytes no thread wrote in this threadgroup, a read of bytes another
//     thread wrote since the last barrier (missing barrier), a write to bytes another thread read or
//     wrote since the last barrier, an index outside the allocation, more than 32 KiB in total.
// Threadgroup memory is filled with 0xFF (NaN for float and half) at the start of every threadgroup.
#include "msl_runtime.h"

#include <algorithm>
#include <cstdio>
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MSL_EMU_ASAN 1
#endif
#endif
#ifdef MSL_EMU_ASAN
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
#endif

namespace msl_rt {
namespace {
// ---------------------------------------------------------------- context switching
// x86-64: save the callee-saved registers and swap stacks, a few instructions (swapcontext makes a
// signal-mask system call on every switch, which dominated the run time). Elsewhere: ucontext.
#if defined(__x86_64__) && !defined(MSL_EMU_UCONTEXT)
extern "C" void msl_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl msl_emu_switch
  .hidden msl_emu_switch
  .type msl_emu_switch, @function
msl_emu_switch:
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
  .size msl_emu_switch, .-msl_emu_switch
)");

struct Context { void* sp = nullptr; };

// A new context "returns" into entry with the stack aligned as after a call; entry never returns.
void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack + size)) & ~uintptr_t(15));
  *--sp = nullptr;                               // entry's return address
  *--sp = reinterpret_cast<void*>(entry);        // taken by `ret`
  for (int i = 0; i < 6; i++) *--sp = nullptr;   // rbp rbx r12 r13 r14 r15
  c.sp = sp;
}
void context_switch(Context& from, Context& to) { msl_emu_switch(&from.sp, to.sp); }
#else
struct Context { ucontext_t uc; };
void context_init(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr size_t THREADGROUP_MEMORY_LIMIT = 32768;
constexpr uint16_t MANY = 0xFFFF;

enum class State : uint8_t { ready, at_barrier, at_simd, done, aborted };

// Where a fiber is blocked: the call and its source location, and how many collectives it had done.
struct WaitPoint { const char* what = ""; const char* file = ""; int line = 0; uint64_t seq = 0; };

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  State state = State::ready;
  WaitPoint wait;
  uint64_t n_simd_calls = 0;
  ThreadCtx tc;
};

struct ParamRegion {
  std::string name;
  std::vector<unsigned char> data;
  std::vector<ShadowByte> shadow;
  Region region;
};

struct Group {
  const Launch* launch = nullptr;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::vector<Fiber> fibers;
  Context sched_ctx;
  std::vector<unsigned char> simd_slots;  // [simdgroup][lane][SIMD_SLOT]
  std::vector<ParamRegion> params;        // [[threadgroup(i)]]
  std::vector<uint64_t> sg_phase;         // per simdgroup, bumped by simdgroup_barrier
  U3 pos{0, 0, 0};
  u32 n_threads = 0, n_simdgroups = 0;
  uint64_t serial = 0;        // this threadgroup's serial
  uint64_t group_start = 0;   // phase at the start of this threadgroup
  uint64_t phase = 0;         // current barrier interval
  size_t tg_bytes = 0;        // threadgroup memory in use by this threadgroup
  size_t guard = 0;           // bytes of the PROT_NONE page below each fiber stack
  std::string error;
  int current = -1;
#ifdef MSL_EMU_ASAN
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
#endif
};

thread_local Group* g_group = nullptr;
thread_local uint64_t g_counter = 0;  // source of serials and phases, monotonic

Fiber& cur_fiber() { return g_group->fibers[g_group->current]; }

std::string fmt_pos(U3 p) {
  return "(" + std::to_string(p.x) + "," + std::to_string(p.y) + "," + std::to_string(p.z) + ")";
}

void to_scheduler() {
  Group& G = *g_group;
  Fiber& f = cur_fiber();
#ifdef MSL_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, G.sched_stack_bottom, G.sched_stack_size);
  context_switch(f.ctx, G.sched_ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  context_switch(f.ctx, G.sched_ctx);
#endif
}

// The failing fiber's return addresses inside kernel libraries, as "\n@@library+0xoffset" lines that
// the Python side turns into .metal source lines (addr2line on the line tables).
std::string kernel_frames() {
  void* frames[32];
  const int n = backtrace(frames, 32);
  Dl_info self{};
  dladdr(reinterpret_cast<void*>(&kernel_frames), &self);
  std::string out;
  for (int i = 0; i < n; i++) {
    Dl_info info{};
    if (!dladdr(frames[i], &info) || !info.dli_fname || info.dli_fbase == self.dli_fbase) continue;
    char offset[32];  // a return address: the call is one byte before it
    snprintf(offset, sizeof offset, "+0x%zx", (size_t)((char*)frames[i] - (char*)info.dli_fbase) - 1);
    out += std::string("\n@@") + info.dli_fname + offset;
  }
  return out;
}

[[noreturn]] void fail_str(const std::string& msg) {
  Group& G = *g_group;
  if (G.error.empty())
    G.error = "threadgroup " + fmt_pos(G.pos) + ", thread " + std::to_string(G.current) + ": " + msg + kernel_frames();
  cur_fiber().state = State::aborted;
  to_scheduler();
  abort();  // unreachable: an aborted fiber is never resumed
}

void block(State s, const char* what, const char* file, int line) {
  Fiber& f = cur_fiber();
  f.state = s;
  f.wait = WaitPoint{what, file, line, f.n_simd_calls};
  to_scheduler();
}

std::string where(const Region& r, const unsigned char* p) {
  return "threadgroup memory `" + std::string(r.name) + "` byte " + std::to_string(p - r.data);
}

void check_bounds(const Region& r, const void* p, size_t n) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  if (b < r.data || b + n > r.data + r.size)
    fail_str("access of " + std::to_string(n) + " bytes at offset " + std::to_string((long long)(b - r.data)) +
             " of threadgroup memory `" + r.name + "` (" + std::to_string(r.size) + " bytes) is out of bounds");
}

// Accesses by two different threads conflict unless a threadgroup_barrier separates them, or both
// threads are in one simdgroup and a simdgroup_barrier separates them.
bool synced(uint64_t phase, u32 other_sg, uint64_t other_sgphase) {
  Group& G = *g_group;
  if (phase != G.phase) return true;
  const u32 sg = cur_fiber().tc.sgitg;
  return other_sg == sg && other_sgphase != G.sg_phase[sg];
}

void poison(Region& r) {
  r.group = g_group->serial;
  memset(r.data, 0xFF, r.size);
}

// A fault inside a fiber (a guard page hit by a stack overflow, or a wild device access) becomes
// the dispatch's error: the handler runs on an alternate stack and abandons the fiber like fail().
// Faults anywhere else go to the previous handler (Python's faulthandler, or the default crash).
thread_local struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void*) {
  Group* G = g_group;
  if (!G || G->current < 0) {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    return;  // the faulting instruction runs again under the old handler
  }
  const char* addr = static_cast<const char*>(info->si_addr);
  const Fiber& f = G->fibers[G->current];
  char msg[200];
  if (addr >= f.stack - G->guard && addr < f.stack)
    snprintf(msg, sizeof msg, "stack overflow: more than %zu KiB of stack per GPU thread (large thread-local arrays?)",
             (size_t)(G->launch->stack_size / 1024));
  else
    snprintf(msg, sizeof msg, "%s at address %p (a device access far out of bounds? run it with sanitize=\"address\")",
             sig == SIGBUS ? "bus error" : "segmentation fault", info->si_addr);
  fail_str(msg);
}

// Installs on_fault and an alternate signal stack for the duration of a dispatch.
struct FaultGuard {
  stack_t old_stack{};
  std::vector<char> alt_stack = std::vector<char>(256 * 1024);
  bool active = false;
  FaultGuard() {
#ifndef MSL_EMU_ASAN  // AddressSanitizer reports these faults itself
    stack_t st{};
    st.ss_sp = alt_stack.data();
    st.ss_size = alt_stack.size();
    sigaltstack(&st, &old_stack);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;  // NODEFER: we leave by a context switch
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    active = true;
#endif
  }
  ~FaultGuard() {
    if (!active) return;
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaltstack(&old_stack, nullptr);
  }
};

void fiber_entry() {
  Group& G = *g_group;
#ifdef MSL_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &G.sched_stack_bottom, &G.sched_stack_size);
#endif
  G.body(G.body_arg);
  Fiber& f = cur_fiber();
  f.state = State::done;
#ifdef MSL_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, G.sched_stack_bottom, G.sched_stack_size);  // this fiber ends
#endif
  context_switch(f.ctx, G.sched_ctx);  // never resumed
  abort();
}

void resume(Group& G, u32 i) {
  G.current = (int)i;
  Fiber& f = G.fibers[i];
#ifdef MSL_EMU_ASAN
  __sanitizer_start_switch_fiber(&G.sched_fake_stack, f.stack, G.launch->stack_size);
  context_switch(G.sched_ctx, f.ctx);
  __sanitizer_finish_switch_fiber(G.sched_fake_stack, &G.sched_stack_bottom, &G.sched_stack_size);
#else
  context_switch(G.sched_ctx, f.ctx);
#endif
  G.current = -1;
}

std::string thread_list(const std::vector<u32>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) j++;
    if (!s.empty()) s += ",";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

std::string at(const WaitPoint& w) { return std::string(w.what) + " (" + w.file + ":" + std::to_string(w.line) + ")"; }

bool same_call(const WaitPoint& a, const WaitPoint& b) {
  return a.line == b.line && strcmp(a.file, b.file) == 0 && strcmp(a.what, b.what) == 0 && a.seq == b.seq;
}

// Every fiber is blocked or done: release simdgroup collectives or the threadgroup barrier, or
// explain why none can be released. Returns false when the threadgroup is finished or failed.
bool release_blocked(Group& G) {
  const std::string group = "threadgroup " + fmt_pos(G.pos) + ": ";
  bool released = false;
  for (u32 s = 0; s < G.n_simdgroups; s++) {
    const u32 lo = s * SIMD_WIDTH, hi = std::min(G.n_threads, lo + SIMD_WIDTH);
    std::vector<u32> at_simd, others;
    for (u32 i = lo; i < hi; i++) (G.fibers[i].state == State::at_simd ? at_simd : others).push_back(i);
    if (at_simd.empty()) continue;
    const WaitPoint& w0 = G.fibers[at_simd[0]].wait;
    for (u32 i : at_simd) {
      const WaitPoint& w = G.fibers[i].wait;
      if (!same_call(w, w0)) {
        G.error = group + "divergent simdgroup call in simdgroup " + std::to_string(s) + ": thread " +
                  std::to_string(at_simd[0]) + " waits at " + at(w0) + " (its simd call #" + std::to_string(w0.seq) +
                  "), thread " + std::to_string(i) + " at " + at(w) + " (its simd call #" + std::to_string(w.seq) + ")";
        return false;
      }
    }
    if (!others.empty()) {
      const Fiber& o = G.fibers[others[0]];
      G.error = group + "divergent simdgroup call in simdgroup " + std::to_string(s) + ": threads " +
                thread_list(at_simd) + " wait at " + at(w0) + " while threads " + thread_list(others) + " " +
                (o.state == State::done ? std::string("exited") : "wait at " + at(o.wait)) +
                " (every lane of a simdgroup must make the same simd_* calls)";
      return false;
    }
    for (u32 i : at_simd) G.fibers[i].state = State::ready;
    released = true;
  }
  if (released) return true;

  std::vector<u32> waiting, done;
  for (u32 i = 0; i < G.n_threads; i++) (G.fibers[i].state == State::done ? done : waiting).push_back(i);
  if (waiting.empty()) return false;
  const WaitPoint& w0 = G.fibers[waiting[0]].wait;
  if (!done.empty()) {
    G.error = group + "threads " + thread_list(done) + " exited while threads " + thread_list(waiting) +
              " wait at " + at(w0) + " (early return before a barrier: every thread of a threadgroup must reach each barrier)";
    return false;
  }
  for (u32 i : waiting) {
    const WaitPoint& w = G.fibers[i].wait;
    if (w.line != w0.line || strcmp(w.file, w0.file) != 0) {
      G.error = group + "threads wait at different barriers: thread " + std::to_string(waiting[0]) + " at " + at(w0) +
                ", thread " + std::to_string(i) + " at " + at(w);
      return false;
    }
  }
  G.phase = ++g_counter;
  for (u32 i : waiting) G.fibers[i].state = State::ready;
  return true;
}

void run_group(Group& G, std::mt19937_64* rng, std::vector<u32>& order) {
  G.serial = ++g_counter;
  G.group_start = G.phase = ++g_counter;
  G.tg_bytes = 0;
  for (auto& p : G.params) { poison(p.region); G.tg_bytes += p.region.size; }
  const Launch& L = *G.launch;
  const U3 tgsz{L.threads_per_threadgroup[0], L.threads_per_threadgroup[1], L.threads_per_threadgroup[2]};
  const U3 ntg{L.threadgroups[0], L.threadgroups[1], L.threadgroups[2]};
  for (u32 i = 0; i < G.n_threads; i++) {
    Fiber& f = G.fibers[i];
    const u32 lx = i % tgsz.x, ly = (i / tgsz.x) % tgsz.y, lz = i / (tgsz.x * tgsz.y);
    f.tc = ThreadCtx{{G.pos.x * tgsz.x + lx, G.pos.y * tgsz.y + ly, G.pos.z * tgsz.z + lz},
                     {lx, ly, lz}, G.pos, tgsz, ntg, {ntg.x * tgsz.x, ntg.y * tgsz.y, ntg.z * tgsz.z},
                     i, i % SIMD_WIDTH, i / SIMD_WIDTH, SIMD_WIDTH, G.n_simdgroups};
    f.state = State::ready;
    f.n_simd_calls = 0;
    context_init(f.ctx, f.stack, L.stack_size, fiber_entry);
  }
  for (;;) {
    if (rng) std::shuffle(order.begin(), order.end(), *rng);
    for (u32 i : order) {
      if (G.fibers[i].state != State::ready) continue;
      resume(G, i);
      if (!G.error.empty()) return;
    }
    if (!release_blocked(G)) return;
  }
}
}  // namespace

// ---------------------------------------------------------------- API used by kernels
ThreadCtx& cur() { return cur_fiber().tc; }

void fail(const char* message) { fail_str(message); }

void fail_index(const Region& r, long index, size_t extent) {
  fail_str("index " + std::to_string(index) + " out of bounds of threadgroup array `" + r.name + "` (extent " +
           std::to_string(extent) + ")");
}

void fail_buffer(u32 index, size_t needed_align, size_t needed_bytes) {
  if (needed_align)
    fail_str("buffer(" + std::to_string(index) + ") is not aligned to " + std::to_string(needed_align) +
             " bytes (its offset must be a multiple of the element's alignment)");
  fail_str("buffer(" + std::to_string(index) + ") holds " + std::to_string(g_group->launch->buffer_len[index]) +
           " bytes after its offset; the parameter needs " + std::to_string(needed_bytes));
}

void check_read(Region& r, const void* p, size_t n) {
  check_bounds(r, p, n);
  Group& G = *g_group;
  const u32 t = cur().tiitg, sg = cur().sgitg;
  const unsigned char* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; i++) {
    ShadowByte& s = r.shadow[b + i - r.data];
    if (s.w_phase < G.group_start)
      fail_str("reads " + where(r, b + i) + ", which no thread of this threadgroup has written yet "
               "(uninitialised, or written later by another thread without a barrier in between)");
    if (s.w_thread != t && !synced(s.w_phase, s.w_thread / SIMD_WIDTH, s.w_sgphase))
      fail_str("missing barrier: reads " + where(r, b + i) + ", written by thread " + std::to_string(s.w_thread) +
               " after the last threadgroup_barrier");
    if (s.r_phase != G.phase) {
      s.r_phase = G.phase; s.r_thread = (uint16_t)t; s.r_sg = (uint16_t)sg; s.r_sgphase = G.sg_phase[sg];
    } else if (s.r_thread != t) {
      s.r_thread = MANY;
      if (s.r_sg != sg) s.r_sg = MANY;
      s.r_sgphase = std::min(s.r_sgphase, G.sg_phase[sg]);
    }
  }
}

void check_write(Region& r, void* p, const void* value, size_t n) {
  check_bounds(r, p, n);
  Group& G = *g_group;
  const u32 t = cur().tiitg, sg = cur().sgitg;
  unsigned char* b = static_cast<unsigned char*>(p);
  const unsigned char* v = static_cast<const unsigned char*>(value);
  for (size_t i = 0; i < n; i++) {
    ShadowByte& s = r.shadow[b + i - r.data];
    const bool written_here = s.w_phase >= G.group_start;
    // several threads storing the same value is harmless on a GPU: not reported
    if (written_here && s.w_thread != t && b[i] != v[i] && !synced(s.w_phase, s.w_thread / SIMD_WIDTH, s.w_sgphase))
      fail_str("missing barrier: writes " + where(r, b + i) + ", written by thread " + std::to_string(s.w_thread) +
               " after the last threadgroup_barrier");
    if (s.r_phase == G.phase && s.r_thread != t && !synced(s.r_phase, s.r_sg, s.r_sgphase))
      fail_str("missing barrier: writes " + where(r, b + i) + ", read by " +
               (s.r_thread == MANY ? std::string("other threads") : "thread " + std::to_string(s.r_thread)) +
               " after the last threadgroup_barrier");
    s.w_phase = G.phase; s.w_thread = (uint16_t)t; s.w_sgphase = G.sg_phase[sg];
  }
}

Region& enter_static(Region& r) {
  Group& G = *g_group;
  if (r.group != G.serial) {
    poison(r);
    G.tg_bytes += r.size;
    if (G.tg_bytes > THREADGROUP_MEMORY_LIMIT)
      fail_str("threadgroup memory exceeds " + std::to_string(THREADGROUP_MEMORY_LIMIT) + " bytes (" +
               std::to_string(G.tg_bytes) + " with `" + r.name + "`)");
  }
  return r;
}

Region& threadgroup_param(u32 index) { return g_group->params[index].region; }

void threadgroup_barrier(const char* file, int line) { block(State::at_barrier, "threadgroup_barrier", file, line); }

// Like a collective without data: while every lane is parked between the two waits, lane 0 starts a
// new simdgroup phase, so accesses before and after the barrier never look concurrent.
void simdgroup_barrier(const char* file, int line) {
  block(State::at_simd, "simdgroup_barrier", file, line);
  if (cur().lane == 0) g_group->sg_phase[cur().sgitg] = ++g_counter;
  cur_fiber().n_simd_calls++;
  block(State::at_simd, "simdgroup_barrier", file, line);
}

const unsigned char* simd_begin(const void* value, size_t n, const char* what, const char* file, int line, u32* n_lanes) {
  Group& G = *g_group;
  const ThreadCtx& tc = cur();
  unsigned char* base = &G.simd_slots[(size_t)tc.sgitg * SIMD_WIDTH * SIMD_SLOT];
  memcpy(base + tc.lane * SIMD_SLOT, value, n);
  block(State::at_simd, what, file, line);
  *n_lanes = std::min(SIMD_WIDTH, G.n_threads - tc.sgitg * SIMD_WIDTH);
  return base;
}

void simd_end(const char* what, const char* file, int line) {
  cur_fiber().n_simd_calls++;
  block(State::at_simd, what, file, line);
}

void dispatch(const Launch& L, const char* const* tg_names, u32 n_tg_names, void (*body)(void*), void* arg) {
  const u32* tp = L.threads_per_threadgroup;
  const uint64_t nt = (uint64_t)tp[0] * tp[1] * tp[2];
  Group G;
  G.launch = &L; G.body = body; G.body_arg = arg;
  G.n_threads = (u32)nt;
  G.n_simdgroups = (u32)((nt + SIMD_WIDTH - 1) / SIMD_WIDTH);
  G.fibers.resize(nt);
  // slots of lanes past the end of a partial simdgroup keep 0xFF bytes (poison)
  G.simd_slots.assign((size_t)G.n_simdgroups * SIMD_WIDTH * SIMD_SLOT, 0xFF);
  G.sg_phase.assign(G.n_simdgroups, 0);
  G.params.resize(L.n_threadgroup);
  for (u32 i = 0; i < L.n_threadgroup; i++) {
    ParamRegion& p = G.params[i];
    p.name = i < n_tg_names ? tg_names[i] : "threadgroup(" + std::to_string(i) + ")";
    p.data.resize(L.threadgroup_len[i]);
    p.shadow.resize(L.threadgroup_len[i]);
    p.region = Region{p.name.c_str(), p.data.data(), p.data.size(), p.shadow.data(), 0};
  }
  // one mapping: per fiber a PROT_NONE guard page, then its stack (stacks grow down into the guard)
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  const size_t slot = page + L.stack_size;
  char* stacks = (char*)mmap(nullptr, slot * nt, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) { snprintf(L.error, L.error_cap, "mmap of fiber stacks failed"); return; }
  for (uint64_t i = 0; i < nt; i++) {
    mprotect(stacks + i * slot, page, PROT_NONE);
    G.fibers[i].stack = stacks + i * slot + page;
  }
  std::vector<U3> groups;
  for (u32 z = 0; z < L.threadgroups[2]; z++)
    for (u32 y = 0; y < L.threadgroups[1]; y++)
      for (u32 x = 0; x < L.threadgroups[0]; x++) groups.push_back({x, y, z});
  std::mt19937_64 rng(L.seed);
  if (L.random_order) std::shuffle(groups.begin(), groups.end(), rng);
  std::vector<u32> order(nt);
  for (u32 i = 0; i < nt; i++) order[i] = i;

  G.guard = page;
  Group* outer = g_group;
  g_group = &G;
  {
    FaultGuard fault_guard;
    for (U3 pos : groups) {
      G.pos = pos;
      run_group(G, L.random_order ? &rng : nullptr, order);
      if (!G.error.empty()) break;
    }
  }
  g_group = outer;
  munmap(stacks, slot * nt);
  snprintf(L.error, L.error_cap, "%s", G.error.c_str());
}
}  // namespace msl_rt
