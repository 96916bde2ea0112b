// The CUDA kernel of vae_fast::iwae (iwae_stub; the glue is csrc/iwae.cpp). One
// thread block per data row b handles its K samples:
//
// 1. for each k, the block reads (x[b], recon[k, b]) once: each thread adds its
//    columns' log-likelihood terms and writes the unweighted residual d log p/d recon
//    into grad_recon; the latent terms log N(z; 0, I) - log N(z; mu, e^logvar) join
//    the same block sum, in float64, into log w_k (a (K, B) float64 scratch);
// 2. max, sum of exp and the bound over the K log weights (block reductions, float64),
//    then each log weight's slot of the scratch is overwritten by d(loss)/d(log w_k)
//    = scale * w~_k;
// 3. each thread scales its columns of the K residual rows (j outer, k inner: every
//    step of k is a coalesced row segment, re-read from L2), and writes the latent
//    gradients (z always; mu and logvar's score terms for estimator "iwae").
//
// An obs_logvar gradient that is shared over rows (scalar, per feature, per data
// element) is written per (b, column), summed over the samples, into a (B, cols)
// buffer that at::sum reduces in a fixed order (deterministic); a per-sample one is
// written per element. x, mu and logvar are never repeated in memory.
//
// Only light CUDA headers, as csrc/cuda/math.cuh explains.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "common/kernels.h"

namespace vae_fast::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr double kLog2PiD = 1.8378770664093454835606594728112;

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return ::exp(v); }
__device__ __forceinline__ float log1p_(float v) { return log1pf(v); }
__device__ __forceinline__ double log1p_(double v) { return ::log1p(v); }
__device__ __forceinline__ float abs_(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_(double v) { return ::fabs(v); }

// Block-wide sum / max of one double per thread, returned to every thread. The
// leading __syncthreads lets consecutive calls reuse `shared`.
template <bool kMax>
__device__ double block_reduce(double v, double* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double other = __shfl_down_sync(0xffffffffu, v, offset);
    v = kMax ? fmax(v, other) : v + other;
  }
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : (kMax ? -INFINITY : 0.0);
    for (int offset = 16; offset > 0; offset >>= 1) {
      const double other = __shfl_down_sync(0xffffffffu, v, offset);
      v = kMax ? fmax(v, other) : v + other;
    }
    if (lane == 0) shared[kWarps] = v;
  }
  __syncthreads();
  return shared[kWarps];
}

template <typename scalar_t>
struct IWAEParams {
  using acc = at::opmath_type<scalar_t>;
  const scalar_t* x;       // (B, cols)
  const scalar_t* recon;   // (K*B, cols)
  const scalar_t* z;       // (K*B, latent)
  const scalar_t* mu;      // (B, latent)
  const scalar_t* logvar;  // (B, latent)
  const scalar_t* obs;     // by obs_kind (null: kNone)
  IWAEObs obs_kind;
  int64_t samples, batch, cols, latent;
  double scale, log_k;
  double* scratch;         // (K, B): log w, then d(loss)/d(log w)
  acc* log_weights;        // out (K, B)
  double* bound;           // out (B)
  scalar_t* grad_recon;    // (K*B, cols) or null (no gradients)
  scalar_t* grad_z;        // (K*B, latent)
  scalar_t* grad_mu;       // (B, latent) or null
  scalar_t* grad_logvar;   // (B, latent) or null
  acc* grad_obs_rows;      // (B, cols) or null: shared kinds, summed over k
  scalar_t* grad_obs_elems;  // (K*B, cols) or null: kSample
  int* found_outside;      // or null
};

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> obs_at(const IWAEParams<scalar_t>& p,
                                                            int64_t b, int64_t row, int64_t j) {
  using acc = at::opmath_type<scalar_t>;
  switch (p.obs_kind) {
    case IWAEObs::kScalar: return static_cast<acc>(p.obs[0]);
    case IWAEObs::kFeature: return static_cast<acc>(p.obs[j]);
    case IWAEObs::kData: return static_cast<acc>(p.obs[b * p.cols + j]);
    case IWAEObs::kSample: return static_cast<acc>(p.obs[row * p.cols + j]);
    default: return acc(0);
  }
}

