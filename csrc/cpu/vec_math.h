#pragma once
// Vector building blocks for the CPU kernels, compiled once per CPU capability.
//
// Loads and stores convert bfloat16/float16 to and from float, so every kernel
// computes and accumulates in at::opmath_type<scalar_t>. float on AVX2 and AVX-512
// uses a short-chain exp/expm1 (relative errors ~2e-7 to 4e-7, below float32's own
// rounding of a row sum) and takes a Bernoulli row's log1p terms as the log of a
// running product (one Sleef log1p per lane every 16 vectors); double keeps Sleef's
// 1-ulp exp and log1p.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
// A non-temporal store (past the caches) to a 64-byte aligned p.
inline void store_streaming(float* p, Reg v) { _mm512_stream_ps(p, v); }
// v * 2^n for integral n (vscalefps): no exponent bits to build, and a result below
// the smallest float is 0.
inline Reg scale_pow2(Reg v, Reg n) { return _mm512_scalef_ps(v, n); }
// The lanes' bits as unsigned integers, their maximum (as a float register).
inline Reg max_bits(Reg a, Reg b) {
  return _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}
// -|v|, at least `bound` (max returns its second operand, -|v|, for NaN). Not vrangeps,
// which returns the other operand where one is a NaN: a NaN logit would turn finite.
inline Reg neg_abs_at_least(Reg v, float bound) {
  return _mm512_max_ps(set1(bound), _mm512_or_ps(v, set1(-0.0f)));
}
// A lane predicate: a mask register, which the masked operations below take for free.
using Mask = __mmask16;
inline Mask nonnegative(Reg v) { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ); }
// a - b where m, else a.
inline Reg sub_where(Reg a, Mask m, Reg b) { return _mm512_mask_sub_ps(a, m, a, b); }
// acc + a*b where a != 0 (or is NaN), else acc: one rounding, and 0*inf never formed.
inline Reg add_product_where_nonzero(Reg acc, Reg a, Reg b) {
  return _mm512_mask3_fmadd_ps(a, b, acc, _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NEQ_UQ));
}
// a + b where m, else a - b.
inline Reg add_where_else_sub(Mask m, Reg a, Reg b) {
  return _mm512_mask_add_ps(_mm512_sub_ps(a, b), m, a, b);
}
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
// A non-temporal store (past the caches) to a 32-byte aligned p.
inline void store_streaming(float* p, Reg v) { _mm256_stream_ps(p, v); }
// The lanes' bits as unsigned integers, their maximum (as a float register).
inline Reg max_bits(Reg a, Reg b) {
  return _mm256_castsi256_ps(_mm256_max_epu32(_mm256_castps_si256(a), _mm256_castps_si256(b)));
}
// -|v|, at least `bound` (max returns its second operand, -|v|, for NaN).
inline Reg neg_abs_at_least(Reg v, float bound) {
  return _mm256_max_ps(set1(bound), _mm256_or_ps(v, set1(-0.0f)));
}
// A lane predicate: all-ones or zero lanes.
using Mask = __m256;
inline Mask nonnegative(Reg v) { return _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GE_OQ); }
inline Reg sub_where(Reg a, Mask m, Reg b) { return _mm256_sub_ps(a, _mm256_and_ps(m, b)); }
inline Reg add_product_where_nonzero(Reg acc, Reg a, Reg b) {
  const Reg nonzero = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_NEQ_UQ);
  return _mm256_add_ps(acc, _mm256_and_ps(nonzero, _mm256_mul_ps(a, b)));
}
inline Reg add_where_else_sub(Mask m, Reg a, Reg b) {
  return _mm256_blendv_ps(_mm256_sub_ps(a, b), _mm256_add_ps(a, b), m);
}
#endif
}  // namespace simd

