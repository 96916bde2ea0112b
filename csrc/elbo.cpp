// vae_fast::elbo and _elbo_into_recon, the fused loss, for every device: checks,
// layouts, beta, allocation and empty inputs, then the device's kernel through
// elbo_stub (csrc/cpu/launch.cpp, csrc/cuda/elbo.cu). One pass over (x, recon) gives
// each row's log-likelihood and, when compute_grad, d(loss)/d(recon) (and the reduced
// d(loss)/d(obs_logvar)) for grad_output = 1; one pass over (mu, logvar) does the
// same for the KL. Backward (vae_fast/loss.py) then only scales the saved gradients.
// _elbo_into_recon writes d(loss)/d(recon) over recon itself (inplace_grad=True).

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>
#include <string_view>

#include "common/allocation.h"
#include "common/kernels.h"
#include "common/layout.h"
#include "common/op_checks.h"

namespace vae_fast {

VAE_FAST_DEFINE_KERNEL(elbo_stub, void(const ElboArgs&), "vae_fast.elbo");

namespace {

using ElboOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The KL pass of the loss: kl per row and, when compute_grad, the gradients times `scale`.
KLArgs kl_pass(const at::Tensor& mu, const at::Tensor& logvar, const RowLayout& z_layout,
               const at::Tensor& kl, const at::Tensor& grad_mu, const at::Tensor& grad_lv,
               bool compute_grad, double scale) {
  KLArgs k;
  k.mu = as_matrix(mu, z_layout);
  k.logvar = as_matrix(logvar, z_layout);
  k.kl = kl;
  if (compute_grad) {
    k.grad_mu = grad_mu.view({z_layout.rows, z_layout.cols});
    k.grad_logvar = grad_lv.view({z_layout.rows, z_layout.cols});
  }
  k.scale = scale;
  return k;
}

// elbo with K samples (recon (K, *x.shape)) after its likelihood pass has written one
// log p(x | recon_k) per row of recon into `ll_rows`: the KL pass, then the batch-sized
// combination (the mean over samples, beta*kl - ll, the reduction) with ATen ops on the
// op's device, all in the accumulation dtype (as are `ll_rows`, `ll` and the kl rows);
// the loss comes back in `dtype`. (The single-sample elbo does this inside the device's
// elbo kernel, whose loss reads one log-likelihood per batch row.)
at::Tensor combine_samples(const ElboArgs& args, const at::Tensor& ll_rows, const at::Tensor& ll,
                           c10::DeviceType device, at::ScalarType dtype) {
  const int64_t batch = ll.size(0);
  if (args.run_kl) kl_stub(device, args.kl);
  // beta on the device is never read on the host: it scales on the device.
  const at::Tensor beta_acc = args.beta_device;
  if (beta_acc.defined() && args.kl.grad_mu.defined()) {
    args.kl.grad_mu.mul_(beta_acc);
    args.kl.grad_logvar.mul_(beta_acc);
  }
  ll.copy_(ll_rows.view({-1, batch}).mean(0));
  const at::Tensor weighted_kl =
      beta_acc.defined() ? args.kl.kl.mul(beta_acc) : args.kl.kl.mul(args.beta);
  const at::Tensor per_row = weighted_kl.sub(ll);
  const at::Tensor loss = args.per_row ? per_row : args.mean ? per_row.mean() : per_row.sum();
  return loss.to(dtype);
}

// The loss and, when compute_grad, the gradients; d(loss)/d(recon) is written into
// `grad_recon` (a fresh tensor, or recon itself for _elbo_into_recon: the kernels read
// each element of recon before they write its gradient there). recon has x's shape, or
// (K, *x.shape) for K samples: the likelihood pass then runs over its K*B rows, each
// reading x's row r % B (x is never repeated), with gradients scaled by 1/K, and the
// log-likelihood is the mean over the samples.
ElboOutputs elbo_into(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                      const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                      c10::string_view likelihood, const at::Tensor& beta,
                      c10::string_view reduction, bool compute_grad, bool validate_x,
                      const at::Tensor& grad_recon) {
  const c10::OptionalDeviceGuard device_guard(x.device());
  const int64_t batch = x.size(0);
  const int64_t x_event_dims = x.dim() - 1;
  const bool multi_sample = recon.dim() == x.dim() + 1;
  const int64_t samples = multi_sample ? recon.size(0) : 1;
  const RowLayout x_layout = row_layout(x, x_event_dims);
  const RowLayout recon_layout = row_layout(recon, x_event_dims);  // x's, or K*B rows
  const RowLayout z_layout = row_layout(mu, mu.dim() - 1);
  const bool per_row = reduction == "none", mean = reduction == "mean";
  const bool bernoulli = likelihood == "bernoulli";
  // A beta on the host is read (free); one on the device is never read on the host
  // (a sync): the kernels read it, in the accumulation dtype.
  const bool beta_on_host = beta.device().is_cpu();
  const double beta_value = beta_on_host ? beta.item<double>() : 1.0;
  // d(loss)/d(per-sample term) for grad_output = 1.
  const double per_sample = mean ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : 1.0;

  at::Tensor ll = empty_rows({batch}, x);
  at::Tensor kl = empty_rows({batch}, x);
  at::Tensor grad_mu = output_if(compute_grad, mu.sizes(), x);
  at::Tensor grad_lv = output_if(compute_grad, mu.sizes(), x);
  // Zeros only where no kernel writes it: with no elements of x, obs_logvar's gradient is 0.
  at::Tensor grad_obs = compute_grad && obs_logvar && x.numel() == 0
                            ? at::zeros(obs_logvar->sizes(), x.options())
                            : not_wanted(x);
  if (batch == 0) {
    // The mean of no rows is nan, as torch's mean() gives; grads are already empty.
    const at::Tensor loss =
        per_row ? at::empty({0}, x.options())
                : at::full({}, mean ? std::numeric_limits<double>::quiet_NaN() : 0.0, x.options());
    return {loss, ll.to(x.scalar_type()), kl.to(x.scalar_type()), grad_recon, grad_obs, grad_mu,
            grad_lv};
  }

  ElboArgs args;
  args.is_bernoulli = bernoulli;
  // An empty event sums to 0: its pass does not run (and adds 0 to the loss).
  args.run_likelihood = x.numel() > 0;
  args.run_kl = mu.numel() > 0;
  // One log-likelihood per row of recon: per batch row, or per sample and batch row.
  const at::Tensor ll_rows = multi_sample ? empty_rows({recon_layout.rows}, x) : ll;
  if (!args.run_likelihood) ll_rows.zero_();
  if (!args.run_kl) kl.zero_();
  const int64_t x_rows = multi_sample ? x_layout.rows : 0;
  const double ll_scale = -per_sample / static_cast<double>(samples);  // loss = beta*kl - mean ll
  at::Tensor grad_recon_rows;
  if (compute_grad) grad_recon_rows = grad_recon.view({recon_layout.rows, recon_layout.cols});
  std::atomic<bool> found_outside{false};
  std::optional<BroadcastOperand> obs;
  if (bernoulli) {
    BernoulliArgs& b = args.bernoulli;
    b.x = as_matrix(x, x_layout);
    b.x_rows = x_rows;
    b.logits = as_matrix(recon, recon_layout);
    b.log_prob = ll_rows;
    b.grad_logits = grad_recon_rows;
    b.scale = ll_scale;
    if (validate_x) b.found_outside = &found_outside;
  } else {
    GaussianArgs& g = args.gaussian;
    g.x = as_matrix(x, x_layout);
    g.x_rows = x_rows;
    g.mean = as_matrix(recon, recon_layout);
    // No obs_logvar: logvar = 0, an undefined operand that the kernels read as 0. It
    // broadcasts to x, hence to recon: a scalar or per-feature one is read in place,
    // any other laid out as recon's rows (its gradient summed back below).
    if (obs_logvar) {
      obs = broadcast_operand(*obs_logvar, recon, x_event_dims, recon_layout);
      g.logvar_kind = obs->kind;
      g.logvar = obs->data;
      if (compute_grad && args.run_likelihood) g.grad_logvar = at::empty_like(obs->data);
    }
    g.log_prob = ll_rows;
    g.grad_mean = grad_recon_rows;
    g.scale = ll_scale;
  }
  args.kl = kl_pass(mu, logvar, z_layout, kl, grad_mu, grad_lv, compute_grad, beta_value * per_sample);
  args.per_row = per_row;
  args.mean = mean;
  args.beta = beta_value;
  if (!beta_on_host) args.beta_device = beta.to(at::toOpMathType(x.scalar_type()));

  const c10::DeviceType device = x.device().type();
  at::Tensor loss;
  if (multi_sample) {
    if (args.run_likelihood && bernoulli) bernoulli_stub(device, args.bernoulli);
    if (args.run_likelihood && !bernoulli) gaussian_stub(device, args.gaussian);
    loss = combine_samples(args, ll_rows, ll, device, x.scalar_type());
  } else {
    args.loss = per_row ? at::empty({batch}, x.options()) : at::empty({}, x.options());
    elbo_stub(device, args);
    loss = args.loss;
    // An empty latent runs no KL pass, so a reduced loss never meets beta: its
    // beta * kl = beta * 0 is added here, nan for a beta of inf or nan as per row.
    if (!args.run_kl && !per_row) loss.add_(beta.to(loss.device()).mul(0));
  }
  check_targets_found_in_unit_interval("vae_fast.elbo", x, found_outside.load());
  if (args.gaussian.grad_logvar.defined()) {
    grad_obs = operand_gradient_in_shape(obs->kind, args.gaussian.grad_logvar, recon, *obs_logvar);
  }
  return {loss, ll.to(x.scalar_type()), kl.to(x.scalar_type()), grad_recon, grad_obs, grad_mu,
          grad_lv};
}

ElboOutputs elbo(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                 const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                 c10::string_view likelihood, const at::Tensor& beta, c10::string_view reduction,
                 bool compute_grad, bool validate_x) {
  check_elbo(x, recon, mu, logvar, obs_logvar, beta, likelihood, reduction);
  const at::Tensor grad_recon = output_if(compute_grad, recon.sizes(), x);
  return elbo_into(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad,
                   validate_x, grad_recon);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elbo_into_recon(
    const at::Tensor& x, at::Tensor& recon, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& obs_logvar, c10::string_view likelihood,
    const at::Tensor& beta, c10::string_view reduction, bool validate_x) {
  check_elbo_into_recon(x, recon, mu, logvar, obs_logvar, beta, likelihood, reduction);
  auto [loss, ll, kl, grad_recon, grad_obs, grad_mu, grad_lv] = elbo_into(
      x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, true, validate_x, recon);
  return {loss, ll, kl, grad_obs, grad_mu, grad_lv};
}

void define_impls(torch::Library& m) {
  m.impl("elbo", &elbo);
  m.impl("_elbo_into_recon", &elbo_into_recon);
}

}  // namespace
}  // namespace vae_fast

VAE_FAST_REGISTER_GLUE(vae_fast::define_impls);
