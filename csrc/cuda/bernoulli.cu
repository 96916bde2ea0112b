// vae_fast::bernoulli_log_prob and its backward on CUDA: checks, layout and
// allocation as on CPU (csrc/cpu/bernoulli.cpp); the per-element maths is
// BernoulliRows (cuda/row_ops.cuh) run by the row driver (cuda/rows.cuh).

#include <torch/library.h>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cuda/row_ops.cuh"

namespace vae_fast::cuda {
namespace {

constexpr const char* kFn = "vae_fast.bernoulli_log_prob";

template <bool kLogProb, typename scalar_t>
TaskSpec<BernoulliRows<scalar_t, kLogProb>> bernoulli_task(const BernoulliRows<scalar_t, kLogProb>& op,
                                                           const RowLayout& layout) {
  return task(op, layout, {op.x, op.logits, op.grad_x, op.grad_logits});
}

at::Tensor bernoulli_log_prob(const at::Tensor& x, const at::Tensor& logits, int64_t event_dims,
                              bool validate_x) {
  const RowLayout layout = check_bernoulli_log_prob(x, logits, event_dims);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor log_prob = at::empty(layout.batch_shape, x.options());
  if (x.numel() == 0) return log_prob.zero_();  // an empty event sums to 0
  const at::Tensor xm = as_matrix(x, layout);
  const at::Tensor lm = as_matrix(logits, layout);
  // Validation reads one flag back (a host sync); without it nothing is read. The
  // flag is zeroed in the launch's one memset.
  at::Tensor flags;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::bernoulli_log_prob", [&] {
    BernoulliRows<scalar_t, true> op;
    op.x = xm.const_data_ptr<scalar_t>();
    op.logits = lm.const_data_ptr<scalar_t>();
    op.log_prob = log_prob.mutable_data_ptr<scalar_t>();
    const auto attach = [&](auto& a, auto&, int* found_outside) {
      if (validate_x) a.op.found_outside = found_outside;
    };
    flags = launch_rows<scalar_t>(bernoulli_task(op, layout), NoTask{}, LossSpec<scalar_t>{}, validate_x ? 1 : 0,
                                  attach, x.options())
                .flags;
  });
  if (validate_x) check_targets_found_in_unit_interval(kFn, x, flags[1].item<int>() != 0);
  return log_prob;
}

std::tuple<at::Tensor, at::Tensor> bernoulli_log_prob_backward(const at::Tensor& grad,
                                                               const at::Tensor& x,
                                                               const at::Tensor& logits,
                                                               int64_t event_dims,
                                                               std::array<bool, 2> output_mask) {
  const RowLayout layout = check_bernoulli_log_prob(x, logits, event_dims);
  check_row_grad(kFn, grad, x, layout);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor grad_logits = output_mask[1] ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  if (x.numel() == 0 || !(output_mask[0] || output_mask[1])) return {grad_x, grad_logits};
  const at::Tensor xm = as_matrix(x, layout);
  const at::Tensor lm = as_matrix(logits, layout);
  const at::Tensor row_weight = grad.reshape({layout.rows}).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::_bernoulli_log_prob_backward", [&] {
        BernoulliRows<scalar_t, false> op;
        op.x = xm.const_data_ptr<scalar_t>();
        op.logits = lm.const_data_ptr<scalar_t>();
        op.weight.row_weight = row_weight.const_data_ptr<scalar_t>();
        if (output_mask[0]) op.grad_x = grad_x.mutable_data_ptr<scalar_t>();
        if (output_mask[1]) op.grad_logits = grad_logits.mutable_data_ptr<scalar_t>();
        launch_rows<scalar_t>(bernoulli_task(op, layout), x.options());
      });
  return {grad_x, grad_logits};
}

}  // namespace
}  // namespace vae_fast::cuda

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("bernoulli_log_prob", &vae_fast::cuda::bernoulli_log_prob);
  m.impl("_bernoulli_log_prob_backward", &vae_fast::cuda::bernoulli_log_prob_backward);
}
