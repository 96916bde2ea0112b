// The CUDA kernels of vae_fast::reparameterize and its backward
// (reparameterize_stub, reparameterize_backward_stub; the glue is
// csrc/reparameterize.cpp).
//
// eps comes from torch's CUDA Philox generator (the device's default generator, or
// `generator`), drawn the way torch's own dropout and normal_ kernels draw:
// philox_cuda_state(increment) under the generator's mutex on the host,
// at::cuda::philox::unpack in the kernel, then curand_init(seed, subsequence,
// offset) and curand_normal4. So torch.manual_seed, torch.cuda.manual_seed and
// `generator=` reproduce a draw, and under CUDA-graph capture the seed and offset
// are read from device memory at replay (see Note [CUDA Graph-safe RNG states] in
// ATen/cuda/CUDAGeneratorImpl.h), so a captured graph draws fresh eps every replay.
//
// The subsequence is the index of each group of 4 elements, not the thread's index,
// so a draw depends only on the seed, the offset and the shape: not on the grid, the
// block size or the GPU's number of SMs.
//
// eps is returned (and saved for backward by vae_fast/ops.py) rather than
// regenerated from the seed and offset in backward. That keeps one schema across
// devices (the CPU kernel keys its own Philox stream with a 64-bit draw from the
// CPU generator, which has no offset to replay: csrc/cpu/launch.cpp), and eps is
// the size of z (B x Z, small next to the decoder's B x D), so the saved bytes and
// the extra write cost little.

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <curand_kernel.h>

#include <mutex>
#include <type_traits>

#include "common/kernels.h"
#include "cuda/math.cuh"

namespace vae_fast::cuda {
namespace {

// 32-bit Philox outputs each group of 4 elements consumes from its subsequence:
// one curand4 for four floats (curand_normal4), two for four doubles
// (curand_normal2_double twice). The generator's offset advances by this much per
// call, a multiple of 4 as philox_cuda_state requires.
constexpr uint64_t kPhiloxIncrement = 8;

template <typename acc>
__device__ __forceinline__ void normal4(curandStatePhilox4_32_10_t* state, acc (&out)[4]) {
  if constexpr (std::is_same_v<acc, double>) {
    const double2 a = curand_normal2_double(state);
    const double2 b = curand_normal2_double(state);
    out[0] = a.x;
    out[1] = a.y;
    out[2] = b.x;
    out[3] = b.y;
  } else {
    const float4 r = curand_normal4(state);
    out[0] = r.x;
    out[1] = r.y;
    out[2] = r.z;
    out[3] = r.w;
  }
}

// z[i] = mu[i % period] + exp(logvar[i % period] / 2) * eps[i] for i < n (n = samples
// * period). kVec: period % 4 == 0 and every pointer aligned for 4-element accesses.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kBlockThreads)
    reparameterize_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
                          scalar_t* __restrict__ z, acc_t<scalar_t>* __restrict__ eps, int64_t n,
                          int64_t period, at::PhiloxCudaState philox) {
  using acc = acc_t<scalar_t>;
  const auto seeds = at::cuda::philox::unpack(philox);
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    curandStatePhilox4_32_10_t state;
    curand_init(std::get<0>(seeds), static_cast<unsigned long long>(g), std::get<1>(seeds), &state);
    acc e[4];
    normal4(&state, e);
    const int64_t first = g * 4;
    if (kVec && first + 4 <= n) {
      const int64_t s = first % period;
      acc m[4], lv[4], out[4];
      load_vec<4>(mu + s, m);
      load_vec<4>(logvar + s, lv);
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] = m[j] + exp_(acc(0.5) * lv[j]) * e[j];
      store_vec<4>(z + first, out);
      store_vec<4>(eps + first, e);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t i = first + j;
        if (i < n) {
          const int64_t s = i % period;
          const acc m = static_cast<acc>(mu[s]), lv = static_cast<acc>(logvar[s]);
          z[i] = static_cast<scalar_t>(m + exp_(acc(0.5) * lv) * e[j]);
          eps[i] = e[j];
        }
      }
    }
  }
}

