// Reparameterization z = mu + exp(logvar/2) * eps for `samples` draws of eps, and
// its backward: grad_mu = sum_k grad_z, grad_logvar = 0.5 * sigma * sum_k grad_z*eps
// with the saved eps (exact even when sigma << |mu|, where (z - mu)/sigma is not).
// Compiled once per CPU capability.

#include <ATen/Dispatch.h>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace vae_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename scalar_t>
void reparameterize_columns(const ReparameterizeArgs& a) {
  using opmath = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t samples = a.eps.size(0), n_cols = a.eps.size(1);
  const scalar_t* mu = a.mu.const_data_ptr<scalar_t>();
  const scalar_t* logvar = a.logvar.const_data_ptr<scalar_t>();
  const opmath* eps = a.eps.const_data_ptr<opmath>();
  scalar_t* z = a.z.mutable_data_ptr<scalar_t>();
  const bool stream = streams(a.z);  // eps is read back (by this loop): not streamed

  at::parallel_for(0, n_cols, kElementsPerTask / std::max<int64_t>(samples, 1) + 1,
                   [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j += W) {
      const int64_t n = std::min<int64_t>(W, end - j);
      const Vec m = load_n(mu + j, n);
      const Vec sigma = fast_exp(Vec(0.5) * load_n(logvar + j, n));
      for (int64_t k = 0; k < samples; ++k) {
        const int64_t off = k * n_cols + j;
        store_out(z + off, at::vec::fmadd(sigma, load_n(eps + off, n), m), n, stream);
      }
    }
    end_streaming(stream);
  });
}

template <typename scalar_t>
void reparameterize_backward_columns(const ReparameterizeBackwardArgs& a) {
  using opmath = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t samples = a.eps.size(0), n_cols = a.eps.size(1);
  const scalar_t* grad_z = a.grad_z.const_data_ptr<scalar_t>();
  const scalar_t* logvar = a.logvar.const_data_ptr<scalar_t>();
  const opmath* eps = a.eps.const_data_ptr<opmath>();
  scalar_t* grad_mu = mutable_ptr_or_null<scalar_t>(a.grad_mu);
  scalar_t* grad_lv = mutable_ptr_or_null<scalar_t>(a.grad_logvar);

  at::parallel_for(0, n_cols, kElementsPerTask / std::max<int64_t>(samples, 1) + 1,
                   [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j += W) {
      const int64_t n = std::min<int64_t>(W, end - j);
      Vec sum_g(0), sum_g_eps(0);
      for (int64_t k = 0; k < samples; ++k) {
        const int64_t off = k * n_cols + j;
        const Vec g = load_n(grad_z + off, n);
        sum_g += g;
        sum_g_eps = at::vec::fmadd(g, load_n(eps + off, n), sum_g_eps);
      }
      if (grad_mu) store_n(grad_mu + j, sum_g, n);
      if (grad_lv) {
        const Vec half_sigma = Vec(0.5) * fast_exp(Vec(0.5) * load_n(logvar + j, n));
        store_n(grad_lv + j, half_sigma * sum_g_eps, n);
      }
    }
  });
}

}  // namespace

void reparameterize_kernel(const ReparameterizeArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.mu.scalar_type(),
                                  "vae_fast::reparameterize",
                                  [&] { reparameterize_columns<scalar_t>(args); });
}

void reparameterize_backward_kernel(const ReparameterizeBackwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.logvar.scalar_type(),
                                  "vae_fast::_reparameterize_backward",
                                  [&] { reparameterize_backward_columns<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast::cpu