namespace fast_exp_impl {
// exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2].
// float(ln 2) is off by 1.9e-9, so r is off by at most 127 * 1.9e-9 = 2.4e-7.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
// Arguments are clamped here: n = round(x / ln 2) is then >= -127, and n = -127
// gives 2^n the bit pattern 0, so exp is 0 below about -87.7 (and 2^n r^2 P(r)
// vanishes from expm1 - x) with no compare and blend. AVX-512's exp scales by 2^n
// with vscalefps, which rounds anything below the smallest float to 0 itself: its
// clamp (kMinArgScaled) only keeps r finite for x = -inf, and exp below -87.3 keeps
// its subnormal values.
constexpr float kMinArg = -88.0f;
constexpr float kMinArgScaled = -110.0f;
constexpr float kMaxArg = 88.72283935546875f;  // ln(FLT_MAX): above it, inf
constexpr float kMaxN = 127.0f;                // largest n with 2^n finite
// Adding 1.5*2^23 rounds to an integer in the low mantissa bits; the +127 there
// is the exponent bias, so (bits << 23) is 2^n as a float without a conversion.
constexpr float kShifter = 12582912.0f + 127.0f;
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kScalef = true;
#else
constexpr bool kScalef = false;
#endif
// The clamp of exp's argument (expm1 - x keeps kMinArg: it needs 2^n as a value).
constexpr float kMinExpArg = kScalef ? kMinArgScaled : kMinArg;

enum class Exp { kExp, kExpm1MinusX };

// exp(x) (kClampedNonPositive: for x already clamped to [kMinExpArg, 0] by the caller,
// which skips the clamp and the overflow handling), or
// expm1(x) - x = 2^n r^2 P(r) + (2^n r + 2^n - 1 - x): for |x| < ln2/2, n = 0 and
// r = x, so it is r^2 P(r) with no cancellation (a KL term of close variances).
// exp(r) = 1 + r + r^2 P(r), P a near-minimax fit of the relative error: degree 3
// for exp (1.0e-7 on the reduced range, <= 4e-7 overall, with the ln 2 rounding), in
// Horner's scheme (one fma per coefficient: the loops that call it are bound by their
// instruction count, not by this chain's latency), and degree 4 for expm1 - x, whose
// relative error is P's own (~5e-7), Estrin-style.
template <Exp kWhat, bool kClampedNonPositive = false>
inline simd::Reg exp_impl(simd::Reg x) {
  using namespace simd;
  constexpr bool kExpm1 = kWhat == Exp::kExpm1MinusX;
  // (max/min return their second operand for NaN, so NaN propagates.)
  const Reg x_low = kClampedNonPositive ? x : max(set1(kExpm1 ? kMinArg : kMinExpArg), x);
  // n from x clamped so that 2^n stays a normal float; r from x itself, so the
  // top of the range, (88.03, 88.72], is reached with r up to 0.7 (relative error up
  // to 6e-6 there, where exp(x) > 1.7e38; below it, under 1e-6).
  const Reg xc = kClampedNonPositive ? x_low : min(set1(kMaxN / kLog2e), x_low);
  const Reg k = fmadd(xc, set1(kLog2e), set1(kShifter));
  const Reg n = sub(k, set1(kShifter));
  const Reg r = fnmadd(n, set1(kLn2), x_low);
  Reg result;
  if constexpr (kExpm1) {
    const Reg pow2n = shift_bits_23(k);
    const Reg r2 = mul(r, r);
    // P(r) = (c0 + c1 r) + r^2 ((c2 + c3 r) + r^2 c4)
    const Reg p01 = fmadd(set1(0.16666577756404877f), r, set1(0.5f));
    const Reg p23 = fmadd(set1(0.008363170549273491f), r, set1(0.04166685417294502f));
    const Reg p24 = fmadd(set1(0.0013901293277740479f), r2, p23);
    const Reg p = fmadd(p24, r2, p01);
    const Reg low = sub(sub(pow2n, set1(1.0f)), x);
    result = fmadd(pow2n, mul(p, r2), fmadd(pow2n, r, low));
  } else {
    // exp(r) = 1 + r (1 + r (c0 + r (c1 + r (c2 + r c3))))
    Reg exp_r = fmadd(set1(0.008312531095900045f), r, set1(0.04189012369979417f));
    exp_r = fmadd(exp_r, r, set1(0.16667114431416602f));
    exp_r = fmadd(exp_r, r, set1(0.4999923169673017f));
    exp_r = fmadd(exp_r, r, set1(1.0f));
    exp_r = fmadd(exp_r, r, set1(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
    result = scale_pow2(exp_r, n);
#else
    result = mul(exp_r, shift_bits_23(k));
#endif
  }
  // Above kMaxArg: +inf. (NaN compares false, and has propagated.)
  if constexpr (!kClampedNonPositive) {
    result = above_to(x, set1(kMaxArg), result, set1(INFINITY));
  }
  return result;
}
}  // namespace fast_exp_impl
#endif

// Outputs of this many bytes and more are written with non-temporal stores, past the
// caches: far larger than the caches, they would not be read from them anyway, and a
// normal store first reads the line it writes (for ownership), as much memory traffic
// again as the write itself. Measured on 2 cores: the 8192 x 784 float elbo step
// 3.3 -> 2.8 ms, the Gaussian one 3.4 -> 2.8, gaussian_kl at 65536 x 512 34 -> 28.
constexpr int64_t kStreamingBytes = int64_t{8} << 20;

inline bool streams(const at::Tensor& out) {
  return out.defined() && static_cast<int64_t>(out.nbytes()) >= kStreamingBytes;
}

// Stores the first n lanes of v as scalar_t; with `stream`, a full float vector at an
// aligned address goes past the caches (the others as store_n: a row's tail, an
// unaligned row, other dtypes). A task that streams ends with end_streaming().
template <typename scalar_t>
inline void store_out(scalar_t* p, const OpVec<scalar_t>& v, int64_t n, bool stream) {
#if defined(VAE_FAST_SIMD_FLOAT)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream && n == OpVec<float>::size() &&
        reinterpret_cast<uintptr_t>(p) % sizeof(simd::Reg) == 0) {
      simd::store_streaming(p, v);
      return;
    }
  }
#endif
  store_n(p, v, n);
}

