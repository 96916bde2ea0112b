#pragma once
// What the CUDA kernels share: the stable formulas in float/double, 128-bit vector
// loads and stores that convert to the accumulation type, operands that broadcast
// (scalar, per-feature, per-element), warp/block reductions and launch helpers.
//
// Only light CUDA headers are included on purpose: ATen/cuda/CUDAContext.h pulls in
// cuBLAS/cuSPARSE headers, which a minimal CUDA toolkit (and the compile check in
// tests/test_build.py) may not have, and none of it is needed here.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>

#include "common/layout.h"
#include "cuda/row_plan.h"

namespace vae_fast::cuda {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// ---------------------------------------------------------------------------- math
// float and double overloads spelled out, so that float code never silently runs in
// double. Under --use_fast_math expf becomes the ex2.approx intrinsic (a few ulp);
// expm1f and log1pf are not touched by fast math and keep full accuracy, which is
// what the KL (expm1(d) - d) and softplus (log1p(exp(-|l|))) rely on.

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return ::exp(v); }
__device__ __forceinline__ float expm1_(float v) { return expm1f(v); }
__device__ __forceinline__ double expm1_(double v) { return ::expm1(v); }
__device__ __forceinline__ float log1p_(float v) { return log1pf(v); }
__device__ __forceinline__ double log1p_(double v) { return ::log1p(v); }
__device__ __forceinline__ float abs_(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_(double v) { return ::fabs(v); }

// expm1(v) - v (the KL's variance term) without the cancellation of subtracting v
// from expm1(v) near 0: there the Taylor series sum_{k>=2} v^k/k! (float: |v| < 0.5
// to v^9; double: |v| < 0.01 to v^7; both below 1 ulp).
template <typename T>
__device__ __forceinline__ T expm1_minus_x_(T v) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  constexpr int kLastPower = kFloat ? 9 : 7;
  if (abs_(v) >= (kFloat ? T(0.5) : T(0.01))) return expm1_(v) - v;
  T inverse_factorial = 1;
#pragma unroll
  for (int k = 2; k <= kLastPower; ++k) inverse_factorial /= T(k);
  T series = inverse_factorial;
#pragma unroll
  for (int k = kLastPower; k > 2; --k) {
    inverse_factorial *= T(k);
    series = series * v + inverse_factorial;
  }
  return series * v * v;
}

// For logits l and targets x: x*l - softplus(l) and sigmoid(l), from one exp whose
// argument is never positive (finite and exact at l = +-1e4). The log-probability is
// (x - [l >= 0])*l - log1p(exp(-|l|)): the linear part is formed before the log term
// is subtracted (a tiny loss at large |l| is kept), and it is 0, the limit, where
// x - [l >= 0] = 0 at l = +-inf (0*inf would be nan).
template <typename T>
struct BernoulliTerms {
  T log_prob, sigmoid;
};

template <typename T>
__device__ __forceinline__ BernoulliTerms<T> bernoulli_terms(T x, T l) {
  const T e = exp_(-abs_(l));
  const T inv = T(1) / (T(1) + e);
  const T coef = l >= T(0) ? x - T(1) : x;
  const T linear = (coef == T(0) && isinf(l)) ? T(0) : coef * l;
  return {linear - log1p_(e), l >= T(0) ? inv : e * inv};
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

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const acc_t<T> (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
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

// ---------------------------------------------------------------------------- operands
// A tensor that broadcasts to the (rows, cols) input, as the kernels read it (see
// common/layout.h): kScalar reads element 0, kFeature element `col`, kElement
// element `row * cols + col`. A null pointer means "absent" and reads as 0.

template <typename T>
struct Operand {
  const T* ptr = nullptr;
  Broadcast kind = Broadcast::kElement;
};

template <typename T>
Operand<T> make_operand(const BroadcastOperand& op) {
  return {op.data.const_data_ptr<T>(), op.kind};
}

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
  } else {
    load_vec<V>(op.ptr + (op.kind == Broadcast::kFeature ? col : off), out);
  }
}

// Whether a gradient of this operand is reduced over rows (kScalar, kFeature) rather
// than written per element.
inline bool reduced_over_rows(const BroadcastOperand& op) { return op.kind != Broadcast::kElement; }

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
