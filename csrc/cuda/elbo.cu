// The CUDA kernel of vae_fast::elbo, the fused loss (elbo_stub; the glue is
// csrc/elbo.cpp), in one launch of the row driver (cuda/rows.cuh) with two tasks:
//
// - the log-likelihood over (x, recon) (BernoulliRows or GaussianRows): each row's
//   log-likelihood and, when compute_grad, d(loss)/d(recon) written in the same pass;
//   a scalar or per-feature obs_logvar's gradient reduced over rows in that pass too
//   (per-column sums), a per-element one written per element;
// - the KL to N(0, I) over (mu, logvar) (KLRows), likewise.
//
// For reduction "sum" / "mean" the same launch reduces the loss, sum(beta*kl - ll),
// from ll and kl in the accumulation dtype, as the CPU does (csrc/cpu/launch.cpp;
// rounded to bf16/fp16 first, they would lose a loss where beta*kl and ll nearly
// cancel): each block adds the rows it finishes, and the last block adds those parts
// in block order (deterministic). "none" takes one more small elementwise kernel
// (beta*kl - ll per row needs both tasks done).
// Also left outside the launch: at::sum over the blocks' per-column sums (a scalar or
// per-feature obs_logvar with gradients), a cast of a device beta of another dtype,
// and the flag read when validating Bernoulli targets (a host sync). One memset zeroes
// the launch's ticket and that flag.
//
// The gradients are those of `loss` for grad_output = 1 (they include 1/B for
// reduction="mean"), so autograd's backward only scales them.

#include <ATen/Dispatch.h>

#include "common/kernels.h"
#include "cuda/row_ops.cuh"

namespace vae_fast::cuda {
namespace {

// loss = beta*kl - ll per row (reduction "none"), from ll and kl in the accumulation dtype.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    elbo_loss_rows_kernel(const acc_t<scalar_t>* __restrict__ ll,
                          const acc_t<scalar_t>* __restrict__ kl, scalar_t* __restrict__ loss,
                          int64_t batch, acc_t<scalar_t> beta,
                          const acc_t<scalar_t>* __restrict__ beta_ptr) {
  using acc = acc_t<scalar_t>;
  const acc b = beta_ptr != nullptr ? *beta_ptr : beta;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < batch;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    loss[r] = static_cast<scalar_t>(b * kl[r] - ll[r]);
  }
}

// The likelihood task (a), the KL task (b) and the loss, in one launch.
void elbo(const ElboArgs& args) {
  TORCH_INTERNAL_ASSERT(!args.kl.prior_mu.defined() && !args.kl.prior_logvar.defined(),
                        "vae_fast.elbo: the KL is to N(0, I)");
  const at::Tensor& x = args.is_bernoulli ? args.bernoulli.x : args.gaussian.x;
  const int64_t batch = args.kl.kl.size(0);
  const int64_t ll_rows = args.run_likelihood ? x.size(0) : 0;
  const int64_t kl_rows = args.run_kl ? args.kl.mu.size(0) : 0;
  const bool validate = args.is_bernoulli && args.bernoulli.found_outside != nullptr;
  at::Tensor columns, flags;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::elbo", [&] {
    using acc = acc_t<scalar_t>;
    const acc* beta_ptr = args.beta_device.defined() ? args.beta_device.const_data_ptr<acc>() : nullptr;
    LossSpec<scalar_t> loss_spec;
    if (!args.per_row) {
      loss_spec.loss = args.loss.mutable_data_ptr<scalar_t>();
      loss_spec.scale = static_cast<acc>(args.mean ? 1.0 / static_cast<double>(batch) : 1.0);
    }
    auto kl_spec = kl_task<scalar_t, true, false>(args.kl, kl_rows);
    kl_spec.op.weight.scale_ptr = beta_ptr;
    kl_spec.adds_loss = true;  // + beta * kl
    kl_spec.loss_coef = static_cast<acc>(args.beta);
    kl_spec.loss_coef_ptr = beta_ptr;

    const auto run = [&](auto ll_spec, int n_flags, const auto& attach) {
      ll_spec.adds_loss = true;  // - ll
      ll_spec.loss_coef = acc(-1);
      const RowResult result = launch_rows<scalar_t>(ll_spec, kl_spec, loss_spec, n_flags, attach, x.options());
      columns = result.a_columns;
      flags = result.flags;
    };
    if (args.is_bernoulli) {
      // Validation reads one flag back (a host sync); without it nothing is read.
      const auto attach = [&](auto& a, auto&, int* found_outside) {
        if (validate) a.op.found_outside = found_outside;
      };
      run(bernoulli_task<scalar_t, true>(args.bernoulli, ll_rows), validate ? 1 : 0, attach);
    } else {
      with_bool(per_column(args.gaussian), [&](auto kPerColumn) {
        run(gaussian_task<scalar_t, true, decltype(kPerColumn)::value>(args.gaussian, ll_rows), 0,
            [](auto&, auto&, int*) {});
      });
    }
    if (args.per_row) {
      const auto blocks = static_cast<unsigned>(
          std::max<int64_t>(std::min<int64_t>(ceil_div(batch, kBlockThreads), static_cast<int64_t>(sm_count()) * 8), 1));
      elbo_loss_rows_kernel<scalar_t><<<blocks, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          args.log_likelihood().const_data_ptr<acc>(), args.kl.kl.const_data_ptr<acc>(),
          args.loss.mutable_data_ptr<scalar_t>(), batch, static_cast<acc>(args.beta), beta_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (validate && ll_rows > 0 && flags[1].item<int>() != 0) args.bernoulli.found_outside->store(true);
  if (!args.is_bernoulli && args.run_likelihood) write_column_gradients(args.gaussian, columns);
}

}  // namespace
}  // namespace vae_fast::cuda

VAE_FAST_REGISTER_KERNEL(elbo_stub, CUDA, &vae_fast::cuda::elbo);
