// msl_shim.h -- the Metal Shading Language subset that tests/msl_emu compiles as C++ (clang >= 16).
// The supported subset is listed in tests/msl_emu/README.md; anything outside it should fail to
// compile rather than run with different semantics.
#ifndef MSL_EMU_SHIM_H  // a guard, not #pragma once: it also holds across the precompiled header
#define MSL_EMU_SHIM_H
#include <cfloat>
#include <cmath>
#include <limits>
#include "msl_runtime.h"

#ifndef __clang__
#error "msl_shim.h needs clang (ext_vector_type vectors with swizzles, _Float16)"
#endif

#define __METAL_VERSION__ 310

// ---------------------------------------------------------------- scalar and vector types
typedef _Float16 half;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
static_assert(sizeof(half) == 2 && sizeof(long) == 8, "MSL scalar sizes");

template <class T, int N> struct msl_vector_of;
#define MSL_VECTOR(T, N, NAME)                                                                      \
  typedef T NAME __attribute__((ext_vector_type(N)));                                               \
  namespace msl_rt { template <> struct vec_traits<NAME> { static constexpr int n = N; using elem = T; }; } \
  template <> struct msl_vector_of<T, N> { using type = NAME; };
#define MSL_VECTORS(T, P) MSL_VECTOR(T, 2, P##2) MSL_VECTOR(T, 3, P##3) MSL_VECTOR(T, 4, P##4)
MSL_VECTORS(float, float)
MSL_VECTORS(half, half)
MSL_VECTORS(int, int)
MSL_VECTORS(uint, uint)
MSL_VECTORS(short, short)
MSL_VECTORS(ushort, ushort)
MSL_VECTORS(char, char)
MSL_VECTORS(uchar, uchar)
MSL_VECTORS(bool, bool)
#undef MSL_VECTORS
#undef MSL_VECTOR

// packed_T3/4: no padding, element access and conversion to/from the aligned vector only
template <class T, int N> struct msl_packed {
  T v[N];
  using V = typename msl_vector_of<T, N>::type;
  msl_packed() = default;
  msl_packed(V x) { for (int i = 0; i < N; i++) v[i] = x[i]; }
  operator V() const { V r; for (int i = 0; i < N; i++) r[i] = v[i]; return r; }
  T& operator[](int i) { return v[i]; }
  T operator[](int i) const { return v[i]; }
};
#define MSL_PACKED(T, P) typedef msl_packed<T, 2> packed_##P##2; typedef msl_packed<T, 3> packed_##P##3; \
  typedef msl_packed<T, 4> packed_##P##4;
MSL_PACKED(float, float) MSL_PACKED(half, half) MSL_PACKED(int, int) MSL_PACKED(uint, uint)
MSL_PACKED(short, short) MSL_PACKED(ushort, ushort) MSL_PACKED(char, char) MSL_PACKED(uchar, uchar)
#undef MSL_PACKED
static_assert(sizeof(packed_float3) == 12 && sizeof(float3) == 16 && sizeof(half3) == 8, "MSL vector sizes");

