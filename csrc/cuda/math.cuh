#pragma once
// The device maths every CUDA kernel shares: the stable formulas in float/double,
// 128-bit vector loads and stores that convert to the accumulation type, operands
// that broadcast (scalar, per-feature, per-element), warp/block reductions and the
// device queries the launches size their grids with. The row driver built on it is
// cuda/rows.cuh; the per-op terms are cuda/row_ops.cuh.
//
// Only light CUDA headers are included on purpose: ATen/cuda/CUDAContext.h pulls in
// cuBLAS/cuSPARSE headers, which a minimal CUDA toolkit (and the compile check in
// tests/test_build.py) may not have, and none of it is needed here.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "common/layout.h"
#include "cuda/row_plan.h"

namespace vae_fast::cuda {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// ---------------------------------------------------------------------------- math
// float and double overloads spelled out, so that float code never silently runs in
// double. CMake compiles CUDA with --use_fast_math, which means: expf, logf, sinf,
// ... become their approximate intrinsics (expf: ex2.approx of v*log2(e), a few ulp
// relative, plus |v|*6e-8 from rounding that product), float division and 1/x become
// div/rcp.approx (2 ulp), denormal floats flush to zero, and nothing is reassociated.
// It leaves the long libdevice routines (log1pf, expm1f) untouched: in the issue-bound
// 16-bit loops those dominated, so the float paths below replace them with the CPU's
// short forms (csrc/cpu/vec_math.h), within float32's rounding of a row sum (~1e-6).
// double keeps the accurate routines.

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return ::exp(v); }
__device__ __forceinline__ float abs_(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_(double v) { return ::fabs(v); }

// log1p(e) for e in [0, 1] (e = exp(-|l|)), keeping its relative precision for tiny
// e. float: e * P(e), P a degree-8 Chebyshev fit of log1p(e)/e on [0, 1] (max
// relative error 2.3e-7), in Estrin's scheme: 9 fma instead of log1pf.
__device__ __forceinline__ float log1p_unit_(float e) {
  const float e2 = e * e;
  const float e4 = e2 * e2;
  const float p01 = fmaf(-0.4999944567680359f, e, 0.9999999403953552f);
  const float p23 = fmaf(-0.2483539879322052f, e, 0.3331812024116516f);
  const float p45 = fmaf(-0.13602247834205627f, e, 0.19076880812644958f);
  const float p67 = fmaf(-0.029074065387248993f, e, 0.0775160863995552f);
  const float p03 = fmaf(p23, e2, p01);
  const float p48 = fmaf(0.005126102361828089f, e4, fmaf(p67, e2, p45));
  return fmaf(p48, e4, p03) * e;
}
__device__ __forceinline__ double log1p_unit_(double e) { return ::log1p(e); }

// expm1(v) - v, the KL's variance term, without the cancellation of subtracting v
// from expm1(v) near 0 (close variances, where the term is v^2/2).
//
// float, the CPU's AVX2 form in one piece with no branch: v = n ln2 + r, |r| <= ln2/2,
// exp(r) = 1 + r + r^2 P(r) (P degree 4), expm1(v) - v = 2^n r^2 P(r) + (2^n r + 2^n - 1
// - v); for |v| < ln2/2, n = 0 and r = v, so it is r^2 P(r), exact in relative terms
// (~5e-7 overall). 2^n is built from the bits of the rounding shifter; v is clamped to
// -88 (2^n then 0: the result is -1 - v) and the result is inf above ln(FLT_MAX).
// NaN fails every compare and propagates.
__device__ __forceinline__ float expm1_minus_x_(float v) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2 = 0.693147180559945309f;
  constexpr float kShifter = 12582912.0f + 127.0f;  // 1.5*2^23 rounds; +127 is the exponent bias
  const float low = v < -88.0f ? -88.0f : v;
  const float clamped = low > 127.0f / kLog2e ? 127.0f / kLog2e : low;
  const float k = fmaf(clamped, kLog2e, kShifter);
  const float n = k - kShifter;
  const float r = fmaf(-n, kLn2, low);
  const float pow2n = __int_as_float(__float_as_int(k) << 23);
  const float r2 = r * r;
  const float p01 = fmaf(0.16666577756404877f, r, 0.5f);
  const float p23 = fmaf(0.008363170549273491f, r, 0.04166685417294502f);
  const float p = fmaf(fmaf(0.0013901293277740479f, r2, p23), r2, p01);
  const float result = fmaf(pow2n, p * r2, fmaf(pow2n, r, (pow2n - 1.0f) - v));
  return v > 88.72283935546875f ? __int_as_float(0x7f800000) : result;
}

