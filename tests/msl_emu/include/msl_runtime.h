// msl_runtime.h -- interface between compiled kernels and the emulator's runtime
// (runtime/msl_runtime.cpp, built once into its own shared library so that each kernel file compiles
// fast). The execution model and the checks are described there.
#ifndef MSL_EMU_RUNTIME_H  // a guard, not #pragma once: it also holds across the precompiled header
#define MSL_EMU_RUNTIME_H
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace msl_rt {
using u32 = uint32_t;
constexpr u32 SIMD_WIDTH = 32;
constexpr size_t SIMD_SLOT = 64;  // bytes one lane can pass through a simd_* collective

struct U3 { u32 x, y, z; };

// What a generated launcher passes to dispatch(); mirrored by ctypes in msl_emu/_abi.py.
struct Launch {
  void** buffers;                   // [[buffer(i)]] pointers (offset applied), nullptr if unbound
  const uint64_t* buffer_len;       // bytes from each pointer to the end of its array
  u32 n_buffers;
  u32 threadgroups[3];
  u32 threads_per_threadgroup[3];
  const uint64_t* threadgroup_len;  // [[threadgroup(i)]] lengths
  u32 n_threadgroup;
  u32 random_order;                 // 0: index order; 1: threadgroups and fibers shuffled with `seed`
  uint64_t seed;
  uint64_t stack_size;
  char* error;                      // out: empty if the dispatch was clean
  uint64_t error_cap;
};

struct ThreadCtx {
  U3 tpig, tpitg, tgpig, tptg, tgpg, tpg;
  u32 tiitg, lane, sgitg, tpsg, sgptg;
};

// Shadow state of one byte of threadgroup memory (see check_read / check_write).
struct ShadowByte {
  uint64_t w_phase, r_phase;      // barrier interval of the last write / of the reads
  uint64_t w_sgphase, r_sgphase;  // simdgroup_barrier interval of the same
  uint16_t w_thread, r_thread;    // r_thread == MANY: read by several threads
  uint16_t r_sg;                  // simdgroup of the readers, MANY if several
};

// One threadgroup allocation: a `threadgroup T x[N];` declaration or a [[threadgroup(i)]] binding.
struct Region {
  const char* name;
  unsigned char* data;
  size_t size;
  ShadowByte* shadow;
  uint64_t group;  // serial of the threadgroup it was last poisoned for
};

ThreadCtx& cur();
[[noreturn]] void fail(const char* message);
[[noreturn]] void fail_index(const Region& r, long index, size_t extent);
[[noreturn]] void fail_buffer(u32 index, size_t needed_align, size_t needed_bytes);
void check_read(Region& r, const void* p, size_t n);
void check_write(Region& r, void* p, const void* value, size_t n);
Region& enter_static(Region& r);  // poisons once per threadgroup, enforces the 32 KiB limit
Region& threadgroup_param(u32 index);
void threadgroup_barrier(const char* file, int line);
void simdgroup_barrier(const char* file, int line);
// simd collectives: deposit this lane's value and wait for the simdgroup; returns the simdgroup's
// slots ([lane][SIMD_SLOT]) and sets n_lanes (lanes past the end of the threadgroup hold 0xFF bytes);
// simd_end waits until every lane has read the slots.
const unsigned char* simd_begin(const void* value, size_t n, const char* what, const char* file, int line, u32* n_lanes);
void simd_end(const char* what, const char* file, int line);
void dispatch(const Launch& launch, const char* const* tg_names, u32 n_tg_names, void (*body)(void*), void* arg);

template <class T, class F>
inline T simd_collective(const char* what, const char* file, int line, const T& v, F combine) {
  static_assert(sizeof(T) <= SIMD_SLOT, "simd_* value larger than 64 bytes");
  static_assert(std::is_trivially_copyable_v<T>, "simd_* value must be trivially copyable");
  u32 n_lanes;
  const unsigned char* slots = simd_begin(&v, sizeof(T), what, file, line, &n_lanes);
  T vals[SIMD_WIDTH];
  for (u32 l = 0; l < SIMD_WIDTH; l++) memcpy(&vals[l], slots + l * SIMD_SLOT, sizeof(T));
  T r = combine(vals, n_lanes, cur().lane);
  simd_end(what, file, line);
  return r;
}

// Storage of one `threadgroup T name;` declaration (a static thread_local in the rewritten kernel).
template <class T> struct StaticRegion {
  alignas(16) unsigned char data[sizeof(T)];
  ShadowByte shadow[sizeof(T)];
  Region region;
  explicit StaticRegion(const char* name) : region{name, data, sizeof(T), shadow, 0} {}
  Region& enter() { return enter_static(region); }
};

// ---- kernel argument adapters: launchers never spell parameter types (kernels may be templates)
template <class T> struct vec_traits { static constexpr int n = 1; using elem = T; };

struct BufferArg {
  void* p;
  uint64_t len;
  u32 index;
  template <class P> operator P*() const {
    if (reinterpret_cast<uintptr_t>(p) % alignof(P) != 0) fail_buffer(index, alignof(P), 0);
    return reinterpret_cast<P*>(p);
  }
  template <class R, std::enable_if_t<!std::is_pointer_v<R>, int> = 0> operator R&() const {
    if (len < sizeof(R)) fail_buffer(index, 0, sizeof(R));
    return *operator R*();
  }
};

template <class T> inline T from_u3(U3 v) {
  using E = typename vec_traits<T>::elem;
  if constexpr (vec_traits<T>::n == 1) return (T)v.x;
  else if constexpr (vec_traits<T>::n == 2) return T{(E)v.x, (E)v.y};
  else return T{(E)v.x, (E)v.y, (E)v.z};
}
struct BuiltinU3 { U3 v; template <class T> operator T() const { return from_u3<T>(v); } };
struct BuiltinU32 { u32 v; template <class T> operator T() const { return (T)v; } };
}  // namespace msl_rt
#endif  // MSL_EMU_RUNTIME_H
