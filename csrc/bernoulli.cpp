// vae_fast::bernoulli_log_prob and its backward, for every device: checks, layout,
// allocation, output_mask and empty inputs, then the device's kernel through
// bernoulli_stub (csrc/cpu/bernoulli_kernel.cpp, csrc/cuda/bernoulli.cu).

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/allocation.h"
#include "common/kernels.h"
#include "common/layout.h"
#include "common/op_checks.h"

namespace vae_fast {

VAE_FAST_DEFINE_KERNEL(bernoulli_stub, void(const BernoulliArgs&), "vae_fast.bernoulli_log_prob");

namespace {

constexpr const char* kFn = "vae_fast.bernoulli_log_prob";

BernoulliArgs make_args(const at::Tensor& x, const at::Tensor& logits, const RowLayout& layout) {
  BernoulliArgs args;
  args.x = as_matrix(x, layout);
  args.logits = as_matrix(logits, layout);
  return args;
}

at::Tensor bernoulli_log_prob(const at::Tensor& x, const at::Tensor& logits, int64_t event_dims,
                              bool validate_x) {
  const RowLayout layout = check_bernoulli_log_prob(x, logits, event_dims);
  const c10::OptionalDeviceGuard device_guard(x.device());
  at::Tensor log_prob = empty_rows(layout.batch_shape, x);
  if (x.numel() == 0) return log_prob.zero_().to(x.scalar_type());  // an empty event sums to 0
  std::atomic<bool> found_outside{false};
  BernoulliArgs args = make_args(x, logits, layout);
  args.log_prob = log_prob;
  if (validate_x) args.found_outside = &found_outside;
  bernoulli_stub(x.device().type(), args);
  check_targets_found_in_unit_interval(kFn, x, found_outside.load());
  return log_prob.to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad,
                                                               const at::Tensor& x,
                                                               const at::Tensor& logits,
                                                               int64_t event_dims,
                                                               std::array<bool, 2> output_mask) {
  const RowLayout layout = check_bernoulli_log_prob(x, logits, event_dims);
  check_row_grad(kFn, grad, "x", x, layout);
  const c10::OptionalDeviceGuard device_guard(x.device());
  at::Tensor grad_x = output_if(output_mask[0], x.sizes(), x);
  at::Tensor grad_logits = output_if(output_mask[1], x.sizes(), x);
  if (x.numel() == 0 || !(output_mask[0] || output_mask[1])) return {grad_x, grad_logits};
  BernoulliArgs args = make_args(x, logits, layout);
  args.row_weight = grad.reshape({layout.rows}).contiguous();
  if (output_mask[0]) args.grad_x = grad_x.view({layout.rows, layout.cols});
  if (output_mask[1]) args.grad_logits = grad_logits.view({layout.rows, layout.cols});
  bernoulli_stub(x.device().type(), args);
  return {grad_x, grad_logits};
}

void define_impls(torch::Library& m) {
  m.impl("bernoulli_log_prob", &bernoulli_log_prob);
  m.impl("_bernoulli_log_prob_backward", &bernoulli_log_prob_backward);
}

}  // namespace
}  // namespace vae_fast

VAE_FAST_REGISTER_GLUE(vae_fast::define_impls);