// ---------------------------------------------------------------- threadgroup memory proxies
// Threadgroup memory is only reached through these types (the rewriter turns `threadgroup T*` into
// tg_ptr<T>, `threadgroup T&` into tg_ref<T>, `threadgroup T x[N];` into a checked region), so every
// load and store is bounds- and race-checked (msl_runtime.h).
namespace msl_rt {
template <class T> struct tg_ptr;
template <class T> struct tg_ref;
template <class A> struct tg_arr;

template <class T> struct plain { using type = T; };
template <class T> struct plain<tg_ref<T>> { using type = std::remove_const_t<T>; };
template <class T> using plain_t = typename plain<std::decay_t<T>>::type;
template <class T> inline plain_t<T> unref(const T& x) { return x; }
template <class T> struct is_tg_ref : std::false_type {};
template <class T> struct is_tg_ref<tg_ref<T>> : std::true_type {};
template <class T> struct vec_traits<tg_ref<T>> : vec_traits<std::remove_const_t<T>> {};

template <class T> struct tg_ref {
  using value_type = std::remove_const_t<T>;
  Region* r;
  T* p;
  operator value_type() const {
    check_read(*r, p, sizeof(T));
    value_type v;
    memcpy(&v, p, sizeof(T));
    return v;
  }
  const tg_ref& operator=(const value_type& v) const {
    static_assert(!std::is_const_v<T>, "store through a `threadgroup const` pointer");
    check_write(*r, (void*)p, &v, sizeof(T));
    memcpy((void*)p, &v, sizeof(T));
    return *this;
  }
  const tg_ref& operator=(const tg_ref& o) const { return *this = value_type(o); }
  template <class U> const tg_ref& operator=(const tg_ref<U>& o) const { return *this = value_type(o); }
#define MSL_TG_COMPOUND(OP) \
  template <class U> const tg_ref& operator OP##=(const U& u) const { return *this = value_type(value_type(*this) OP unref(u)); }
  MSL_TG_COMPOUND(+) MSL_TG_COMPOUND(-) MSL_TG_COMPOUND(*) MSL_TG_COMPOUND(/) MSL_TG_COMPOUND(%)
  MSL_TG_COMPOUND(&) MSL_TG_COMPOUND(|) MSL_TG_COMPOUND(^) MSL_TG_COMPOUND(<<) MSL_TG_COMPOUND(>>)
#undef MSL_TG_COMPOUND
  const tg_ref& operator++() const { return *this = value_type(value_type(*this) + 1); }
  const tg_ref& operator--() const { return *this = value_type(value_type(*this) - 1); }
  value_type operator++(int) const { value_type old = *this; *this = value_type(old + 1); return old; }
  value_type operator--(int) const { value_type old = *this; *this = value_type(old - 1); return old; }
  // component i of a vector in threadgroup memory
  auto operator[](int i) const {
    static_assert(vec_traits<value_type>::n > 1, "operator[] on a threadgroup scalar");
    using E = std::conditional_t<std::is_const_v<T>, const typename vec_traits<value_type>::elem,
                                 typename vec_traits<value_type>::elem>;
    if (i < 0 || i >= vec_traits<value_type>::n) fail_index(*r, i, vec_traits<value_type>::n);
    return tg_ref<E>{r, reinterpret_cast<E*>(p) + i};
  }
  tg_ptr<T> operator&() const { return tg_ptr<T>(r, p); }
};

#define MSL_TG_BINOP(OP)                                                                                   \
  template <class T, class U>                                                                             \
  inline auto operator OP(const tg_ref<T>& a, const U& b)->decltype(std::declval<std::remove_const_t<T>>() OP unref(b)) { \
    return std::remove_const_t<T>(a) OP unref(b);                                                         \
  }                                                                                                       \
  template <class U, class T, std::enable_if_t<!is_tg_ref<U>::value, int> = 0>                              \
  inline auto operator OP(const U& a, const tg_ref<T>& b)->decltype(a OP std::declval<std::remove_const_t<T>>()) { \
    return a OP std::remove_const_t<T>(b);                                                                \
  }
MSL_TG_BINOP(+) MSL_TG_BINOP(-) MSL_TG_BINOP(*) MSL_TG_BINOP(/) MSL_TG_BINOP(%) MSL_TG_BINOP(&)
MSL_TG_BINOP(|) MSL_TG_BINOP(^) MSL_TG_BINOP(<<) MSL_TG_BINOP(>>) MSL_TG_BINOP(==) MSL_TG_BINOP(!=)
MSL_TG_BINOP(<) MSL_TG_BINOP(>) MSL_TG_BINOP(<=) MSL_TG_BINOP(>=)
#undef MSL_TG_BINOP
template <class T> inline auto operator-(const tg_ref<T>& a) { return -std::remove_const_t<T>(a); }
template <class T> inline auto operator!(const tg_ref<T>& a) { return !std::remove_const_t<T>(a); }
template <class T> inline auto operator~(const tg_ref<T>& a) { return ~std::remove_const_t<T>(a); }

template <class T> struct tg_ptr {
  Region* r = nullptr;
  T* p = nullptr;
  tg_ptr() = default;
  tg_ptr(std::nullptr_t) {}
  tg_ptr(Region* r, T* p) : r(r), p(p) {}
  template <class U, std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>, int> = 0>
  tg_ptr(const tg_ptr<U>& o) : r(o.r), p(o.p) {}  // T* -> const T*
  template <class U, std::enable_if_t<!std::is_same_v<const U, T>, int> = 0>
  explicit tg_ptr(const tg_ptr<U>& o) : r(o.r), p((T*)o.p) {}  // (threadgroup float4*)p
  template <class A> explicit tg_ptr(const tg_arr<A>& a) : r(a.r), p((T*)a.p) {}
  tg_ref<T> operator*() const { return {r, p}; }
  tg_ref<T> operator[](ptrdiff_t i) const { return {r, p + i}; }
  tg_ptr operator+(ptrdiff_t i) const { return {r, p + i}; }
  tg_ptr operator-(ptrdiff_t i) const { return {r, p - i}; }
  ptrdiff_t operator-(const tg_ptr& o) const { return p - o.p; }
  tg_ptr& operator+=(ptrdiff_t i) { p += i; return *this; }
  tg_ptr& operator-=(ptrdiff_t i) { p -= i; return *this; }
  tg_ptr& operator++() { ++p; return *this; }
  tg_ptr& operator--() { --p; return *this; }
  tg_ptr operator++(int) { tg_ptr o = *this; ++p; return o; }
  tg_ptr operator--(int) { tg_ptr o = *this; --p; return o; }
  bool operator==(const tg_ptr& o) const { return p == o.p; }
  bool operator!=(const tg_ptr& o) const { return p != o.p; }
  bool operator<(const tg_ptr& o) const { return p < o.p; }
  explicit operator bool() const { return p != nullptr; }
};
template <class T> inline tg_ptr<T> operator+(ptrdiff_t i, const tg_ptr<T>& q) { return q + i; }

// `threadgroup E x[N]...;` seen through its declaration name: indexing is bounds-checked per dimension
template <class A> struct tg_arr {
  using E = std::remove_extent_t<A>;
  static constexpr size_t N = std::extent_v<A>;
  Region* r;
  E* p;
  auto operator[](ptrdiff_t i) const {
    if (i < 0 || (size_t)i >= N) fail_index(*r, i, N);
    if constexpr (std::is_array_v<E>) return tg_arr<E>{r, reinterpret_cast<std::remove_extent_t<E>*>(p + i)};
    else return tg_ref<E>{r, p + i};
  }
  template <class X = E, std::enable_if_t<!std::is_array_v<X>, int> = 0> operator tg_ptr<E>() const { return {r, p}; }
  template <class X = E, std::enable_if_t<!std::is_array_v<X>, int> = 0> operator tg_ptr<const E>() const { return {r, p}; }
  tg_ptr<E> operator+(ptrdiff_t i) const { return tg_ptr<E>(r, p + i); }
};

template <class T> inline auto tg_view(Region& r) {
  if constexpr (std::is_array_v<T>) return tg_arr<T>{&r, reinterpret_cast<std::remove_extent_t<T>*>(r.data)};
  else return tg_ref<T>{&r, reinterpret_cast<T*>(r.data)};
}

// [[threadgroup(i)]] kernel parameter
struct ThreadgroupArg {
  u32 index;
  template <class T> operator tg_ptr<T>() const {
    Region& r = threadgroup_param(index);
    return {&r, reinterpret_cast<T*>(r.data)};
  }
  template <class T> operator tg_ref<T>() const {
    Region& r = threadgroup_param(index);
    if (r.size < sizeof(T)) fail("[[threadgroup(i)]] memory is smaller than its parameter type");
    return {&r, reinterpret_cast<T*>(r.data)};
  }
};

// ---------------------------------------------------------------- vector helpers
template <class T, int N> using vec_t = typename msl_vector_of<T, N>::type;
template <class V, class A> inline void append(V& r, int& k, const A& a) {
  using E = typename vec_traits<V>::elem;
  if constexpr (vec_traits<A>::n == 1) r[k++] = (E)unref(a);
  else { auto v = unref(a); for (int i = 0; i < vec_traits<A>::n; i++) r[k++] = (E)v[i]; }
}
// MSL vector constructors: float4(x) splats or converts, float4(a.xy, b, c) concatenates
template <class T, int N, class... A> inline vec_t<T, N> make_vec(const A&... a) {
  vec_t<T, N> r;
  constexpr int total = (vec_traits<plain_t<A>>::n + ... + 0);
  if constexpr (sizeof...(A) == 1 && total == 1) {
    T s = (T)(unref(a), ...);
    for (int i = 0; i < N; i++) r[i] = s;
  } else {
    static_assert(total == N, "MSL vector constructor: component count mismatch");
    int k = 0;
    (append(r, k, a), ...);
  }
  return r;
}
template <class V, class F> inline V vmap(V v, F f) {
  if constexpr (vec_traits<V>::n == 1) return f(v);
  else { V r; for (int i = 0; i < vec_traits<V>::n; i++) r[i] = f(v[i]); return r; }
}
template <class V, class F> inline V vmap2(V a, V b, F f) {
  if constexpr (vec_traits<V>::n == 1) return f(a, b);
  else { V r; for (int i = 0; i < vec_traits<V>::n; i++) r[i] = f(a[i], b[i]); return r; }
}
template <class V, class F> inline V vmap3(V a, V b, V c, F f) {
  if constexpr (vec_traits<V>::n == 1) return f(a, b, c);
  else { V r; for (int i = 0; i < vec_traits<V>::n; i++) r[i] = f(a[i], b[i], c[i]); return r; }
}
// The type a mixed call such as max(float4, float) or max(x, 0) computes in.
template <class... A> struct common;
template <class A> struct common<A> { using type = plain_t<A>; };
template <class A, class B, class... R> struct common<A, B, R...> {
  using PA = plain_t<A>;
  using PB = typename common<B, R...>::type;
  using type = std::conditional_t<(vec_traits<PA>::n > 1), PA,
               std::conditional_t<(vec_traits<PB>::n > 1), PB,
               std::conditional_t<std::is_same_v<PA, PB>, PA, decltype(PA() + PB())>>>;
};
template <class... A> using common_t = typename common<A...>::type;
template <class V, class A> inline V as_v(const A& a) { return (V)unref(a); }
template <class T> constexpr bool is_float_v = std::is_floating_point_v<T> || std::is_same_v<T, half>;
}  // namespace msl_rt

