// Standard normal draws for reparameterize's eps: a Philox4x32-10 stream keyed by
// one 64-bit draw from torch's CPU generator, turned into normals by Box-Muller.
// Compiled once per CPU capability.
//
// The stream, in blocks of 8 Philox counters: block b uses counters 8b + l
// (l = 0..7), each giving words w0..w3, and fills
//   float:  out[32b + 8m + l], m = 0..3: (w0, w1) give normals m = 0, 1 (the cos
//           and sin of one Box-Muller pair) and (w2, w3) normals m = 2, 3, each
//           from a 24-bit uniform;
//   double: out[16b + 8m + l], m = 0, 1: one pair from 53-bit uniforms (w0:w1, w2:w3).
// An element depends only on the key and its index: the draw is the same for any
// thread count and any grain, and the layout lets 8 lanes run Philox side by side.
// (Float normals from the AVX2 kernel, which uses SLEEF's 3.5-ulp log and sincos,
// and the portable one differ in the last bits, as their log/sin/cos do.)

#include <ATen/Dispatch.h>

#include <cmath>

#if defined(CPU_CAPABILITY_AVX2)
#include <sleef.h>  // torch's bundled SLEEF (ATen's vectorized math)
#endif

#include "cpu/kernels.h"
#include "cpu/philox.h"
#include "cpu/vec_math.h"

namespace vae_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kLanes = 8;  // Philox counters per block
constexpr double kTwoPi = 6.283185307179586476925286766559;

// One float block: up to 32 normals (n of them stored) from counters first..first+7.
void float_block(uint64_t first, uint64_t key, float* out, int64_t n) {
  using Vec = Vectorized<float>;
  static_assert(Vec::size() == kLanes, "one lane per Philox counter");
  Vec bits[4];  // w >> 8 of each word, exactly, as floats in [0, 2^24)
#if defined(CPU_CAPABILITY_AVX2)
  __m256i words[4];
  philox4x32_x8(first, key, words);
  for (int m = 0; m < 4; ++m) bits[m] = _mm256_cvtepi32_ps(_mm256_srli_epi32(words[m], 8));
#else
  alignas(32) float lanes[4][kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const auto w = philox4x32(first + l, key);
    for (int m = 0; m < 4; ++m) lanes[m][l] = static_cast<float>(w[m] >> 8);
  }
  for (int m = 0; m < 4; ++m) bits[m] = Vec::loadu(lanes[m]);
#endif
  Vec normals[4];
  for (int pair = 0; pair < 2; ++pair) {
    // u in (0, 1], never 0, so the radius is finite (at most sqrt(-2 log 2^-24) = 5.8).
    const Vec u = (bits[2 * pair] + Vec(1.0f)) * Vec(0x1p-24f);
    const Vec angle = bits[2 * pair + 1] * Vec(static_cast<float>(kTwoPi * 0x1p-24));
#if defined(CPU_CAPABILITY_AVX2)
    // One range reduction for both sin and cos, at 3.5 ulp: ample for a sample.
    const Vec radius = (Vec(-2.0f) * Vec(Sleef_logf8_u35avx2(u))).sqrt();
    const Sleef___m256_2 sin_cos = Sleef_sincosf8_u35avx2(angle);
    normals[2 * pair] = radius * Vec(sin_cos.y);
    normals[2 * pair + 1] = radius * Vec(sin_cos.x);
#else
    const Vec radius = (Vec(-2.0f) * u.log()).sqrt();
    normals[2 * pair] = radius * angle.cos();
    normals[2 * pair + 1] = radius * angle.sin();
#endif
  }
  for (int m = 0; m < 4; ++m) {
    const int64_t count = std::min<int64_t>(kLanes, n - m * kLanes);
    if (count <= 0) break;
    store_n(out + m * kLanes, normals[m], count);
  }
}

// One double block: up to 16 normals (n of them stored) from counters first..first+7.
void double_block(uint64_t first, uint64_t key, double* out, int64_t n) {
  for (int64_t l = 0; l < kLanes; ++l) {
    const auto w = philox4x32(first + l, key);
    const uint64_t u_bits = ((static_cast<uint64_t>(w[0]) << 32) | w[1]) >> 11;
    const uint64_t t_bits = ((static_cast<uint64_t>(w[2]) << 32) | w[3]) >> 11;
    const double u = (static_cast<double>(u_bits) + 1.0) * 0x1p-53;  // (0, 1]
    const double angle = static_cast<double>(t_bits) * (kTwoPi * 0x1p-53);
    const double radius = std::sqrt(-2.0 * std::log(u));
    if (l < n) out[l] = radius * std::cos(angle);
    if (kLanes + l < n) out[kLanes + l] = radius * std::sin(angle);
  }
}

template <typename scalar_t>
void fill_normal(const NormalArgs& a) {
  constexpr int64_t per_block = std::is_same_v<scalar_t, double> ? 2 * kLanes : 4 * kLanes;
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  const int64_t n = a.out.numel();
  const int64_t blocks = (n + per_block - 1) / per_block;
  at::parallel_for(0, blocks, kElementsPerTask / per_block, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * per_block;
      const uint64_t first = static_cast<uint64_t>(b) * kLanes;
      if constexpr (std::is_same_v<scalar_t, double>) {
        double_block(first, a.key, out + start, std::min(per_block, n - start));
      } else {
        float_block(first, a.key, out + start, std::min(per_block, n - start));
      }
    }
  });
}

}  // namespace

void normal_kernel(const NormalArgs& args) {
  TORCH_CHECK(args.out.is_contiguous(), "vae_fast: normal_kernel needs a contiguous output");
  AT_DISPATCH_FLOATING_TYPES(args.out.scalar_type(), "vae_fast::normal",
                             [&] { fill_normal<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast::cpu
