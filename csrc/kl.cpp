// vae_fast::gaussian_kl and its backward, for every device: checks, layout,
// allocation, output_mask and empty inputs, then the device's kernel through kl_stub
// (csrc/cpu/kl_kernel.cpp, csrc/cuda/kl.cu).
//
// The priors' one rule, on every device: a prior is passed in its broadcast form
// (common/layout.h's broadcast_operand): a scalar or per-feature prior as it is, read
// by every row and never expanded to mu's size, its gradient reduced over rows by the
// kernel; a prior that broadcasts in any other way (along some batch dims only) as a
// (rows, cols) matrix, its gradient summed back to the prior's shape here.

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/allocation.h"
#include "common/kernels.h"
#include "common/layout.h"
#include "common/op_checks.h"

namespace vae_fast {

VAE_FAST_DEFINE_KERNEL(kl_stub, void(const KLArgs&), "vae_fast.gaussian_kl");

namespace {

constexpr const char* kFn = "vae_fast.gaussian_kl";

KLArgs make_args(const at::Tensor& mu, const at::Tensor& logvar,
                 const std::optional<at::Tensor>& prior_mu,
                 const std::optional<at::Tensor>& prior_logvar, int64_t event_dims,
                 const RowLayout& layout) {
  KLArgs args;
  args.mu = as_matrix(mu, layout);
  args.logvar = as_matrix(logvar, layout);
  if (prior_mu) {
    const BroadcastOperand pm = broadcast_operand(*prior_mu, mu, event_dims, layout);
    args.prior_mu_kind = pm.kind;
    args.prior_mu = pm.data;
  }
  if (prior_logvar) {
    const BroadcastOperand plv = broadcast_operand(*prior_logvar, mu, event_dims, layout);
    args.prior_logvar_kind = plv.kind;
    args.prior_logvar = plv.data;
  }
  return args;
}

at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar,
                       const std::optional<at::Tensor>& prior_mu,
                       const std::optional<at::Tensor>& prior_logvar, int64_t event_dims) {
  const RowLayout layout = check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims);
  const c10::OptionalDeviceGuard device_guard(mu.device());
  at::Tensor kl = empty_rows(layout.batch_shape, mu);
  if (mu.numel() == 0) return kl.zero_().to(mu.scalar_type());  // an empty event sums to 0
  KLArgs args = make_args(mu, logvar, prior_mu, prior_logvar, event_dims, layout);
  args.kl = kl;
  kl_stub(mu.device().type(), args);
  return kl.to(mu.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
    int64_t event_dims, std::array<bool, 4> output_mask) {
  const RowLayout layout = check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims);
  check_row_grad(kFn, grad, "mu", mu, layout);
  const c10::OptionalDeviceGuard device_guard(mu.device());
  const bool want[4] = {output_mask[0], output_mask[1], output_mask[2] && prior_mu.has_value(),
                        output_mask[3] && prior_logvar.has_value()};
  at::Tensor grad_mu = output_if(want[0], mu.sizes(), mu);
  at::Tensor grad_lv = output_if(want[1], mu.sizes(), mu);
  at::Tensor grad_pm = not_wanted(mu);  // replaced when wanted
  at::Tensor grad_plv = not_wanted(mu);
  if (mu.numel() == 0 || !(want[0] || want[1] || want[2] || want[3])) {
    // An empty mu adds nothing to the priors' gradients (mu's and logvar's are empty
    // too, so there is nothing else to write).
    if (want[2]) grad_pm = at::zeros(prior_mu->sizes(), mu.options());
    if (want[3]) grad_plv = at::zeros(prior_logvar->sizes(), mu.options());
    return {grad_mu, grad_lv, grad_pm, grad_plv};
  }
  KLArgs args = make_args(mu, logvar, prior_mu, prior_logvar, event_dims, layout);
  args.row_weight = grad.reshape({layout.rows}).contiguous();
  if (want[0]) args.grad_mu = grad_mu.view({layout.rows, layout.cols});
  if (want[1]) args.grad_logvar = grad_lv.view({layout.rows, layout.cols});
  if (want[2]) args.grad_prior_mu = at::empty_like(args.prior_mu);
  if (want[3]) args.grad_prior_logvar = at::empty_like(args.prior_logvar);
  kl_stub(mu.device().type(), args);
  if (want[2]) {
    grad_pm = operand_gradient_in_shape(args.prior_mu_kind, args.grad_prior_mu, mu, *prior_mu);
  }
  if (want[3]) {
    grad_plv = operand_gradient_in_shape(args.prior_logvar_kind, args.grad_prior_logvar, mu,
                                         *prior_logvar);
  }
  return {grad_mu, grad_lv, grad_pm, grad_plv};
}

void define_impls(torch::Library& m) {
  m.impl("gaussian_kl", &gaussian_kl);
  m.impl("_gaussian_kl_backward", &gaussian_kl_backward);
}

}  // namespace
}  // namespace vae_fast

VAE_FAST_REGISTER_GLUE(vae_fast::define_impls);