// ---------------------------------------------------------------- metal namespace
namespace metal {
using msl_rt::as_v;
using msl_rt::common_t;
using msl_rt::plain_t;
using msl_rt::unref;
using msl_rt::vec_traits;
template <class T, int N> using vec = msl_rt::vec_t<T, N>;

template <class T, size_t N> struct array {
  T _e[N];
  T& operator[](size_t i) { return _e[i]; }
  const T& operator[](size_t i) const { return _e[i]; }
  static constexpr size_t size() { return N; }
};

template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static half max() { return (half)65504.0f; }
  static half min() { return (half)6.103515625e-05f; }
  static half lowest() { return (half)-65504.0f; }
  static half epsilon() { return (half)0.0009765625f; }
  static half infinity() { return (half)INFINITY; }
  static half quiet_NaN() { return (half)NAN; }
};

// ---- math: element-wise on scalars and vectors, computed in float and rounded to the argument type
#define MSL_UNARY(NAME, EXPR)                                                              \
  template <class A> inline auto NAME(const A& a) {                                        \
    using V = plain_t<A>;                                                                  \
    return msl_rt::vmap(V(unref(a)), [](auto x) { using E = decltype(x); return (E)(EXPR); }); \
  }
MSL_UNARY(exp, std::exp((float)x)) MSL_UNARY(exp2, std::exp2((float)x)) MSL_UNARY(exp10, std::pow(10.0f, (float)x))
MSL_UNARY(log, std::log((float)x)) MSL_UNARY(log2, std::log2((float)x)) MSL_UNARY(log10, std::log10((float)x))
MSL_UNARY(sqrt, std::sqrt((float)x)) MSL_UNARY(rsqrt, 1.0f / std::sqrt((float)x))
MSL_UNARY(sin, std::sin((float)x)) MSL_UNARY(cos, std::cos((float)x)) MSL_UNARY(tan, std::tan((float)x))
MSL_UNARY(tanh, std::tanh((float)x)) MSL_UNARY(atan, std::atan((float)x)) MSL_UNARY(erf, std::erf((float)x))
MSL_UNARY(floor, std::floor((float)x)) MSL_UNARY(ceil, std::ceil((float)x)) MSL_UNARY(round, std::round((float)x))
MSL_UNARY(rint, std::nearbyint((float)x)) MSL_UNARY(trunc, std::trunc((float)x)) MSL_UNARY(fabs, std::fabs((float)x))
MSL_UNARY(fract, (float)x - std::floor((float)x))
MSL_UNARY(sign, (float)x > 0 ? 1.0f : ((float)x < 0 ? -1.0f : 0.0f))
MSL_UNARY(abs, msl_rt::is_float_v<E> ? (E)std::fabs((float)x) : (x < 0 ? (E)-x : x))
MSL_UNARY(popcount, (E)__builtin_popcountll((unsigned long long)(std::make_unsigned_t<E>)x))
#undef MSL_UNARY

