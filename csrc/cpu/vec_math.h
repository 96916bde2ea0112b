#pragma once
// Vector building blocks for the CPU kernels, compiled once per CPU capability.
//
// Loads and stores convert bfloat16/float16 to and from float, so every kernel
// computes and accumulates in at::opmath_type<scalar_t>. float uses a polynomial
// for log1p and, on AVX2 and AVX-512, a short-chain exp/expm1 (relative errors ~2e-7 to 4e-7,
// below float32's own rounding of a row sum); double keeps Sleef's 1-ulp exp and
// log1p.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

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

// A row sum in blocks, as torch's own sum cascades: vectors add into `block`, and
// every kBlock of them the block's lanes go into double totals. Each float rounding
// then spans at most kBlock terms, so a row of millions of elements keeps ~1e-7
// relative accuracy instead of growing an error with its length (2.6e-4 at 3e6).
template <typename Vec>
struct BlockedSum {
  static constexpr int kBlock = 64;
  Vec block = Vec(0);
  int count = 0;
  double total[Vec::size()] = {};

  void add(const Vec& v) {
    block += v;
    if (++count == kBlock) flush();
  }

  void flush() {
    typename Vec::value_type lanes[Vec::size()];
    block.store(lanes);
    for (int i = 0; i < Vec::size(); ++i) total[i] += lanes[i];
    block = Vec(0);
    count = 0;
  }

  // The sum so far; restarts the accumulator for the next row.
  double take() {
    flush();
    double sum = 0;
    for (int i = 0; i < Vec::size(); ++i) {
      sum += total[i];
      total[i] = 0;
    }
    return sum;
  }
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define VAE_FAST_SIMD_FLOAT 1
// The float register of this capability (the one Vectorized<float> wraps) and the
// few intrinsics the hand-written float paths below need, so that each path is
// written once for AVX2 (__m256, 8 lanes) and AVX-512 (__m512, 16 lanes, where the
// compares give mask registers and the blends take them: no blend-by-vector).
namespace simd {
#if defined(CPU_CAPABILITY_AVX512)
using Reg = __m512;
inline Reg set1(float v) { return _mm512_set1_ps(v); }
inline Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
inline Reg sub(Reg a, Reg b) { return _mm512_sub_ps(a, b); }
inline Reg mul(Reg a, Reg b) { return _mm512_mul_ps(a, b); }
inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
inline Reg fnmadd(Reg a, Reg b, Reg c) { return _mm512_fnmadd_ps(a, b, c); }
// max/min return their second operand when either is NaN.
inline Reg max(Reg a, Reg b) { return _mm512_max_ps(a, b); }
inline Reg min(Reg a, Reg b) { return _mm512_min_ps(a, b); }
// The float whose bits are those of `a`'s integer lanes shifted left by 23.
inline Reg shift_bits_23(Reg a) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(a), 23));
}
// v where a <= b (or unordered), else `above`.
inline Reg above_to(Reg a, Reg b, Reg v, Reg above) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), v, above);
}
// 1/v to 14 bits (vrcp14ps).
inline Reg rcp(Reg v) { return _mm512_rcp14_ps(v); }
#else
using Reg = __m256;
inline Reg set1(float v) { return _mm256_set1_ps(v); }
inline Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
inline Reg sub(Reg a, Reg b) { return _mm256_sub_ps(a, b); }
inline Reg mul(Reg a, Reg b) { return _mm256_mul_ps(a, b); }
inline Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
inline Reg fnmadd(Reg a, Reg b, Reg c) { return _mm256_fnmadd_ps(a, b, c); }
inline Reg max(Reg a, Reg b) { return _mm256_max_ps(a, b); }
inline Reg min(Reg a, Reg b) { return _mm256_min_ps(a, b); }
inline Reg shift_bits_23(Reg a) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(a), 23));
}
inline Reg above_to(Reg a, Reg b, Reg v, Reg above) {
  return _mm256_blendv_ps(v, above, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
}
// 1/v to 12 bits (rcpps).
inline Reg rcp(Reg v) { return _mm256_rcp_ps(v); }
#endif
}  // namespace simd