template <typename scalar_t, bool kBernoulli, bool kGrad>
__global__ void __launch_bounds__(kThreads) iwae_kernel(const IWAEParams<scalar_t> p) {
  using acc = at::opmath_type<scalar_t>;
  __shared__ double shared[kWarps + 1];
  const int64_t K = p.samples, B = p.batch, cols = p.cols, latent = p.latent;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const scalar_t* x_row = p.x + b * cols;
    // 1. log w_k, residuals unweighted.
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = k * B + b;
      const scalar_t* r_row = p.recon + row * cols;
      acc part = 0;
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
        const acc xv = static_cast<acc>(x_row[j]);
        const acc l = static_cast<acc>(r_row[j]);
        acc residual;
        if constexpr (kBernoulli) {
          if (k == 0 && p.found_outside != nullptr && (xv < acc(0) || xv > acc(1))) {
            *p.found_outside = 1;
          }
          // x*l - softplus(l) = (x - [l >= 0])*l - log1p(exp(-|l|)); the linear part is
          // 0 (its limit) where x - [l >= 0] = 0 at l = +-inf.
          const acc e = exp_(-abs_(l));
          const acc coef = l >= acc(0) ? xv - acc(1) : xv;
          const acc linear = (coef == acc(0) && isinf(l)) ? acc(0) : coef * l;
          part += linear - log1p_(e);
          const acc t = e / (acc(1) + e);  // sigmoid(-|l|)
          residual = l >= acc(0) ? (xv - acc(1)) + t : xv - t;
        } else {
          const acc lv = obs_at(p, b, row, j);
          const acc diff = xv - l;
          const acc scaled = diff * exp_(-lv);
          part += acc(-0.5) * (static_cast<acc>(kLog2PiD) + lv + diff * scaled);
          residual = scaled;
        }
        if constexpr (kGrad) p.grad_recon[row * cols + j] = static_cast<scalar_t>(residual);
      }
      double total = static_cast<double>(part);
      const scalar_t* z_row = p.z + row * latent;
      for (int64_t j = threadIdx.x; j < latent; j += kThreads) {
        const double zj = static_cast<double>(z_row[j]);
        const double lv = static_cast<double>(p.logvar[b * latent + j]);
        const double d = zj - static_cast<double>(p.mu[b * latent + j]);
        total += 0.5 * (lv + d * d * ::exp(-lv) - zj * zj);
      }
      total = block_reduce<false>(total, shared);
      if (threadIdx.x == 0) p.scratch[row] = total;
    }
    __syncthreads();

    // 2. The bound, max-shifted; NaN if a log weight is NaN, m if m is +-inf.
    double m = -INFINITY, nans = 0;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      const double v = p.scratch[k * B + b];
      nans += isnan(v) ? 1.0 : 0.0;
      m = fmax(m, v);
    }
    m = block_reduce<true>(m, shared);
    nans = block_reduce<false>(nans, shared);
    if (nans > 0) m = NAN;
    double s = 0;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) s += ::exp(p.scratch[k * B + b] - m);
    s = block_reduce<false>(s, shared);
    const bool finite = isfinite(m);
    if (threadIdx.x == 0) p.bound[b] = finite ? m + ::log(s) - p.log_k : m;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      const double v = p.scratch[k * B + b];
      p.log_weights[k * B + b] = static_cast<acc>(v);
      if constexpr (kGrad) p.scratch[k * B + b] = finite ? p.scale * (::exp(v - m) / s) : NAN;
    }
    if constexpr (kGrad) {
      __syncthreads();
      // 3. Scale the residuals by d(loss)/d(log w_k); the obs_logvar gradient
      //    0.5*((x - m) * residual - 1) from the residual before it is scaled.
      const bool obs_grad = p.grad_obs_rows != nullptr || p.grad_obs_elems != nullptr;
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
        const acc xv = static_cast<acc>(x_row[j]);
        acc obs_sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = k * B + b;
          const acc c = static_cast<acc>(p.scratch[row]);
          const int64_t idx = row * cols + j;
          acc r = static_cast<acc>(p.grad_recon[idx]);
          const acc diff = obs_grad ? xv - static_cast<acc>(p.recon[idx]) : acc(0);
          if constexpr (!std::is_same_v<scalar_t, acc>) {
            // The stored residual was rounded to bf16/fp16, and (x-m)*r - 1 cancels
            // where the fit is good: form it again in acc.
            if (obs_grad) r = diff * exp_(-obs_at(p, b, row, j));
          }
          p.grad_recon[idx] = static_cast<scalar_t>(r * c);
          if (obs_grad) {
            const acc q = acc(0.5) * (diff * r - acc(1)) * c;
            if (p.grad_obs_elems != nullptr) {
              p.grad_obs_elems[idx] = static_cast<scalar_t>(q);
            } else {
              obs_sum += q;
            }
          }
        }
        if (p.grad_obs_rows != nullptr) p.grad_obs_rows[b * cols + j] = obs_sum;
      }
      for (int64_t j = threadIdx.x; j < latent; j += kThreads) {
        const double mu_j = static_cast<double>(p.mu[b * latent + j]);
        const double inv = ::exp(-static_cast<double>(p.logvar[b * latent + j]));
        double score_mu = 0, score_lv = 0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t row = k * B + b;
          const double c = p.scratch[row];
          const double zj = static_cast<double>(p.z[row * latent + j]);
          const double d = zj - mu_j, scaled = d * inv;
          p.grad_z[row * latent + j] = static_cast<scalar_t>(c * (scaled - zj));
          score_mu -= c * scaled;
          score_lv += c * 0.5 * (1.0 - d * scaled);
        }
        if (p.grad_mu != nullptr) p.grad_mu[b * latent + j] = static_cast<scalar_t>(score_mu);
        if (p.grad_logvar != nullptr) {
          p.grad_logvar[b * latent + j] = static_cast<scalar_t>(score_lv);
        }
      }
    }
    __syncthreads();  // the scratch and `shared` of this b are done before the next
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