#define MSL_BINARY(NAME, EXPR)                                                                  \
  template <class A, class B> inline auto NAME(const A& a, const B& b) {                        \
    using V = common_t<A, B>;                                                                   \
    return msl_rt::vmap2(as_v<V>(a), as_v<V>(b), [](auto x, auto y) { using E = decltype(x); return (E)(EXPR); }); \
  }
MSL_BINARY(max, x > y ? x : y) MSL_BINARY(min, x < y ? x : y)
MSL_BINARY(fmax, std::fmax((float)x, (float)y)) MSL_BINARY(fmin, std::fmin((float)x, (float)y))
MSL_BINARY(pow, std::pow((float)x, (float)y)) MSL_BINARY(powr, std::pow((float)x, (float)y))
MSL_BINARY(fmod, std::fmod((float)x, (float)y)) MSL_BINARY(copysign, std::copysign((float)x, (float)y))
MSL_BINARY(atan2, std::atan2((float)x, (float)y)) MSL_BINARY(step, (float)y < (float)x ? 0.0f : 1.0f)
#undef MSL_BINARY

template <class A, class B, class C> inline auto clamp(const A& x, const B& lo, const C& hi) {
  using V = common_t<A, B, C>;
  return min(max(as_v<V>(x), as_v<V>(lo)), as_v<V>(hi));
}
template <class A> inline auto saturate(const A& x) { using V = plain_t<A>; return clamp(V(unref(x)), V(0), V(1)); }
template <class A, class B, class C> inline auto fma(const A& a, const B& b, const C& c) {
  using V = common_t<A, B, C>;
  return msl_rt::vmap3(as_v<V>(a), as_v<V>(b), as_v<V>(c), [](auto x, auto y, auto z) {
    using E = decltype(x); return (E)std::fma((float)x, (float)y, (float)z); });
}
template <class A, class B, class C> inline auto mix(const A& x, const B& y, const C& t) {
  using V = common_t<A, B, C>;
  return as_v<V>(x) + (as_v<V>(y) - as_v<V>(x)) * as_v<V>(t);
}
template <class A, class B> inline auto dot(const A& a, const B& b) {
  using V = common_t<A, B>;
  static_assert(vec_traits<V>::n > 1, "dot needs vectors");
  V x = as_v<V>(a), y = as_v<V>(b);
  typename vec_traits<V>::elem s = 0;
  for (int i = 0; i < vec_traits<V>::n; i++) s += x[i] * y[i];
  return s;
}
template <class A> inline auto length(const A& a) { auto d = dot(a, a); return (decltype(d))std::sqrt((float)d); }
template <class A, class B, class C> inline auto select(const A& a, const B& b, const C& c) {
  using V = common_t<A, B>;
  V x = as_v<V>(a), y = as_v<V>(b);
  auto m = unref(c);
  if constexpr (vec_traits<V>::n == 1) return m ? y : x;
  else { V r; for (int i = 0; i < vec_traits<V>::n; i++) r[i] = m[i] ? y[i] : x[i]; return r; }
}
template <class A> inline bool all(const A& a) {
  auto v = unref(a);
  if constexpr (vec_traits<decltype(v)>::n == 1) return (bool)v;
  else { for (int i = 0; i < vec_traits<decltype(v)>::n; i++) if (!v[i]) return false; return true; }
}
template <class A> inline bool any(const A& a) {
  auto v = unref(a);
  if constexpr (vec_traits<decltype(v)>::n == 1) return (bool)v;
  else { for (int i = 0; i < vec_traits<decltype(v)>::n; i++) if (v[i]) return true; return false; }
}
template <class A> inline bool isnan(const A& a) {
  static_assert(vec_traits<plain_t<A>>::n == 1, "isnan: scalars only in this emulator");
  return std::isnan((float)unref(a));
}
template <class A> inline bool isinf(const A& a) {
  static_assert(vec_traits<plain_t<A>>::n == 1, "isinf: scalars only in this emulator");
  return std::isinf((float)unref(a));
}
template <class A> inline bool isfinite(const A& a) {
  static_assert(vec_traits<plain_t<A>>::n == 1, "isfinite: scalars only in this emulator");
  return std::isfinite((float)unref(a));
}
template <class To, class From> inline To as_type(const From& f) {
  auto v = unref(f);
  static_assert(sizeof(To) == sizeof(v), "as_type: sizes differ");
  To t;
  memcpy(&t, &v, sizeof(To));
  return t;
}
template <class A, class B> inline auto divide(const A& a, const B& b) { using V = common_t<A, B>; return as_v<V>(a) / as_v<V>(b); }
namespace fast {
using metal::cos; using metal::divide; using metal::exp; using metal::exp2; using metal::log; using metal::log2;
using metal::max; using metal::min; using metal::pow; using metal::powr; using metal::rsqrt; using metal::sin;
using metal::sqrt; using metal::tanh;
}  // namespace fast
namespace precise {
using metal::cos; using metal::divide; using metal::exp; using metal::exp2; using metal::log; using metal::log2;
using metal::max; using metal::min; using metal::pow; using metal::powr; using metal::rsqrt; using metal::sin;
using metal::sqrt; using metal::tanh;
}  // namespace precise

