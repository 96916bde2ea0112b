// vae_fast::gaussian_log_prob and its backward on CPU: checks, layout (including
// how logvar broadcasts) and allocation; the loop is in gaussian_kernel.cpp.

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cpu/allocation.h"
#include "cpu/capability.h"
#include "cpu/kernels.h"

namespace vae_fast::cpu {
namespace {

constexpr const char* kFn = "vae_fast.gaussian_log_prob";

GaussianArgs make_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar,
                       int64_t event_dims, const RowLayout& layout) {
  GaussianArgs args;
  args.x = as_matrix(x, layout);
  args.mean = as_matrix(mean, layout);
  BroadcastOperand lv = broadcast_operand(logvar, x, event_dims, layout);
  args.logvar_kind = lv.kind;
  args.logvar = lv.data;
  return args;
}

at::Tensor gaussian_log_prob(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar,
                             int64_t event_dims) {
  const RowLayout layout = check_gaussian_log_prob(x, mean, logvar, event_dims);
  at::Tensor log_prob = at::empty(layout.batch_shape, x.options());
  if (x.numel() == 0) return log_prob.zero_();
  GaussianArgs args = make_args(x, mean, logvar, event_dims, layout);
  args.log_prob = log_prob;
  VAE_FAST_CPU_DISPATCH(gaussian_kernel, args);
  return log_prob;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar,
    int64_t event_dims, std::array<bool, 3> output_mask) {
  const RowLayout layout = check_gaussian_log_prob(x, mean, logvar, event_dims);
  check_row_grad(kFn, grad, x, layout);
  at::Tensor grad_x = output_mask[0] ? empty_output(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor grad_mean = output_mask[1] ? empty_output(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor grad_logvar = output_mask[2] ? at::zeros(logvar.sizes(), x.options()) : x.new_empty({0});
  if (x.numel() == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    return {grad_x, grad_mean, grad_logvar};
  }
  GaussianArgs args = make_args(x, mean, logvar, event_dims, layout);
  args.row_weight = grad.reshape({layout.rows}).contiguous();
  if (output_mask[0]) args.grad_x = grad_x.view({layout.rows, layout.cols});
  if (output_mask[1]) args.grad_mean = grad_mean.view({layout.rows, layout.cols});
  at::Tensor grad_lv_layout;
  if (output_mask[2]) {
    grad_lv_layout = at::empty_like(args.logvar);
    args.grad_logvar = grad_lv_layout;
  }
  VAE_FAST_CPU_DISPATCH(gaussian_kernel, args);
  if (output_mask[2]) {
    grad_logvar = operand_gradient_in_shape(args.logvar_kind, grad_lv_layout, x, logvar);
  }
  return {grad_x, grad_mean, grad_logvar};
}

}  // namespace
}  // namespace vae_fast::cpu

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("gaussian_log_prob", &vae_fast::cpu::gaussian_log_prob);
  m.impl("_gaussian_log_prob_backward", &vae_fast::cpu::gaussian_log_prob_backward);
}