// grad_mu[s] = sum_k grad_z[k, s]; grad_logvar[s] = 0.5 * exp(logvar[s] / 2) *
// sum_k grad_z[k, s] * eps[k, s]; V = 4 elements per thread when aligned, else 1.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kBlockThreads)
    reparameterize_backward_kernel(const scalar_t* __restrict__ grad_z, const scalar_t* __restrict__ logvar,
                                   const acc_t<scalar_t>* __restrict__ eps, scalar_t* __restrict__ grad_mu,
                                   scalar_t* __restrict__ grad_logvar, int64_t n, int64_t samples) {
  using acc = acc_t<scalar_t>;
  const int64_t groups = n / V;  // the host ensures n % V == 0
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = g * V;
    acc sum_g[V], sum_ge[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sum_g[j] = sum_ge[j] = acc(0);
    for (int64_t k = 0; k < samples; ++k) {
      acc gz[V], e[V];
      load_vec<V>(grad_z + k * n + s, gz);
      load_vec<V>(eps + k * n + s, e);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sum_g[j] += gz[j];
        sum_ge[j] += gz[j] * e[j];
      }
    }
    if (grad_mu != nullptr) store_vec<V>(grad_mu + s, sum_g);
    if (grad_logvar != nullptr) {
      acc lv[V], out[V];
      load_vec<V>(logvar + s, lv);
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = acc(0.5) * exp_(acc(0.5) * lv[j]) * sum_ge[j];
      store_vec<V>(grad_logvar + s, out);
    }
  }
}

// Enough blocks for every element group, capped at 8 resident 256-thread blocks per
// SM (the kernels loop with a grid stride).
unsigned grid_for(int64_t groups) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * (2048 / kBlockThreads);
  return static_cast<unsigned>(std::max<int64_t>(std::min(ceil_div(groups, kBlockThreads), cap), 1));
}

void reparameterize(const ReparameterizeArgs& args) {
  const int64_t n = args.z.numel(), period = args.mu.numel();
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      args.generator, at::cuda::detail::getDefaultCUDAGenerator(args.mu.device().index()));
  at::PhiloxCudaState philox;
  {
    // See Note [Acquire lock when using random generators]. The offset advances on
    // every call, an empty one too, as the CPU kernel draws its key on every call
    // (csrc/cpu/launch.cpp): the generator's state after a sequence of calls then
    // does not depend on whether some of them were empty, on either device.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kPhiloxIncrement);
  }
  if (n == 0) return;

  const unsigned blocks = grid_for(ceil_div(n, 4));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.mu.scalar_type(), "vae_fast::reparameterize", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* m = args.mu.const_data_ptr<scalar_t>();
    const scalar_t* lv = args.logvar.const_data_ptr<scalar_t>();
    scalar_t* zp = args.z.mutable_data_ptr<scalar_t>();
    acc* ep = args.eps.mutable_data_ptr<acc>();
    const bool vec = period % 4 == 0 && all_aligned({m, lv, zp}, 4 * sizeof(scalar_t)) &&
                     all_aligned({ep}, 4 * sizeof(acc));
    if (vec) {
      reparameterize_kernel<scalar_t, true><<<blocks, kBlockThreads, 0, stream>>>(m, lv, zp, ep, n, period, philox);
    } else {
      reparameterize_kernel<scalar_t, false><<<blocks, kBlockThreads, 0, stream>>>(m, lv, zp, ep, n, period, philox);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void reparameterize_backward(const ReparameterizeBackwardArgs& args) {
  const int64_t n = args.logvar.numel(), samples = args.grad_z.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, args.logvar.scalar_type(), "vae_fast::_reparameterize_backward", [&] {
        using acc = acc_t<scalar_t>;
        const scalar_t* gzp = args.grad_z.const_data_ptr<scalar_t>();
        const scalar_t* lvp = args.logvar.const_data_ptr<scalar_t>();
        const acc* epp = args.eps.const_data_ptr<acc>();
        scalar_t* gmp = args.grad_mu.defined() ? args.grad_mu.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* glp = args.grad_logvar.defined() ? args.grad_logvar.mutable_data_ptr<scalar_t>() : nullptr;
        const bool vec = n % 4 == 0 && all_aligned({gzp, lvp, gmp, glp}, 4 * sizeof(scalar_t)) &&
                         all_aligned({epp}, 4 * sizeof(acc));
        if (vec) {
          reparameterize_backward_kernel<scalar_t, 4>
              <<<grid_for(n / 4), kBlockThreads, 0, stream>>>(gzp, lvp, epp, gmp, glp, n, samples);
        } else {
          reparameterize_backward_kernel<scalar_t, 1>
              <<<grid_for(n), kBlockThreads, 0, stream>>>(gzp, lvp, epp, gmp, glp, n, samples);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace
}  // namespace vae_fast::cuda

VAE_FAST_REGISTER_KERNEL(reparameterize_stub, CUDA, &vae_fast::cuda::reparameterize);
VAE_FAST_REGISTER_KERNEL(reparameterize_backward_stub, CUDA, &vae_fast::cuda::reparameterize_backward);
