// vae_fast::iwae, for every device: checks, layout, allocation and empty inputs, then
// the device's kernel through iwae_stub (csrc/cpu/iwae_kernel.cpp, csrc/cuda/iwae.cu),
// and the loss from the bound. The importance-weighted bound of K samples: x, mu and
// logvar have no sample dim and are broadcast over the K samples inside the kernels
// (never repeated). When compute_grad, the gradients of `loss` for grad_output = 1
// (with the normalized importance weights) come back too, so that backward
// (vae_fast/iwae.py) only scales them:
//   recon, z: always (z's is log w's direct dependence on z: the prior and q terms);
//   mu, logvar: estimator "iwae" only (the score terms, d log q / d(mu, logvar) at
//   fixed z; "stl" and "dreg" drop them);
//   obs_logvar: when given.
// The DReG reweighting of the path through z is not done here: iwae_sample's
// backward applies it (see vae_fast/_dreg.py), so the op's gradients for "dreg" are
// those of "stl".

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <string_view>

#include "common/allocation.h"
#include "common/iwae_checks.h"
#include "common/kernels.h"
#include "common/layout.h"
#include "common/op_checks.h"

namespace vae_fast {

VAE_FAST_DEFINE_KERNEL(iwae_stub, void(const IWAEArgs&), "vae_fast.iwae");

namespace {

using IWAEOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

IWAEOutputs iwae(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& z,
                 const at::Tensor& mu, const at::Tensor& logvar,
                 const std::optional<at::Tensor>& obs_logvar, c10::string_view likelihood,
                 c10::string_view estimator, c10::string_view reduction, bool compute_grad,
                 bool validate_x) {
  check_iwae(x, recon, z, mu, logvar, obs_logvar, likelihood, estimator, reduction);
  const c10::OptionalDeviceGuard device_guard(x.device());
  const int64_t samples = recon.size(0), batch = x.size(0);
  const RowLayout x_layout = row_layout(x, x.dim() - 1);
  const RowLayout z_layout = row_layout(mu, mu.dim() - 1);
  const int64_t cols = x_layout.cols, latent = z_layout.cols;
  const at::TensorOptions options = x.options();
  const at::ScalarType opmath = at::toOpMathType(x.scalar_type());

  IWAEArgs args;
  args.bernoulli = likelihood == "bernoulli";
  args.samples = samples;
  args.batch = batch;
  args.x = as_matrix(x, x_layout);
  args.recon = recon.reshape({samples * batch, cols}).contiguous();
  args.z = z.reshape({samples * batch, latent}).contiguous();
  args.mu = as_matrix(mu, z_layout);
  args.logvar = as_matrix(logvar, z_layout);
  const IWAEObsOperand obs = iwae_obs_operand(obs_logvar, x, recon, x_layout);
  args.obs_kind = obs.kind;
  args.obs = obs.data;
  args.log_weights = at::empty({samples, batch}, options.dtype(opmath));
  args.bound = at::empty({batch}, options.dtype(at::kDouble));
  args.scale = reduction == "mean" ? -1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : -1.0;

  at::Tensor grad_recon = not_wanted(x), grad_z = not_wanted(x), grad_mu = not_wanted(x),
             grad_lv = not_wanted(x), grad_obs = not_wanted(x);
  if (compute_grad) {
    grad_recon = empty_output(recon.sizes(), options);
    grad_z = at::empty(z.sizes(), options);
    args.grad_recon = grad_recon.view({samples * batch, cols});
    args.grad_z = grad_z.view({samples * batch, latent});
    if (estimator == "iwae") {
      grad_mu = at::empty(mu.sizes(), options);
      grad_lv = at::empty(mu.sizes(), options);
      args.grad_mu = grad_mu.view({batch, latent});
      args.grad_logvar = grad_lv.view({batch, latent});
    }
    // In the operand's layout (common/kernels.h). The shared sums start at zero: with
    // no rows (batch 0) no kernel runs, and the gradient is 0.
    switch (obs.kind) {
      case IWAEObs::kScalar: args.grad_obs = at::zeros({1}, options.dtype(at::kDouble)); break;
      case IWAEObs::kFeature: args.grad_obs = at::zeros({cols}, options.dtype(at::kDouble)); break;
      case IWAEObs::kData: args.grad_obs = at::empty({batch, cols}, options.dtype(opmath)); break;
      case IWAEObs::kSample: args.grad_obs = at::empty({samples * batch, cols}, options); break;
      case IWAEObs::kNone: break;
    }
  }
  std::atomic<bool> found_outside{false};
  if (validate_x && args.bernoulli) args.found_outside = &found_outside;
  if (batch > 0) iwae_stub(x.device().type(), args);
  check_targets_found_in_unit_interval("vae_fast.iwae", x, found_outside.load());
  if (args.grad_obs.defined()) {
    grad_obs = iwae_obs_gradient(obs, args.grad_obs, x, recon, *obs_logvar);
  }

  // loss = -bound, reduced over the batch in float64, returned in x's dtype.
  const at::Tensor per_row = args.bound.neg();
  const at::Tensor loss = reduction == "mean"  ? per_row.mean()
                          : reduction == "sum" ? per_row.sum()
                                               : per_row;
  return {loss.to(x.scalar_type()), args.log_weights, grad_recon, grad_z, grad_mu, grad_lv,
          grad_obs};
}

void define_impls(torch::Library& m) { m.impl("iwae", &iwae); }

}  // namespace
}  // namespace vae_fast

VAE_FAST_REGISTER_GLUE(vae_fast::define_impls);