namespace fast_exp_impl {
// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2].
// float(ln 2) is off by 1.9e-9, so r is off by at most 127 * 1.9e-9 = 2.4e-7.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
// Arguments are clamped here: n = round(x / ln 2) is then >= -127, and n = -127
// gives 2^n the bit pattern 0, so exp is 0 below about -87.7 (and 2^n r^2 P(r)
// vanishes from expm1 - x) with no compare and blend.
constexpr float kMinArg = -88.0f;
constexpr float kMaxArg = 88.72283935546875f;  // ln(FLT_MAX): above it, inf
constexpr float kMaxN = 127.0f;                // largest n with 2^n finite
// Adding 1.5*2^23 rounds to an integer in the low mantissa bits; the +127 there
// is the exponent bias, so (bits << 23) is 2^n as a float without a conversion.
constexpr float kShifter = 12582912.0f + 127.0f;

enum class Exp { kExp, kExpm1MinusX };

// exp(x) (kNonPositive: for x <= 0 only, which skips the overflow handling), or
// expm1(x) - x = 2^n r^2 P(r) + (2^n r + 2^n - 1 - x): for |x| < ln2/2, n = 0 and
// r = x, so it is r^2 P(r) with no cancellation (a KL term of close variances).
// exp(r) = 1 + r + r^2 P(r), P a near-minimax fit of the relative error, Estrin-style:
// degree 3 for exp (1.0e-7 on the reduced range, <= 4e-7 overall, with the ln 2
// rounding) and degree 4 for expm1 - x, whose relative error is P's own (~5e-7).
// These kernels are bound by their instruction count, so each operation here is
// one the result needs.
template <Exp kWhat, bool kNonPositive>
inline simd::Reg exp_impl(simd::Reg x) {
  using namespace simd;
  constexpr bool kExpm1 = kWhat == Exp::kExpm1MinusX;
  // (max/min return their second operand for NaN, so NaN propagates.)
  const Reg x_low = max(set1(kMinArg), x);
  // n from x clamped so that 2^n stays a normal float; r from x itself, so the
  // top of the range, (88.03, 88.72], is reached with r up to 0.7 (error ~2e-6).
  const Reg xc = kNonPositive ? x_low : min(set1(kMaxN / kLog2e), x_low);
  const Reg k = fmadd(xc, set1(kLog2e), set1(kShifter));
  const Reg n = sub(k, set1(kShifter));
  const Reg r = fnmadd(n, set1(kLn2), x_low);
  const Reg pow2n = shift_bits_23(k);
  const Reg r2 = mul(r, r);
  Reg p;
  if constexpr (kExpm1) {
    // P(r) = (c0 + c1 r) + r^2 ((c2 + c3 r) + r^2 c4)
    const Reg p01 = fmadd(set1(0.16666577756404877f), r, set1(0.5f));
    const Reg p23 = fmadd(set1(0.008363170549273491f), r, set1(0.04166685417294502f));
    const Reg p24 = fmadd(set1(0.0013901293277740479f), r2, p23);
    p = fmadd(p24, r2, p01);
  } else {
    // P(r) = (c0 + c1 r) + r^2 (c2 + c3 r)
    const Reg p01 = fmadd(set1(0.16667114431416602f), r, set1(0.4999923169673017f));
    const Reg p23 = fmadd(set1(0.008312531095900045f), r, set1(0.04189012369979417f));
    p = fmadd(p23, r2, p01);
  }
  Reg result;
  if constexpr (kExpm1) {
    const Reg low = sub(sub(pow2n, set1(1.0f)), x);
    result = fmadd(pow2n, mul(p, r2), fmadd(pow2n, r, low));
  } else {
    const Reg exp_r = fmadd(p, r2, add(r, set1(1.0f)));
    result = mul(exp_r, pow2n);
  }
  // Above kMaxArg: +inf. (NaN compares false, and has propagated.)
  if constexpr (!kNonPositive) {
    result = above_to(x, set1(kMaxArg), result, set1(INFINITY));
  }
  return result;
}
}  // namespace fast_exp_impl
#endif

