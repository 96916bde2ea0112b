// vae_fast::elbo on CPU, the fused loss. One pass over (x, recon) gives each row's
// log-likelihood and, when compute_grad, d(loss)/d(recon) (and the reduced
// d(loss)/d(obs_logvar)) for grad_output = 1; one pass over (mu, logvar) does the
// same for the KL. Backward (vae_fast/ops.py) then only scales the saved gradients.
// _elbo_into_recon writes d(loss)/d(recon) over recon itself (inplace_grad=True).

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string_view>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cpu/allocation.h"
#include "cpu/capability.h"
#include "cpu/kernels.h"

namespace vae_fast::cpu {
namespace {

at::Tensor empty_grad(const at::Tensor& like) { return like.new_empty({0}); }

using ElboOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The loss and, when compute_grad, the gradients; d(loss)/d(recon) is written into
// `grad_recon` (a fresh tensor, or recon itself for _elbo_into_recon).
ElboOutputs elbo_into(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                      const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                      c10::string_view likelihood, const at::Tensor& beta, c10::string_view reduction,
                      bool compute_grad, bool validate_x, const at::Tensor& grad_recon) {
  const int64_t batch = x.size(0);
  const int64_t x_event_dims = x.dim() - 1, z_event_dims = mu.dim() - 1;
  const double beta_value = beta.item<double>();  // on the CPU (checked): no sync
  const RowLayout x_layout = row_layout(x, x_event_dims);
  const RowLayout z_layout = row_layout(mu, z_event_dims);
  // d(loss)/d(per-sample term) for grad_output = 1.
  const double per_sample = reduction == "mean" ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : 1.0;

  at::Tensor ll = at::empty({batch}, x.options());
  at::Tensor kl = at::empty({batch}, x.options());
  at::Tensor grad_obs = compute_grad && obs_logvar ? at::zeros(obs_logvar->sizes(), x.options())
                                                   : empty_grad(x);
  at::Tensor grad_mu = compute_grad ? at::empty(mu.sizes(), x.options()) : empty_grad(x);
  at::Tensor grad_lv = compute_grad ? at::empty(mu.sizes(), x.options()) : empty_grad(x);

  if (x.numel() == 0) {
    ll.zero_();
  } else if (likelihood == "bernoulli") {
    BernoulliArgs args;
    args.x = as_matrix(x, x_layout);
    args.logits = as_matrix(recon, x_layout);
    args.log_prob = ll;
    if (compute_grad) args.grad_logits = grad_recon.view({x_layout.rows, x_layout.cols});
    args.scale = -per_sample;  // loss = beta*kl - ll
    std::atomic<bool> found_outside{false};
    if (validate_x) args.found_outside = &found_outside;
    VAE_FAST_CPU_DISPATCH(bernoulli_kernel, args);
    check_targets_found_in_unit_interval("vae_fast.elbo", x, found_outside.load());
  } else {
    const at::Tensor obs = obs_logvar ? *obs_logvar : at::zeros({}, x.options());
    GaussianArgs args;
    args.x = as_matrix(x, x_layout);
    args.mean = as_matrix(recon, x_layout);
    BroadcastOperand lv = broadcast_operand(obs, x, x_event_dims, x_layout);
    args.logvar_kind = lv.kind;
    args.logvar = lv.data;
    args.log_prob = ll;
    if (compute_grad) args.grad_mean = grad_recon.view({x_layout.rows, x_layout.cols});
    at::Tensor grad_obs_layout;
    if (compute_grad && obs_logvar) {
      grad_obs_layout = at::empty_like(lv.data);
      args.grad_logvar = grad_obs_layout;
    }
    args.scale = -per_sample;
    VAE_FAST_CPU_DISPATCH(gaussian_kernel, args);
    if (grad_obs_layout.defined()) {
      grad_obs = operand_gradient_in_shape(lv.kind, grad_obs_layout, x, *obs_logvar);
    }
  }

  if (mu.numel() == 0) {
    kl.zero_();
  } else {
    KLArgs args;
    args.mu = as_matrix(mu, z_layout);
    args.logvar = as_matrix(logvar, z_layout);
    args.kl = kl;
    if (compute_grad) {
      args.grad_mu = grad_mu.view({z_layout.rows, z_layout.cols});
      args.grad_logvar = grad_lv.view({z_layout.rows, z_layout.cols});
    }
    args.scale = beta_value * per_sample;
    VAE_FAST_CPU_DISPATCH(kl_kernel, args);
  }
  if (compute_grad && mu.numel() == 0) {
    grad_mu.zero_();
    grad_lv.zero_();
  }

  // The batch-sized combination is cheap; do it in the accumulation dtype.
  const at::ScalarType opmath = at::toOpMathType(x.scalar_type());
  at::Tensor per_row = kl.to(opmath).mul(beta_value).sub_(ll.to(opmath));
  at::Tensor loss = reduction == "mean" ? per_row.mean() : reduction == "sum" ? per_row.sum() : per_row;
  return {loss.to(x.scalar_type()), ll, kl, grad_recon, grad_obs, grad_mu, grad_lv};
}

ElboOutputs elbo(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                 const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                 c10::string_view likelihood, const at::Tensor& beta, c10::string_view reduction,
                 bool compute_grad, bool validate_x) {
  check_elbo(x, recon, mu, logvar, obs_logvar, beta, likelihood, reduction);
  const at::Tensor grad_recon =
      compute_grad ? empty_output(x.sizes(), x.options()) : empty_grad(x);
  return elbo_into(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad,
                   validate_x, grad_recon);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elbo_into_recon(
    const at::Tensor& x, at::Tensor& recon, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& obs_logvar, c10::string_view likelihood, const at::Tensor& beta,
    c10::string_view reduction, bool validate_x) {
  check_elbo_into_recon(x, recon, mu, logvar, obs_logvar, beta, likelihood, reduction);
  // The kernels read each element of recon before they write its gradient there.
  auto [loss, ll, kl, grad_recon, grad_obs, grad_mu, grad_lv] =
      elbo_into(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, true, validate_x, recon);
  return {loss, ll, kl, grad_obs, grad_mu, grad_lv};
}

}  // namespace
}  // namespace vae_fast::cpu

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("elbo", &vae_fast::cpu::elbo);
  m.impl("_elbo_into_recon", &vae_fast::cpu::elbo_into_recon);
}
