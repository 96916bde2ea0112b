// The CUDA kernel of vae_fast::gaussian_log_prob and its backward (gaussian_stub; the
// glue is csrc/gaussian.cpp): GaussianRows (cuda/row_ops.cuh) run by the row driver
// (cuda/rows.cuh). A scalar or per-feature logvar stays small: its gradient is
// reduced over rows inside the kernel (per-column sums), never materialised at x's
// size; a per-element one is written per element.

#include <ATen/Dispatch.h>

#include "common/kernels.h"
#include "cuda/row_ops.cuh"

namespace vae_fast::cuda {
namespace {

void gaussian(const GaussianArgs& a) {
  at::Tensor columns;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "vae_fast::gaussian_log_prob", [&] {
        with_bool(a.log_prob.defined(), [&](auto kLogProb) {
          with_bool(per_column(a), [&](auto kPerColumn) {
            constexpr bool kRows = decltype(kLogProb)::value;
            constexpr bool kColumns = decltype(kPerColumn)::value;
            const auto spec = gaussian_task<scalar_t, kRows, kColumns>(a, a.mean.size(0));
            columns = launch_rows<scalar_t>(spec, a.x.options()).a_columns;
          });
        });
      });
  write_column_gradients(a, columns);
}

}  // namespace
}  // namespace vae_fast::cuda

VAE_FAST_REGISTER_KERNEL(gaussian_stub, CUDA, &vae_fast::cuda::gaussian);