// exp for the kernels: on AVX2/AVX-512 float, the short exp above; else ATen's (Sleef's
// 1-ulp exp for double).
template <typename Vec>
inline Vec fast_exp(const Vec& x) {
#if defined(VAE_FAST_SIMD_FLOAT)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return fast_exp_impl::exp_impl<fast_exp_impl::Exp::kExp, false>(x);
  }
#endif
  return x.exp();
}

// exp(x) for x <= 0 (a result in [0, 1], which never overflows).
template <typename Vec>
inline Vec exp_nonpositive(const Vec& x) {
#if defined(VAE_FAST_SIMD_FLOAT)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return fast_exp_impl::exp_impl<fast_exp_impl::Exp::kExp, true>(x);
  }
#endif
  return x.exp();
}

// expm1(x) - x, the KL's variance term, without the cancellation of subtracting
// x from expm1(x) near 0. AVX2/AVX-512 float: in one piece, above. Elsewhere: ATen's
// expm1 minus x, but for |x| below a cutoff the Taylor series sum_{k>=2} x^k/k!
// (float: |x| < 0.5 to x^9; double: |x| < 0.01 to x^7; both below 1 ulp).
template <typename Vec>
inline Vec expm1_minus_x(const Vec& x) {
#if defined(VAE_FAST_SIMD_FLOAT)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return fast_exp_impl::exp_impl<fast_exp_impl::Exp::kExpm1MinusX, false>(x);
  }
#endif
  using T = typename Vec::value_type;
  constexpr bool kFloat = std::is_same_v<T, float>;
  constexpr int kLastPower = kFloat ? 9 : 7;
  const T cutoff = kFloat ? T(0.5) : T(0.01);
  T inverse_factorial = 1;
  for (int k = 2; k <= kLastPower; ++k) inverse_factorial /= T(k);
  Vec series(inverse_factorial);  // Horner from x^kLastPower / kLastPower! down
  for (int k = kLastPower; k > 2; --k) {
    inverse_factorial *= T(k);
    series = at::vec::fmadd(series, x, Vec(inverse_factorial));
  }
  return Vec::blendv(x.expm1() - x, series * x * x, x.abs() < Vec(cutoff));
}

// log1p(e) + addend for e = exp(-|l|) in [0, 1] (log1p(e) keeps its relative precision
// for tiny e). float: log1p(e) = e * P(e), P a degree-8 Chebyshev fit of log1p(e)/e on
// [0, 1] (max relative error 2.3e-7), in Estrin's scheme, instead of Sleef's log1p
// which alone doubled the kernel's time; its last step adds `addend` in the same fma.
template <typename Vec>
inline Vec log1p_exp_plus(const Vec& e, const Vec& addend) {
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    using at::vec::fmadd;
    const Vec e2 = e * e;
    const Vec e4 = e2 * e2;
    const Vec p01 = fmadd(Vec(-0.4999944567680359f), e, Vec(0.9999999403953552f));
    const Vec p23 = fmadd(Vec(-0.2483539879322052f), e, Vec(0.3331812024116516f));
    const Vec p45 = fmadd(Vec(-0.13602247834205627f), e, Vec(0.19076880812644958f));
    const Vec p67 = fmadd(Vec(-0.029074065387248993f), e, Vec(0.0775160863995552f));
    const Vec p03 = fmadd(p23, e2, p01);
    const Vec p48 = fmadd(Vec(0.005126102361828089f), e4, fmadd(p67, e2, p45));
    return fmadd(fmadd(p48, e4, p03), e, addend);
  } else {
    return addend + e.log1p();
  }
}

// 1/v for v in [1, 2]. AVX2/AVX-512 float: rcp (12/14 bits) refined by one Newton step
// (~23 bits) at a third of a division's cost; elsewhere a true division.
template <typename Vec>
inline Vec reciprocal_1_2(const Vec& v) {
#if defined(VAE_FAST_SIMD_FLOAT)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    const simd::Reg r0 = simd::rcp(v);
    return simd::mul(r0, simd::fnmadd(v, r0, simd::set1(2.0f)));
  }
