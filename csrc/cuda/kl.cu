// The CUDA kernel of vae_fast::gaussian_kl and its backward (kl_stub; the glue is
// csrc/kl.cpp): KLRows (cuda/row_ops.cuh) run by the row driver (cuda/rows.cuh).
// Priors are read in their broadcast form (scalar, per-feature or per-element), never
// expanded to mu's size; the gradient of a scalar or per-feature prior is reduced over
// rows in the kernel.

#include <ATen/Dispatch.h>

#include "common/kernels.h"
#include "cuda/row_ops.cuh"

namespace vae_fast::cuda {
namespace {

void kl(const KLArgs& a) {
  at::Tensor columns;  // (2, cols): slot 0 prior_mu, slot 1 prior_logvar
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.mu.scalar_type(), "vae_fast::gaussian_kl", [&] {
        with_bool(a.kl.defined(), [&](auto kKL) {
          with_bool(per_column(a), [&](auto kPerColumn) {
            constexpr bool kRows = decltype(kKL)::value;
            constexpr bool kColumns = decltype(kPerColumn)::value;
            const auto spec = kl_task<scalar_t, kRows, kColumns>(a, a.mu.size(0));
            columns = launch_rows<scalar_t>(spec, a.mu.options()).a_columns;
          });
        });
      });
  write_column_gradients(a, columns);
}

}  // namespace
}  // namespace vae_fast::cuda

VAE_FAST_REGISTER_KERNEL(kl_stub, CUDA, &vae_fast::cuda::kl);
