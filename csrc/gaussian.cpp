// vae_fast::gaussian_log_prob and its backward, for every device: checks, layout
// (including how logvar broadcasts), allocation, output_mask and empty inputs, then
// the device's kernel through gaussian_stub (csrc/cpu/gaussian_kernel.cpp,
// csrc/cuda/gaussian.cu). A scalar or per-feature logvar is passed as it is and its
// gradient comes back reduced over rows (common/kernels.h); any other broadcast is
// expanded to x's shape and its gradient summed back to logvar's shape here.

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

VAE_FAST_DEFINE_KERNEL(gaussian_stub, void(const GaussianArgs&), "vae_fast.gaussian_log_prob");

namespace {

constexpr const char* kFn = "vae_fast.gaussian_log_prob";

GaussianArgs make_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar,
                       int64_t event_dims, const RowLayout& layout) {
  GaussianArgs args;
  args.x = as_matrix(x, layout);
  args.mean = as_matrix(mean, layout);
  const BroadcastOperand lv = broadcast_operand(logvar, x, event_dims, layout);
  args.logvar_kind = lv.kind;
  args.logvar = lv.data;
  return args;
}

at::Tensor gaussian_log_prob(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar,
                             int64_t event_dims) {
  const RowLayout layout = check_gaussian_log_prob(x, mean, logvar, event_dims);
  const c10::OptionalDeviceGuard device_guard(x.device());
  at::Tensor log_prob = empty_rows(layout.batch_shape, x);
  if (x.numel() == 0) return log_prob.zero_().to(x.scalar_type());  // an empty event sums to 0
  GaussianArgs args = make_args(x, mean, logvar, event_dims, layout);
  args.log_prob = log_prob;
  gaussian_stub(x.device().type(), args);
  return log_prob.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar,
    int64_t event_dims, std::array<bool, 3> output_mask) {
  const RowLayout layout = check_gaussian_log_prob(x, mean, logvar, event_dims);
  check_row_grad(kFn, grad, "x", x, layout);
  const c10::OptionalDeviceGuard device_guard(x.device());
  at::Tensor grad_x = output_if(output_mask[0], x.sizes(), x);
  at::Tensor grad_mean = output_if(output_mask[1], x.sizes(), x);
  at::Tensor grad_logvar = not_wanted(x);  // replaced when wanted
  if (x.numel() == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    // An empty x adds nothing to logvar's gradient.
    if (output_mask[2]) grad_logvar = at::zeros(logvar.sizes(), x.options());
    return {grad_x, grad_mean, grad_logvar};
  }
  GaussianArgs args = make_args(x, mean, logvar, event_dims, layout);
  args.row_weight = grad.reshape({layout.rows}).contiguous();
  if (output_mask[0]) args.grad_x = grad_x.view({layout.rows, layout.cols});
  if (output_mask[1]) args.grad_mean = grad_mean.view({layout.rows, layout.cols});
  if (output_mask[2]) args.grad_logvar = at::empty_like(args.logvar);
  gaussian_stub(x.device().type(), args);
  if (output_mask[2]) {
    grad_logvar = operand_gradient_in_shape(args.logvar_kind, args.grad_logvar, x, logvar);
  }
  return {grad_x, grad_mean, grad_logvar};
}

void define_impls(torch::Library& m) {
  m.impl("gaussian_log_prob", &gaussian_log_prob);
  m.impl("_gaussian_log_prob_backward", &gaussian_log_prob_backward);
}

}  // namespace
}  // namespace vae_fast

VAE_FAST_REGISTER_GLUE(vae_fast::define_impls);