#endif
  return Vec(1) / v;
}

// The row sum of log1p(e_j), e_j in [0, 1], as the log of a running product: each lane
// keeps Q = prod(1 + e_j) - 1, updated as Q <- Q*(1 + e) + e (one fma, given the 1 + e
// the sigmoid needs anyway), and every kBlock vectors adds log1p(Q) to double totals.
// That replaces a log1p polynomial per element by one log1p per lane and block:
// prod(1 + e) <= 2^kBlock stays finite in float, and keeping Q = prod - 1 (not the
// product) keeps tiny e exact in relative terms (a near-perfect decoder's rows).
template <typename Vec>
struct Log1pSum {
  static constexpr int kBlock = 64;
  Vec q = Vec(0);
  int count = 0;
  double total[Vec::size()] = {};

  // e in [0, 1] and one_plus_e = 1 + e; lanes to be left out must have e = 0.
  void add(const Vec& e, const Vec& one_plus_e) {
    q = at::vec::fmadd(q, one_plus_e, e);
    if (++count == kBlock) flush();
  }

  void flush() {
    typename Vec::value_type lanes[Vec::size()];
    q.log1p().store(lanes);
    for (int i = 0; i < Vec::size(); ++i) total[i] += lanes[i];
    q = Vec(0);
    count = 0;
  }

  // The sum so far; restarts for the next row.
  double take() {
    if (count > 0) flush();
    double sum = 0;
    for (int i = 0; i < Vec::size(); ++i) {
      sum += total[i];
      total[i] = 0;
    }
    return sum;
  }
};

// (x - [l >= 0]) * l, the linear part of x*l - softplus(l) = (x - [l >= 0])*l - log1p(e),
// e = exp(-|l|); 0, the limit, where x - [l >= 0] = 0 at l = +-inf (0*inf would be nan).
template <typename Vec>
inline Vec bernoulli_linear_part(const Vec& x, const Vec& l) {
  const Vec coef = Vec::blendv(x, x - Vec(1), l >= Vec(0));
  const Vec limit = (coef == Vec(0)) & ((l | Vec(-0.0)) == Vec(-std::numeric_limits<float>::infinity()));
  return Vec::blendv(coef * l, Vec(0), limit);
}

// e = exp(-|l|) in the first n lanes, 0 in the others (which then add nothing to a
// Log1pSum). e is in (0, 1]: exp never overflows, even at |l| = 1e4 (-|l| is l with
// its sign bit set: one instruction).
template <typename Vec>
inline Vec exp_minus_abs(const Vec& l, int64_t n) {
  return keep_first(exp_nonpositive(l | Vec(-0.0)), n);
}

// The row sum of x*l - softplus(l) = (x - [l >= 0])*l - log1p(e): the linear parts
// summed in blocks, the log1p terms as a running product. The linear part is summed
// apart from log1p(e), so that a tiny loss at large |l| is not lost in l + log1p(e)
// rounding back to l.
template <typename Vec>
struct BernoulliRowSum {
  BlockedSum<Vec> linear;
  Log1pSum<Vec> log1p;

  // Lanes past the row's end must hold x = l = e = 0 (they then add exactly 0).
  void add(const Vec& x, const Vec& l, const Vec& e, const Vec& one_plus_e) {
    linear.add(bernoulli_linear_part(x, l));
    log1p.add(e, one_plus_e);
  }
  double take() { return linear.take() - log1p.take(); }
};

// d/dl (x*l - softplus(l)) = x - sigmoid(l), from e = exp(-|l|) and t = e/(1+e):
// x - t for l < 0 and (x - 1) + t for l >= 0, so the gradient is exactly 0 at
// saturation (1 - t is never formed, and an approximate 1/(1+e) cannot leak in).
template <typename Vec>
inline Vec bernoulli_residual(const Vec& x, const Vec& l, const Vec& e, const Vec& one_plus_e) {
  const Vec t = e * reciprocal_1_2(one_plus_e);
  return Vec::blendv(x - t, (x - Vec(1)) + t, l >= Vec(0));
}