// Orders a task's non-temporal stores before anything after it (they are weakly ordered).
inline void end_streaming(bool stream) {
#if defined(VAE_FAST_SIMD_FLOAT)
  if (stream) _mm_sfence();
#endif
}

// exp for the kernels: on AVX2/AVX-512 float, the short exp above; else ATen's (Sleef's
// 1-ulp exp for double).
template <typename Vec>
inline Vec fast_exp(const Vec& x) {
#if defined(VAE_FAST_SIMD_FLOAT)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    return fast_exp_impl::exp_impl<fast_exp_impl::Exp::kExp>(x);
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
    return fast_exp_impl::exp_impl<fast_exp_impl::Exp::kExpm1MinusX>(x);
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
  const Vec value = Vec::blendv(x.expm1() - x, series * x * x, x.abs() < Vec(cutoff));
  // +inf, not inf - inf, at x = +inf (as the AVX2/AVX-512 path saturates).
  return Vec::blendv(value, x, x == Vec(std::numeric_limits<T>::infinity()));
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

// Lane predicates and the masked arithmetic of the Bernoulli step, for any Vec (a
// predicate is a vector of all-ones or zero lanes) and, below, for AVX2/AVX-512 float
// (on AVX-512 a predicate is a mask register, and a masked operation costs nothing
// over the plain one).
template <typename Vec>
inline Vec nonnegative(const Vec& v) {
  return v >= Vec(0);
}
template <typename Vec>
inline Vec sub_where(const Vec& a, const Vec& m, const Vec& b) {
  return a - (m & b);
}
template <typename Vec>
inline Vec add_product_where_nonzero(const Vec& acc, const Vec& a, const Vec& b) {
  return acc + ((a != Vec(0)) & (a * b));
}
template <typename Vec>
inline Vec add_where_else_sub(const Vec& m, const Vec& a, const Vec& b) {
  return Vec::blendv(a - b, a + b, m);
}
#if defined(VAE_FAST_SIMD_FLOAT)
inline simd::Mask nonnegative(const Vectorized<float>& v) { return simd::nonnegative(v); }
inline Vectorized<float> sub_where(const Vectorized<float>& a, simd::Mask m,
                                   const Vectorized<float>& b) {
  return simd::sub_where(a, m, b);
}
inline Vectorized<float> add_product_where_nonzero(const Vectorized<float>& acc,
                                                   const Vectorized<float>& a,
                                                   const Vectorized<float>& b) {
  return simd::add_product_where_nonzero(acc, a, b);
}
inline Vectorized<float> add_where_else_sub(simd::Mask m, const Vectorized<float>& a,
                                            const Vectorized<float>& b) {
  return simd::add_where_else_sub(m, a, b);
}
#endif

// e = exp(-|l|) in the first n lanes, 0 in the others. e is in [0, 1]: exp never
// overflows, even at |l| = 1e4. -|l| is l with its sign bit set, clamped to exp's
// range (an or and a max, which keeps a NaN).
template <typename Vec>
inline Vec exp_minus_abs(const Vec& l, int64_t n) {
#if defined(VAE_FAST_SIMD_FLOAT)
  if constexpr (std::is_same_v<Vec, Vectorized<float>>) {
    using namespace fast_exp_impl;
    const simd::Reg arg = simd::neg_abs_at_least(l, kMinExpArg);
    return keep_first(Vec(exp_impl<Exp::kExp, true>(arg)), n);
  }
#endif
  return keep_first((l | Vec(-0.0)).exp(), n);
}

// The row sum of x*l - softplus(l) = c*l - log1p(e), c = x - [l >= 0], e = exp(-|l|),
// in blocks of kBlock vectors whose lanes then go into double totals:
// - c*l is summed apart from log1p(e), so that a tiny loss at large |l| is not lost
//   in l + log1p(e) rounding back to l; where c = 0 it adds nothing (its limit at
//   l = +-inf, where 0*inf would be nan);
// - the log1p(e) terms as the log of a running product: each lane keeps
//   Q = prod(1 + e) - 1, updated as Q <- Q*(1 + e) + e (one fma, given the 1 + e the
//   sigmoid needs anyway), and takes log1p(Q) once per block. prod(1 + e) <= 2^kBlock
//   stays finite in float, and keeping Q = prod - 1 (not the product) keeps tiny e
//   exact in relative terms (a near-perfect decoder's rows).
// The block is short because each update's rounding carries on to the block's end:
// with one |l| along a row they all lean one way, ~kBlock/2 float epsilons on the row
// (1.3-2.5e-6 at 64 vectors, ~5e-7 at 16); a log per 16 vectors costs ~5%.
template <typename Vec>
struct BernoulliRowSum {
  static constexpr int kBlock = 16;
  Vec linear = Vec(0);
  Vec q = Vec(0);
  int count = 0;
  double total[Vec::size()] = {};

  // Lanes to be left out must hold l = e = 0 (they then add exactly 0).
  void add(const Vec& c, const Vec& l, const Vec& e, const Vec& one_plus_e) {
    linear = add_product_where_nonzero(linear, c, l);
    q = at::vec::fmadd(q, one_plus_e, e);
    if (++count == kBlock) flush();
  }

  void flush() {
    typename Vec::value_type lin[Vec::size()], log1p_q[Vec::size()];
    linear.store(lin);
    q.log1p().store(log1p_q);
    for (int i = 0; i < Vec::size(); ++i) {
      total[i] += static_cast<double>(lin[i]) - static_cast<double>(log1p_q[i]);
    }
    linear = Vec(0);
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

// The columns [j, j + n) of a Bernoulli row, given x and the logits l loaded (lanes
// past n hold 0): adds x*l - softplus(l) to `sum` (kSum) and returns
// d/dl = x - sigmoid(l) (kResidual), from c = x - [l >= 0] and t = e/(1+e) as c + t
// for l >= 0 and c - t for l < 0: exactly 0 at saturation, since 1 - t is never
// formed and an approximate 1/(1+e) cannot leak in.
template <bool kSum, bool kResidual, typename Vec>
inline Vec bernoulli_columns(const Vec& x, const Vec& l, int64_t n, BernoulliRowSum<Vec>& sum) {
  const auto l_nonnegative = nonnegative(l);
  const Vec c = sub_where(x, l_nonnegative, Vec(1));
  const Vec e = exp_minus_abs(l, n);
  const Vec one_plus_e = Vec(1) + e;
  if constexpr (kSum) sum.add(c, l, e, one_plus_e);
  if constexpr (kResidual) {
    return add_where_else_sub(l_nonnegative, c, e * reciprocal_1_2(one_plus_e));
  } else {
    return Vec(0);
  }
}

// Whether one of n targets lies outside [0, 1] (NaN does not).
template <typename scalar_t>
bool outside_unit_interval(const scalar_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const auto v = static_cast<opmath_t<scalar_t>>(x[i]);
    if (v < 0 || v > 1) return true;
  }
  return false;
}

// The range of the Bernoulli targets seen, so that one outside [0, 1] is found in the
// pass that reads x anyway (no second pass over a valid x). AVX2/AVX-512 float: one
// integer max per vector of the targets' bits, which exceed those of 1.0f exactly for
// a target outside [+0, 1], a -0.0 or a NaN; only then are the rows rescanned exactly.
// Elsewhere: the min and max, one instruction each.
template <typename Vec>
struct TargetRange {
#if defined(VAE_FAST_SIMD_FLOAT)
  static constexpr bool kBits = std::is_same_v<Vec, Vectorized<float>>;
#else
  static constexpr bool kBits = false;
#endif
  Vec lo = Vec(std::numeric_limits<float>::infinity());
  Vec hi = Vec(kBits ? 0.0f : -std::numeric_limits<float>::infinity());

  void add(const Vec& x) {
#if defined(VAE_FAST_SIMD_FLOAT)
    if constexpr (kBits) {
      hi = simd::max_bits(hi, x);
      return;
    }
#endif
    // (minimum/maximum propagate a NaN x: the range is then NaN, and rescanned.)
    lo = at::vec::minimum(lo, x);
    hi = at::vec::maximum(hi, x);
  }

  // Whether a target of rows [begin, end), all of which this range has seen, lies
  // outside [0, 1]; row(r) points at row r's `cols` targets.
  template <typename RowOf>
  bool rows_outside_unit_interval(int64_t begin, int64_t end, int64_t cols,
                                 const RowOf& row) const {
    if (!maybe_outside()) return false;
    for (int64_t r = begin; r < end; ++r) {
      if (outside_unit_interval(row(r), cols)) return true;
    }
    return false;
  }

 private:
  // False when every target seen is in [0, 1]; true when one may be outside it.
  bool maybe_outside() const {
    using T = typename Vec::value_type;
    T l[Vec::size()], h[Vec::size()];
    lo.store(l);
    hi.store(h);
    for (int i = 0; i < Vec::size(); ++i) {
      if constexpr (kBits) {
        uint32_t bits;
        std::memcpy(&bits, &h[i], sizeof(bits));
        if (bits > 0x3F800000u) return true;  // above 1.0f's bits
      } else if (!(l[i] >= T(0) && h[i] <= T(1))) {  // NaN too
        return true;
      }
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
