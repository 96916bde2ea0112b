// vae_fast::gaussian_kl and its backward on CPU: checks, layout and allocation;
// the loop is in kl_kernel.cpp. A prior that broadcasts to mu (per-feature, say)
// is expanded for the kernel and its gradient summed back to the prior's shape.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cpu/allocation.h"
#include "cpu/capability.h"
#include "cpu/kernels.h"

namespace vae_fast::cpu {
namespace {

constexpr const char* kFn = "vae_fast.gaussian_kl";

at::Tensor expanded_matrix(const std::optional<at::Tensor>& t, const at::Tensor& like,
                           const RowLayout& layout) {
  return t ? as_matrix(t->expand(like.sizes()), layout) : at::Tensor();
}

KLArgs make_args(const at::Tensor& mu, const at::Tensor& logvar,
                 const std::optional<at::Tensor>& prior_mu,
                 const std::optional<at::Tensor>& prior_logvar, const RowLayout& layout) {
  KLArgs args;
  args.mu = as_matrix(mu, layout);
  args.logvar = as_matrix(logvar, layout);
  args.prior_mu = expanded_matrix(prior_mu, mu, layout);
  args.prior_logvar = expanded_matrix(prior_logvar, mu, layout);
  return args;
}

at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar,
                       const std::optional<at::Tensor>& prior_mu,
                       const std::optional<at::Tensor>& prior_logvar, int64_t event_dims) {
  const RowLayout layout = check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims);
  at::Tensor kl = at::empty(layout.batch_shape, mu.options());
  if (mu.numel() == 0) return kl.zero_();
  KLArgs args = make_args(mu, logvar, prior_mu, prior_logvar, layout);
  args.kl = kl;
  VAE_FAST_CPU_DISPATCH(kl_kernel, args);
  return kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
    int64_t event_dims, std::array<bool, 4> output_mask) {
  const RowLayout layout = check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims);
  check_row_grad(kFn, grad, mu, layout);
  const bool want[4] = {output_mask[0], output_mask[1], output_mask[2] && prior_mu.has_value(),
                        output_mask[3] && prior_logvar.has_value()};
  // Full-size buffers; a broadcast prior's gradient is summed to its shape below.
  at::Tensor full[4];
  for (int i = 0; i < 4; ++i) {
    full[i] = want[i] ? empty_output(mu.sizes(), mu.options()) : mu.new_empty({0});
  }
  if (mu.numel() > 0 && (want[0] || want[1] || want[2] || want[3])) {
    KLArgs args = make_args(mu, logvar, prior_mu, prior_logvar, layout);
    args.row_weight = grad.reshape({layout.rows}).contiguous();
    auto matrix = [&](int i) {
      return want[i] ? full[i].view({layout.rows, layout.cols}) : at::Tensor();
    };
    args.grad_mu = matrix(0);
    args.grad_logvar = matrix(1);
    args.grad_prior_mu = matrix(2);
    args.grad_prior_logvar = matrix(3);
    VAE_FAST_CPU_DISPATCH(kl_kernel, args);
  } else {
    for (int i = 0; i < 4; ++i) {
      if (want[i]) full[i].zero_();
    }
  }
  if (want[2]) full[2] = gradient_in_shape(full[2], *prior_mu);
  if (want[3]) full[3] = gradient_in_shape(full[3], *prior_logvar);
  return {full[0], full[1], full[2], full[3]};
}

}  // namespace
}  // namespace vae_fast::cpu

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("gaussian_kl", &vae_fast::cpu::gaussian_kl);
  m.impl("_gaussian_kl_backward", &vae_fast::cpu::gaussian_kl_backward);
}
