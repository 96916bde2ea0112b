// The CUDA kernel of vae_fast::bernoulli_log_prob and its backward (bernoulli_stub;
// the glue is csrc/bernoulli.cpp): BernoulliRows (cuda/row_ops.cuh) run by the row
// driver (cuda/rows.cuh).

#include <ATen/Dispatch.h>

#include "common/kernels.h"
#include "cuda/row_ops.cuh"

namespace vae_fast::cuda {
namespace {

void bernoulli(const BernoulliArgs& a) {
  // Validation reads one flag back (a host sync); without it nothing is read. The
  // flag is zeroed in the launch's one memset.
  const bool validate = a.found_outside != nullptr;
  const auto attach = [&](auto& task, auto&, int* found_outside) {
    if (validate) task.op.found_outside = found_outside;
  };
  at::Tensor flags;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.x.scalar_type(), "vae_fast::bernoulli_log_prob", [&] {
        with_bool(a.log_prob.defined(), [&](auto kLogProb) {
          const auto spec = bernoulli_task<scalar_t, decltype(kLogProb)::value>(a, a.logits.size(0));
          flags = launch_rows<scalar_t>(spec, NoTask{}, LossSpec<scalar_t>{}, validate ? 1 : 0,
                                        attach, a.x.options())
                      .flags;
        });
      });
  if (validate && flags[1].item<int>() != 0) a.found_outside->store(true);
}

}  // namespace
}  // namespace vae_fast::cuda

VAE_FAST_REGISTER_KERNEL(bernoulli_stub, CUDA, &vae_fast::cuda::bernoulli);