// double: expm1(v) - v, but for |v| < 0.01 the Taylor series sum_{k>=2} v^k/k! to v^7
// (below 1 ulp).
__device__ __forceinline__ double expm1_minus_x_(double v) {
  constexpr int kLastPower = 7;
  if (isinf(v) && v > 0) return v;  // inf, not inf - inf (as the float version)
  if (::fabs(v) >= 0.01) return ::expm1(v) - v;
  double inverse_factorial = 1;
#pragma unroll
  for (int k = 2; k <= kLastPower; ++k) inverse_factorial /= k;
  double series = inverse_factorial;
#pragma unroll
  for (int k = kLastPower; k > 2; --k) {
    inverse_factorial *= k;
    series = series * v + inverse_factorial;
  }
  return series * v * v;
}

// For logits l and targets x: x*l - softplus(l) and x - sigmoid(l), from one exp whose
// argument is never positive (finite and exact at l = +-1e4), e = exp(-|l|), and
// t = e/(1+e) = sigmoid(-|l|).
// - The log-probability is (x - [l >= 0])*l - log1p(e): the linear part is formed
//   before the log term is subtracted (a tiny loss at large |l| is kept), and it is 0,
//   the limit, where x - [l >= 0] = 0 at l = +-inf (0*inf would be nan).
// - The gradient x - sigmoid(l) is (x - 1) + t for l >= 0 and x - t for l < 0, as on
//   the CPU (csrc/cpu/bernoulli_kernel.cpp): 1 - t is never formed, so there is no
//   cancellation, an approximate 1/(1+e) cannot leak in, and it is exactly 0 at
//   saturation (x = 1, l = +inf).
template <typename T>
struct BernoulliTerms {
  T log_prob, residual;
};

template <typename T>
__device__ __forceinline__ BernoulliTerms<T> bernoulli_terms(T x, T l) {
  const T e = exp_(-abs_(l));
  const T t = e / (T(1) + e);
  const bool positive = l >= T(0);
  const T coef = positive ? x - T(1) : x;
  const T linear = (coef == T(0) && isinf(l)) ? T(0) : coef * l;
  return {linear - log1p_unit_(e), positive ? coef + t : coef - t};
}

// ---------------------------------------------------------------------------- vector IO
// V consecutive elements as one aligned load/store (16 bytes when V*sizeof(T) == 16),
// converted to and from the accumulation type.

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load_vec(const T* p, acc_t<T> (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<acc_t<T>>(pack.v[i]);
}

// The stores go out as one access of the pack's width. Storing the Pack itself does
// not: its elements are converted one by one into a local struct, and nvcc copies
// that out as one 4-byte (or 2-byte) store per element. So the bits are moved into a
// vector type first. st.global.cg (cached in L2 only): the outputs are read by later
// kernels, not by this one.
template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const acc_t<T> (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = static_cast<T>(in[i]);
  if constexpr (sizeof(pack) == 16) {
    uint4 bits;
    memcpy(&bits, &pack, sizeof(bits));
    __stcg(reinterpret_cast<uint4*>(p), bits);
  } else if constexpr (sizeof(pack) == 8) {
    uint2 bits;
    memcpy(&bits, &pack, sizeof(bits));
    __stcg(reinterpret_cast<uint2*>(p), bits);
  } else if constexpr (sizeof(pack) == 4) {
    unsigned int bits;
    memcpy(&bits, &pack, sizeof(bits));
    __stcg(reinterpret_cast<unsigned int*>(p), bits);
  } else {
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
  }
}

// The widest vector (in elements) for 16-byte accesses of T.
template <typename T>
constexpr int max_vec() {
  return 16 / sizeof(T) > 0 ? static_cast<int>(16 / sizeof(T)) : 1;
}

// True when every non-null pointer is aligned to `bytes`.
inline bool all_aligned(std::initializer_list<const void*> ptrs, int64_t bytes) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % bytes != 0) return false;
  }
  return true;
}