void iwae(const IWAEArgs& args) {
  const int64_t samples = args.samples, batch = args.batch;
  const int64_t cols = args.x.size(1), latent = args.mu.size(1);
  const at::TensorOptions options = args.x.options();
  const bool grad = args.grad_recon.defined();
  const bool obs_shared = args.obs_kind == IWAEObs::kScalar || args.obs_kind == IWAEObs::kFeature;
  // Workspaces: the (K, B) log weights in float64, and for a scalar or per-feature
  // obs_logvar's gradient one row per b (summed over the samples), reduced over b below.
  const at::Tensor scratch = at::empty({samples, batch}, options.dtype(at::kDouble));
  const at::Tensor obs_rows =
      grad && obs_shared && args.grad_obs.defined()
          ? at::empty({batch, cols}, options.dtype(at::toOpMathType(args.x.scalar_type())))
          : at::Tensor();
  const at::Tensor found =
      args.found_outside != nullptr ? at::zeros({1}, options.dtype(at::kInt)) : at::Tensor();

  const int64_t blocks = std::min<int64_t>(batch, 1 << 20);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "vae_fast::iwae", [&] {
    using acc = at::opmath_type<scalar_t>;
    IWAEParams<scalar_t> p{};
    p.x = args.x.const_data_ptr<scalar_t>();
    p.recon = args.recon.const_data_ptr<scalar_t>();
    p.z = args.z.const_data_ptr<scalar_t>();
    p.mu = args.mu.const_data_ptr<scalar_t>();
    p.logvar = args.logvar.const_data_ptr<scalar_t>();
    p.obs = args.obs.defined() ? args.obs.const_data_ptr<scalar_t>() : nullptr;
    p.obs_kind = args.obs_kind;
    p.samples = samples;
    p.batch = batch;
    p.cols = cols;
    p.latent = latent;
    p.scale = args.scale;
    p.log_k = std::log(static_cast<double>(samples));
    p.scratch = scratch.mutable_data_ptr<double>();
    p.log_weights = args.log_weights.mutable_data_ptr<acc>();
    p.bound = args.bound.mutable_data_ptr<double>();
    if (grad) {
      p.grad_recon = args.grad_recon.mutable_data_ptr<scalar_t>();
      p.grad_z = args.grad_z.mutable_data_ptr<scalar_t>();
      p.grad_mu = ptr_or_null<scalar_t>(args.grad_mu);
      p.grad_logvar = ptr_or_null<scalar_t>(args.grad_logvar);
      // kData: the kernel's per-b rows are the gradient itself (opmath (B, cols)).
      p.grad_obs_rows = ptr_or_null<acc>(args.obs_kind == IWAEObs::kData ? args.grad_obs : obs_rows);
      p.grad_obs_elems = args.obs_kind == IWAEObs::kSample ? ptr_or_null<scalar_t>(args.grad_obs) : nullptr;
    }
    p.found_outside = ptr_or_null<int>(found);
    const auto launch = [&](auto kernel) { kernel<<<blocks, kThreads, 0, stream>>>(p); };
    if (args.bernoulli && grad) {
      launch(iwae_kernel<scalar_t, true, true>);
    } else if (args.bernoulli) {
      launch(iwae_kernel<scalar_t, true, false>);
    } else if (grad) {
      launch(iwae_kernel<scalar_t, false, true>);
    } else {
      launch(iwae_kernel<scalar_t, false, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (found.defined() && found.item<int>() != 0) {  // a host sync, as elbo's validation
    args.found_outside->store(true);
  }
  if (obs_rows.defined()) {  // in float64, in a fixed order (deterministic)
    const at::Tensor rows = obs_rows.to(at::kDouble);
    args.grad_obs.copy_(args.obs_kind == IWAEObs::kScalar ? rows.sum().reshape({1}) : rows.sum(0));
  }
}

}  // namespace
}  // namespace vae_fast::cuda

VAE_FAST_REGISTER_KERNEL(iwae_stub, CUDA, &vae_fast::cuda::iwae);