// ---- barriers
enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags((int)a | (int)b); }
inline void threadgroup_barrier(mem_flags, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  msl_rt::threadgroup_barrier(file, line);
}
inline void simdgroup_barrier(mem_flags, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  msl_rt::simdgroup_barrier(file, line);
}

// ---- simdgroup functions (32 lanes; every lane of the simdgroup must make the same calls)
#define MSL_SIMD_LOC const char *file = __builtin_FILE(), int line = __builtin_LINE()
template <class T, class F> inline T simd_reduce(const char* what, const char* file, int line, T v, F f) {
  return msl_rt::simd_collective(what, file, line, v, [f](const T* vals, uint n, uint) {
    T acc = vals[0];
    for (uint l = 1; l < n; l++) acc = f(acc, vals[l]);
    return acc;
  });
}
template <class A> inline auto simd_sum(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>; return simd_reduce<T>("simd_sum", file, line, unref(a), [](T x, T y) { return T(x + y); });
}
template <class A> inline auto simd_product(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>; return simd_reduce<T>("simd_product", file, line, unref(a), [](T x, T y) { return T(x * y); });
}
template <class A> inline auto simd_max(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>; return simd_reduce<T>("simd_max", file, line, unref(a), [](T x, T y) { return max(x, y); });
}
template <class A> inline auto simd_min(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>; return simd_reduce<T>("simd_min", file, line, unref(a), [](T x, T y) { return min(x, y); });
}
template <class A> inline auto simd_and(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>; return simd_reduce<T>("simd_and", file, line, unref(a), [](T x, T y) { return T(x & y); });
}
template <class A> inline auto simd_or(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>; return simd_reduce<T>("simd_or", file, line, unref(a), [](T x, T y) { return T(x | y); });
}
template <class A> inline auto simd_xor(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>; return simd_reduce<T>("simd_xor", file, line, unref(a), [](T x, T y) { return T(x ^ y); });
}
// lane `src` of the simdgroup; lanes past the end of a partial simdgroup read poison (0xFF bytes)
template <class A> inline auto simd_shuffle(const A& a, ushort src, MSL_SIMD_LOC) {
  using T = plain_t<A>;
  return msl_rt::simd_collective("simd_shuffle", file, line, unref(a), [src](const T* v, uint, uint) { return v[src & 31]; });
}
template <class A> inline auto simd_broadcast(const A& a, ushort src, MSL_SIMD_LOC) {
  using T = plain_t<A>;
  return msl_rt::simd_collective("simd_broadcast", file, line, unref(a), [src](const T* v, uint, uint) { return v[src & 31]; });
}
template <class A> inline auto simd_shuffle_down(const A& a, ushort d, MSL_SIMD_LOC) {
  using T = plain_t<A>;
  return msl_rt::simd_collective("simd_shuffle_down", file, line, unref(a),
                                 [d](const T* v, uint, uint l) { return l + d < 32 ? v[l + d] : v[l]; });
}
template <class A> inline auto simd_shuffle_up(const A& a, ushort d, MSL_SIMD_LOC) {
  using T = plain_t<A>;
  return msl_rt::simd_collective("simd_shuffle_up", file, line, unref(a),
                                 [d](const T* v, uint, uint l) { return l >= d ? v[l - d] : v[l]; });
}
template <class A> inline auto simd_shuffle_xor(const A& a, ushort m, MSL_SIMD_LOC) {
  using T = plain_t<A>;
  return msl_rt::simd_collective("simd_shuffle_xor", file, line, unref(a), [m](const T* v, uint, uint l) { return v[(l ^ m) & 31]; });
}
template <class A> inline auto simd_broadcast_first(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>;
  return msl_rt::simd_collective("simd_broadcast_first", file, line, unref(a), [](const T* v, uint, uint) { return v[0]; });
}
inline bool simd_is_first(MSL_SIMD_LOC) {
  return msl_rt::simd_collective("simd_is_first", file, line, 0, [](const int*, uint, uint l) { return (int)(l == 0); });
}
inline bool simd_all(bool b, MSL_SIMD_LOC) {
  return simd_reduce<int>("simd_all", file, line, (int)b, [](int x, int y) { return x & y; });
}
inline bool simd_any(bool b, MSL_SIMD_LOC) {
  return simd_reduce<int>("simd_any", file, line, (int)b, [](int x, int y) { return x | y; });
}
template <class A> inline auto simd_prefix_exclusive_sum(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>;
  return msl_rt::simd_collective("simd_prefix_exclusive_sum", file, line, unref(a), [](const T* v, uint, uint l) {
    T s = T(0); for (uint i = 0; i < l; i++) s += v[i]; return s; });
}
template <class A> inline auto simd_prefix_inclusive_sum(const A& a, MSL_SIMD_LOC) {
  using T = plain_t<A>;
  return msl_rt::simd_collective("simd_prefix_inclusive_sum", file, line, unref(a), [](const T* v, uint, uint l) {
    T s = T(0); for (uint i = 0; i <= l; i++) s += v[i]; return s; });
}
#undef MSL_SIMD_LOC