// How a task over rows x cols matrices at `ptrs` (null: absent) can be read with
// 16-byte vectors of scalar_t: when every pointer lies the same number of elements
// past a 16-byte boundary, each row's unaligned head and tail are peeled off and the
// rest is read in vectors (so an odd column count, or inputs that all start off
// alignment, cost only the edges). With per-column sums every row must start aligned.
// Otherwise (pointers misaligned differently) element by element.
template <typename scalar_t>
VectorMode vector_mode(int64_t cols, std::initializer_list<const void*> ptrs, bool per_column) {
  constexpr int kVec = max_vec<scalar_t>();
  constexpr uintptr_t kBytes = sizeof(scalar_t) * kVec;
  int misalign = -1;
  for (const void* p : ptrs) {
    if (p == nullptr) continue;
    const auto address = reinterpret_cast<uintptr_t>(p);
    const int m = static_cast<int>(address % kBytes / sizeof(scalar_t));
    if (address % sizeof(scalar_t) != 0 || (misalign >= 0 && m != misalign)) return {1, 0};
    misalign = m;
  }
  misalign = misalign < 0 ? 0 : misalign;
  if (per_column && (misalign != 0 || cols % kVec != 0)) return {1, 0};
  return {kVec, misalign};
}

// ---------------------------------------------------------------------------- operands
// A tensor that broadcasts to the (rows, cols) input, as the kernels read it (see
// common/layout.h): kScalar reads element 0, kFeature element `col`, kElement
// element `row * cols + col`. A null pointer means "absent" and reads as 0.

template <typename T>
struct Operand {
  const T* ptr = nullptr;
  Broadcast kind = Broadcast::kElement;
};

// An operand from its kind and data (common/kernels.h); undefined data is absent.
template <typename T>
Operand<T> make_operand(Broadcast kind, const at::Tensor& data) {
  return data.defined() ? Operand<T>{data.const_data_ptr<T>(), kind} : Operand<T>();
}

// A kElement operand is a rows x cols matrix like the task's others (its pointer is
// one of the task's matrix_ptr). A kFeature one is indexed by column alone, so a row's
// vector of columns may not be aligned in it: checked per access (a small vector that
// stays in cache, read element by element when off alignment).
template <int V, typename T>
__device__ __forceinline__ void load_operand(const Operand<T>& op, int64_t off, int64_t col,
                                             acc_t<T> (&out)[V]) {
  if (op.ptr == nullptr) {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = acc_t<T>(0);
  } else if (op.kind == Broadcast::kScalar) {
    const acc_t<T> v = static_cast<acc_t<T>>(op.ptr[0]);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = v;
  } else if (op.kind == Broadcast::kFeature) {
    const T* p = op.ptr + col;
    if (V == 1 || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) == 0) {
      load_vec<V>(p, out);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) out[i] = static_cast<acc_t<T>>(p[i]);
    }
  } else {
    load_vec<V>(op.ptr + off, out);
  }
}

// The pointer of an operand that the task reads as a rows x cols matrix (kElement),
// whose alignment must match the task's other matrices; null for the others.
template <typename T>
const void* matrix_ptr(const Operand<T>& op) {
  return op.kind == Broadcast::kElement ? op.ptr : nullptr;
}

// Whether a gradient of this operand is reduced over rows (kScalar, kFeature) rather
// than written per element.
inline bool reduced_over_rows(Broadcast kind) { return kind != Broadcast::kElement; }

// ---------------------------------------------------------------------------- device info

inline int sm_count() {
  static std::array<std::atomic<int>, 64> cache{};
  const int device = c10::cuda::current_device();
  if (device >= static_cast<int>(cache.size())) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Resident blocks of `kernel` per SM (256 threads, no dynamic shared memory). The
// cache is per call site: instantiate through a distinct template per kernel.
template <typename Kernel>
int occupancy(Kernel kernel, std::array<std::atomic<int>, 64>& cache) {
  const int device = c10::cuda::current_device();
  int n = device < static_cast<int>(cache.size()) ? cache[device].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kBlockThreads, 0));
    n = n > 0 ? n : 1;
    if (device < static_cast<int>(cache.size())) cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// ---------------------------------------------------------------------------- reductions

template <typename T>
__device__ __forceinline__ T warp_sum(T v, int width = kWarp) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    if (off < width) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

// Sum over a whole block (any size up to 1024 threads, a multiple of 32), in a fixed
// order, so the result is deterministic. Every thread gets the total.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[kWarp];
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int nwarps = (blockDim.x * blockDim.y) / kWarp;
  v = warp_sum(v);
  if (tid % kWarp == 0) partial[tid / kWarp] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < nwarps; ++w) total += partial[w];
  __syncthreads();  // `partial` may be reused right after
  return total;
}

}  // namespace vae_fast::cuda
