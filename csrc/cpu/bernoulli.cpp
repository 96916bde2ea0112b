// vae_fast::bernoulli_log_prob and its backward on CPU: checks, layout and
// allocation; the vectorized loop is in bernoulli_kernel.cpp.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cpu/allocation.h"
#include "cpu/capability.h"
#include "cpu/kernels.h"

namespace vae_fast::cpu {
namespace {

constexpr const char* kFn = "vae_fast.bernoulli_log_prob";

at::Tensor bernoulli_log_prob(const at::Tensor& x, const at::Tensor& logits, int64_t event_dims,
                              bool validate_x) {
  const RowLayout layout = check_bernoulli_log_prob(x, logits, event_dims);
  at::Tensor log_prob = at::empty(layout.batch_shape, x.options());
  if (x.numel() == 0) return log_prob.zero_();  // an empty event sums to 0
  std::atomic<bool> found_outside{false};
  BernoulliArgs args;
  args.x = as_matrix(x, layout);
  args.logits = as_matrix(logits, layout);
  args.log_prob = log_prob;
  if (validate_x) args.found_outside = &found_outside;
  VAE_FAST_CPU_DISPATCH(bernoulli_kernel, args);
  check_targets_found_in_unit_interval(kFn, x, found_outside.load());
  return log_prob;
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad,
                                                               const at::Tensor& x,
                                                               const at::Tensor& logits,
                                                               int64_t event_dims,
                                                               std::array<bool, 2> output_mask) {
  const RowLayout layout = check_bernoulli_log_prob(x, logits, event_dims);
  check_row_grad(kFn, grad, x, layout);
  at::Tensor grad_x = output_mask[0] ? empty_output(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor grad_logits = output_mask[1] ? empty_output(x.sizes(), x.options()) : x.new_empty({0});
  if (x.numel() == 0 || !(output_mask[0] || output_mask[1])) return {grad_x, grad_logits};
  BernoulliArgs args;
  args.x = as_matrix(x, layout);
  args.logits = as_matrix(logits, layout);
  args.row_weight = grad.reshape({layout.rows}).contiguous();
  if (output_mask[0]) args.grad_x = grad_x.view({layout.rows, layout.cols});
  if (output_mask[1]) args.grad_logits = grad_logits.view({layout.rows, layout.cols});
  VAE_FAST_CPU_DISPATCH(bernoulli_kernel, args);
  return {grad_x, grad_logits};
}

}  // namespace
}  // namespace vae_fast::cpu

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("bernoulli_log_prob", &vae_fast::cpu::bernoulli_log_prob);
  m.impl("_bernoulli_log_prob_backward", &vae_fast::cpu::bernoulli_log_prob_backward);
}
