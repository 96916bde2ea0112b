#pragma once
// Vector building blocks for the CPU kernels, compiled once per CPU capability.
//
// Loads and stores convert bfloat16/float16 to and from float, so every kernel
// computes and accumulates in at::opmath_type<scalar_t>. float uses a fast exp and
// a short polynomial for log1p (relative error ~2e-7, below float32's own
// rounding of a row sum); double keeps Sleef's exact (1-ulp) exp and log1p.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

namespace vae_fast::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;
template <typename scalar_t>
using OpVec = Vectorized<opmath_t<scalar_t>>;

// Loads n <= OpVec::size() elements (the rest of the lanes are 0) as opmath.
// (ATen's partial loadu/store go through a memcpy: only the tail may use them.)
template <typename scalar_t>
inline OpVec<scalar_t> load_n(const scalar_t* p, int64_t n) {
  using Vec = OpVec<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    if (n == Vec::size()) {
      Vec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    }
    alignas(64) float buffer[Vec::size()] = {};
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(p[i]);
    return Vec::loadu(buffer);
  }
}

// Stores the first n lanes of v as scalar_t.
template <typename scalar_t>
inline void store_n(scalar_t* p, const OpVec<scalar_t>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
    if (n == OpVec<scalar_t>::size()) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
  }
}

// Sum of the first n lanes (the others may hold garbage from a partial load).
template <typename Vec>
inline Vec keep_first(const Vec& v, int64_t n) {
  return n == Vec::size() ? v : Vec::set(Vec(0), v, n);
}

template <typename Vec>
inline auto horizontal_sum(const Vec& v) {
  return at::vec::vec_reduce_all([](Vec a, Vec b) { return a + b; }, v);
}

// exp(a) for a <= 0 (so the result is in [0, 1] and never overflows).
template <typename Vec>
inline Vec exp_nonpositive(const Vec& a) {
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return a.exp_u20();
  } else {
    return a.exp();
  }
}

// log1p(e) for e in [0, 1]. float: e * P(e), P a degree-8 Chebyshev fit of
// log1p(e)/e on [0, 1] (max relative error 2.3e-7), instead of Sleef's log1p
// which alone doubled the kernel's time.
template <typename Vec>
inline Vec log1p_unit(const Vec& e) {
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    Vec p(0.005126102361828089f);
    p = at::vec::fmadd(p, e, Vec(-0.029074065387248993f));
    p = at::vec::fmadd(p, e, Vec(0.0775160863995552f));
    p = at::vec::fmadd(p, e, Vec(-0.13602247834205627f));
    p = at::vec::fmadd(p, e, Vec(0.19076880812644958f));
    p = at::vec::fmadd(p, e, Vec(-0.2483539879322052f));
    p = at::vec::fmadd(p, e, Vec(0.3331812024116516f));
    p = at::vec::fmadd(p, e, Vec(-0.4999944567680359f));
    p = at::vec::fmadd(p, e, Vec(0.9999999403953552f));
    return p * e;
  } else {
    return e.log1p();
  }
}

// 1/v for v in [1, 2]. AVX2 float: rcp (12 bits) refined by one Newton step
// (~23 bits) at a third of a division's cost; elsewhere a true division.
template <typename Vec>
inline Vec reciprocal_1_2(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    const __m256 r0 = _mm256_rcp_ps(v);
    return _mm256_mul_ps(r0, _mm256_fnmadd_ps(v, r0, _mm256_set1_ps(2.0f)));
  }
#endif
  return Vec(1) / v;
}

// Elements per parallel task: enough to amortise the fork.
constexpr int64_t kElementsPerTask = 32768;

// Rows per parallel task.
inline int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
}

// Splits [0, rows) into a fixed number of chunks (one per thread), so per-chunk
// partial sums (e.g. of a shared log-variance's gradient) are combined in an order
// that does not depend on scheduling: results are run-to-run deterministic.
template <typename F>
inline void for_each_row_chunk(int64_t rows, int64_t chunks, const F& body) {
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      body(c, rows * c / chunks, rows * (c + 1) / chunks);
    }
  });
}

inline int64_t num_row_chunks(int64_t rows, int64_t cols) {
  const int64_t by_work = (rows * std::max<int64_t>(cols, 1)) / kElementsPerTask + 1;
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), by_work, rows}));
}

template <typename scalar_t>
inline const scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
inline scalar_t* mutable_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr;
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast::cpu