// The running min and max of Bernoulli targets, two operations per vector, so that
// a target outside [0, 1] is found in the pass that reads x anyway (no second pass).
// A NaN target is not "outside": it propagates to a NaN result instead.
template <typename Vec>
struct TargetRange {
  Vec lo = Vec(std::numeric_limits<float>::infinity());
  Vec hi = Vec(-std::numeric_limits<float>::infinity());

  void add(const Vec& x) {
#if defined(VAE_FAST_SIMD_FLOAT)
    if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
      // min/max return their second operand when either is NaN: one instruction
      // each, and a NaN x leaves the range as it was.
      lo = simd::min(x, lo);
      hi = simd::max(x, hi);
      return;
    }
#endif
    lo = at::vec::minimum(lo, x);
    hi = at::vec::maximum(hi, x);
  }

  bool outside_unit_interval() const {
    using T = typename Vec::value_type;
    T l[Vec::size()], h[Vec::size()];
    lo.store(l);
    hi.store(h);
    for (int i = 0; i < Vec::size(); ++i) {
      if (l[i] < T(0) || h[i] > T(1)) return true;
    }
    return false;
  }
};

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

// The gradient of a shared (scalar or per-feature) input, summed over rows in a
// fixed order: each row chunk of for_each_row_chunk adds its rows into its own
// opmath partial, flushed every kBlockRows rows into double totals (a column summed
// over millions of rows keeps its accuracy), and `write` combines the chunks in
// order, so the result does not depend on scheduling. Inactive: no memory, no work.
template <typename opmath>
class ColumnSums {
 public:
  static constexpr int64_t kBlockRows = 64;

  ColumnSums(bool active, int64_t chunks, int64_t cols)
      : cols_(cols),
        partial_(active ? chunks * cols : 0, opmath(0)),
        totals_(active ? chunks * cols : 0, 0.0) {}

  bool active() const { return !partial_.empty(); }
  // Chunk `chunk`'s running row sums, one per column (null when inactive).
  opmath* partial(int64_t chunk) { return active() ? partial_.data() + chunk * cols_ : nullptr; }

  // After the `done`-th row of a chunk (counting from 1).
  void end_row(int64_t chunk, int64_t done) {
    if (active() && done % kBlockRows == 0) flush(chunk);
  }
  void end_chunk(int64_t chunk) {
    if (active()) flush(chunk);
  }

  // The sums per column, or their total when `one_value` (a scalar input).
  template <typename scalar_t>
  void write(scalar_t* out, bool one_value) const {
    std::vector<double> total(cols_, 0.0);
    for (size_t c = 0; c < totals_.size(); c += cols_) {
      for (int64_t j = 0; j < cols_; ++j) total[j] += totals_[c + j];
    }
    if (one_value) {
      double sum = 0;
      for (int64_t j = 0; j < cols_; ++j) sum += total[j];
      out[0] = static_cast<scalar_t>(sum);
    } else {
      for (int64_t j = 0; j < cols_; ++j) out[j] = static_cast<scalar_t>(total[j]);
    }
  }

 private:
  void flush(int64_t chunk) {
    opmath* p = partial_.data() + chunk * cols_;
    double* t = totals_.data() + chunk * cols_;
    for (int64_t j = 0; j < cols_; ++j) {
      t[j] += p[j];
      p[j] = opmath(0);
    }
  }

  int64_t cols_;
  std::vector<opmath> partial_;
  std::vector<double> totals_;
};

// A shared (scalar or per-feature) input as one opmath value per column, read by
// every row: an operand of kind kScalar (1 element) or kFeature (cols elements).
template <typename scalar_t>
std::vector<opmath_t<scalar_t>> column_values(const at::Tensor& data, bool one_value,
                                              int64_t cols) {
  const scalar_t* p = data.const_data_ptr<scalar_t>();
  std::vector<opmath_t<scalar_t>> values(cols);
  for (int64_t j = 0; j < cols; ++j) {
    values[j] = static_cast<opmath_t<scalar_t>>(p[one_value ? 0 : j]);
  }
  return values;
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