// ---- atomics on device memory (relaxed order is all MSL offers)
enum memory_order { memory_order_relaxed };
template <class T> struct atomic { T v; };
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;
using atomic_float = atomic<float>;
template <class T, class U> inline T atomic_fetch_add_explicit(volatile atomic<T>* a, U x, memory_order) {
  if constexpr (std::is_same_v<T, float>) { T old = a->v; a->v = old + (T)x; return old; }  // one OS thread runs all fibers
  else return __atomic_fetch_add(&a->v, (T)x, __ATOMIC_RELAXED);
}
template <class T, class U> inline T atomic_fetch_sub_explicit(volatile atomic<T>* a, U x, memory_order) {
  if constexpr (std::is_same_v<T, float>) { T old = a->v; a->v = old - (T)x; return old; }
  else return __atomic_fetch_sub(&a->v, (T)x, __ATOMIC_RELAXED);
}
template <class T, class U> inline T atomic_fetch_max_explicit(volatile atomic<T>* a, U x, memory_order) {
  T old = a->v; if ((T)x > old) a->v = (T)x; return old;
}
template <class T, class U> inline T atomic_fetch_min_explicit(volatile atomic<T>* a, U x, memory_order) {
  T old = a->v; if ((T)x < old) a->v = (T)x; return old;
}
template <class T, class U> inline T atomic_exchange_explicit(volatile atomic<T>* a, U x, memory_order) {
  T old = a->v; a->v = (T)x; return old;
}
template <class T, class U> inline void atomic_store_explicit(volatile atomic<T>* a, U x, memory_order) { a->v = (T)x; }
template <class T> inline T atomic_load_explicit(volatile atomic<T>* a, memory_order) { return a->v; }
template <class T, class U> inline bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* a, T* expected, U desired,
                                                                              memory_order, memory_order) {
  if (a->v == *expected) { a->v = (T)desired; return true; }
  *expected = a->v;
  return false;
}
}  // namespace metal

