// vae_fast::gaussian_log_prob and its backward on CUDA: checks, layout (including
// how logvar broadcasts) and allocation as on CPU (csrc/cpu/gaussian.cpp); the maths
// is GaussianRows (cuda/row_ops.cuh). A scalar or per-feature logvar stays small:
// its gradient is reduced over rows inside the kernel (per-column sums), never
// materialised at x's size; a per-element one is written per element and summed to
// logvar's shape only if logvar broadcasts in some other way.

#include <torch/library.h>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cuda/row_ops.cuh"

namespace vae_fast::cuda {
namespace {

constexpr const char* kFn = "vae_fast.gaussian_log_prob";

at::Tensor gaussian_log_prob(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar,
                             int64_t event_dims) {
  const RowLayout layout = check_gaussian_log_prob(x, mean, logvar, event_dims);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor log_prob = at::empty(layout.batch_shape, x.options());
  if (x.numel() == 0) return log_prob.zero_();
  const at::Tensor xm = as_matrix(x, layout);
  const at::Tensor mm = as_matrix(mean, layout);
  const BroadcastOperand lv = broadcast_operand(logvar, x, event_dims, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::gaussian_log_prob", [&] {
    GaussianRows<scalar_t, true, false> op;
    op.x = xm.const_data_ptr<scalar_t>();
    op.mean = mm.const_data_ptr<scalar_t>();
    op.logvar = make_operand<scalar_t>(lv);
    op.log_prob = log_prob.mutable_data_ptr<scalar_t>();
    launch_rows<scalar_t>(task(op, layout, {op.x, op.mean, matrix_ptr(op.logvar)}), x.options());
  });
  return log_prob;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_log_prob_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& logvar,
    int64_t event_dims, std::array<bool, 3> output_mask) {
  const RowLayout layout = check_gaussian_log_prob(x, mean, logvar, event_dims);
  check_row_grad(kFn, grad, x, layout);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor grad_mean = output_mask[1] ? at::empty(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor grad_logvar = x.new_empty({0});  // replaced when wanted
  if (x.numel() == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    // Zeros only here: an empty x adds nothing to logvar's gradient.
    if (output_mask[2]) grad_logvar = at::zeros(logvar.sizes(), x.options());
    return {grad_x, grad_mean, grad_logvar};
  }
  const at::Tensor xm = as_matrix(x, layout);
  const at::Tensor mm = as_matrix(mean, layout);
  const at::Tensor row_weight = grad.reshape({layout.rows}).contiguous();
  const BroadcastOperand lv = broadcast_operand(logvar, x, event_dims, layout);
  const bool per_column = output_mask[2] && reduced_over_rows(lv);
  const at::Tensor grad_lv_elements =
      output_mask[2] && !per_column ? at::empty({layout.rows, layout.cols}, x.options()) : at::Tensor();
  at::Tensor grad_lv_columns;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::_gaussian_log_prob_backward", [&] {
        with_bool(per_column, [&](auto kPerColumn) {
          GaussianRows<scalar_t, false, decltype(kPerColumn)::value> op;
          op.x = xm.const_data_ptr<scalar_t>();
          op.mean = mm.const_data_ptr<scalar_t>();
          op.logvar = make_operand<scalar_t>(lv);
          op.weight.row_weight = row_weight.const_data_ptr<scalar_t>();
          if (output_mask[0]) op.grad_x = grad_x.mutable_data_ptr<scalar_t>();
          if (output_mask[1]) op.grad_mean = grad_mean.mutable_data_ptr<scalar_t>();
          op.grad_logvar = mutable_ptr_or_null<scalar_t>(grad_lv_elements);
          grad_lv_columns =
              launch_rows<scalar_t>(task(op, layout, {op.x, op.mean, matrix_ptr(op.logvar), op.grad_x,
                                                      op.grad_mean, op.grad_logvar}),
                                    x.options())
                  .a_columns;
        });
      });
  if (output_mask[2]) {
    grad_logvar = operand_gradient(lv, per_column ? grad_lv_columns[0] : at::Tensor(), grad_lv_elements, x, logvar);
  }
  return {grad_x, grad_mean, grad_logvar};
}

}  // namespace
}  // namespace vae_fast::cuda

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("gaussian_log_prob", &vae_fast::cuda::gaussian_log_prob);
  m.impl("_gaussian_log_prob_backward", &vae_fast::cuda::gaussian_log_prob_backward);
}