#ifndef MAXFLOAT
#define MAXFLOAT FLT_MAX
#endif
#define HALF_MAX ((half)65504.0f)
#define HALF_MIN ((half)6.103515625e-05f)
#define M_PI_F 3.14159265358979323846f
#define M_LN2_F 0.693147180559945309417f
#define M_LOG2E_F 1.44269504088896340736f
#define M_SQRT2_F 1.41421356237309504880f

// ---------------------------------------------------------------- MSL keywords
// Address spaces mean nothing on a CPU; `constant` keeps its read-only-ness. `threadgroup` is
// rewritten by the rewriter and must not survive it.
#define device
#define constant const
#define thread
#define kernel
// Vector constructors float4(a, b) ... as function-like macros, so plain type names stay untouched.
#define float2(...) ::msl_rt::make_vec<float, 2>(__VA_ARGS__)
#define float3(...) ::msl_rt::make_vec<float, 3>(__VA_ARGS__)
#define float4(...) ::msl_rt::make_vec<float, 4>(__VA_ARGS__)
#define half2(...) ::msl_rt::make_vec<half, 2>(__VA_ARGS__)
#define half3(...) ::msl_rt::make_vec<half, 3>(__VA_ARGS__)
#define half4(...) ::msl_rt::make_vec<half, 4>(__VA_ARGS__)
#define int2(...) ::msl_rt::make_vec<int, 2>(__VA_ARGS__)
#define int3(...) ::msl_rt::make_vec<int, 3>(__VA_ARGS__)
#define int4(...) ::msl_rt::make_vec<int, 4>(__VA_ARGS__)
#define uint2(...) ::msl_rt::make_vec<uint, 2>(__VA_ARGS__)
#define uint3(...) ::msl_rt::make_vec<uint, 3>(__VA_ARGS__)
#define uint4(...) ::msl_rt::make_vec<uint, 4>(__VA_ARGS__)
#define short2(...) ::msl_rt::make_vec<short, 2>(__VA_ARGS__)
#define short4(...) ::msl_rt::make_vec<short, 4>(__VA_ARGS__)
#define ushort2(...) ::msl_rt::make_vec<ushort, 2>(__VA_ARGS__)
#define ushort4(...) ::msl_rt::make_vec<ushort, 4>(__VA_ARGS__)
#define char4(...) ::msl_rt::make_vec<char, 4>(__VA_ARGS__)
#define uchar4(...) ::msl_rt::make_vec<uchar, 4>(__VA_ARGS__)
#endif  // MSL_EMU_SHIM_H
