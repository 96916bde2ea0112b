// vae_fast::gaussian_kl and its backward on CUDA: checks, layout and allocation as
// on CPU (csrc/cpu/kl.cpp); the maths is KLRows (cuda/row_ops.cuh). Priors are read
// in their broadcast form (scalar, per-feature or per-element), never expanded to
// mu's size; the gradient of a scalar or per-feature prior is reduced over rows in
// the kernel.

#include <torch/library.h>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cuda/row_ops.cuh"

namespace vae_fast::cuda {
namespace {

constexpr const char* kFn = "vae_fast.gaussian_kl";

// A prior as the kernel reads it; absent priors are a null operand (read as 0).
struct Prior {
  std::optional<BroadcastOperand> operand;

  template <typename T>
  Operand<T> get() const {
    return operand ? make_operand<T>(*operand) : Operand<T>();
  }
  bool reduced() const { return operand && reduced_over_rows(*operand); }
};

Prior make_prior(const std::optional<at::Tensor>& t, const at::Tensor& mu, int64_t event_dims,
                 const RowLayout& layout) {
  Prior p;
  if (t) p.operand = broadcast_operand(*t, mu, event_dims, layout);
  return p;
}

at::Tensor gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar,
                       const std::optional<at::Tensor>& prior_mu,
                       const std::optional<at::Tensor>& prior_logvar, int64_t event_dims) {
  const RowLayout layout = check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  at::Tensor kl = at::empty(layout.batch_shape, mu.options());
  if (mu.numel() == 0) return kl.zero_();
  const at::Tensor mm = as_matrix(mu, layout);
  const at::Tensor lm = as_matrix(logvar, layout);
  const Prior pm = make_prior(prior_mu, mu, event_dims, layout);
  const Prior plv = make_prior(prior_logvar, mu, event_dims, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vae_fast::gaussian_kl", [&] {
    KLRows<scalar_t, true, false> op;
    op.mu = mm.const_data_ptr<scalar_t>();
    op.logvar = lm.const_data_ptr<scalar_t>();
    op.prior_mu = pm.get<scalar_t>();
    op.prior_logvar = plv.get<scalar_t>();
    op.kl = kl.mutable_data_ptr<scalar_t>();
    launch_rows<scalar_t>(
        task(op, layout, {op.mu, op.logvar, matrix_ptr(op.prior_mu), matrix_ptr(op.prior_logvar)}), mu.options());
  });
  return kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_kl_backward(
    const at::Tensor& grad, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
    int64_t event_dims, std::array<bool, 4> output_mask) {
  const RowLayout layout = check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims);
  check_row_grad(kFn, grad, mu, layout);
  const c10::cuda::CUDAGuard device_guard(mu.device());
  const bool want[4] = {output_mask[0], output_mask[1], output_mask[2] && prior_mu.has_value(),
                        output_mask[3] && prior_logvar.has_value()};
  at::Tensor grad_mu = want[0] ? at::empty(mu.sizes(), mu.options()) : mu.new_empty({0});
  at::Tensor grad_lv = want[1] ? at::empty(mu.sizes(), mu.options()) : mu.new_empty({0});
  at::Tensor grad_pm = mu.new_empty({0});  // replaced when wanted
  at::Tensor grad_plv = mu.new_empty({0});
  if (mu.numel() == 0 || !(want[0] || want[1] || want[2] || want[3])) {
    // Zeros only here: an empty mu adds nothing to the priors' gradients (mu's and
    // logvar's are empty too, so zeroing them writes nothing).
    if (want[2]) grad_pm = at::zeros(prior_mu->sizes(), mu.options());
    if (want[3]) grad_plv = at::zeros(prior_logvar->sizes(), mu.options());
    return {grad_mu, grad_lv, grad_pm, grad_plv};
  }
  const at::Tensor mm = as_matrix(mu, layout);
  const at::Tensor lm = as_matrix(logvar, layout);
  const at::Tensor row_weight = grad.reshape({layout.rows}).contiguous();
  const Prior pm = make_prior(prior_mu, mu, event_dims, layout);
  const Prior plv = make_prior(prior_logvar, mu, event_dims, layout);
  const bool pm_columns = want[2] && pm.reduced(), plv_columns = want[3] && plv.reduced();
  auto element_buffer = [&](bool wanted, bool columns) {
    return wanted && !columns ? at::empty({layout.rows, layout.cols}, mu.options()) : at::Tensor();
  };
  const at::Tensor pm_elements = element_buffer(want[2], pm_columns);
  const at::Tensor plv_elements = element_buffer(want[3], plv_columns);
  at::Tensor columns;  // (2, cols): slot 0 prior_mu, slot 1 prior_logvar
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "vae_fast::_gaussian_kl_backward", [&] {
    with_bool(pm_columns || plv_columns, [&](auto kPerColumn) {
      KLRows<scalar_t, false, decltype(kPerColumn)::value> op;
      op.mu = mm.const_data_ptr<scalar_t>();
      op.logvar = lm.const_data_ptr<scalar_t>();
      op.prior_mu = pm.get<scalar_t>();
      op.prior_logvar = plv.get<scalar_t>();
      op.weight.row_weight = row_weight.const_data_ptr<scalar_t>();
      if (want[0]) op.grad_mu = grad_mu.mutable_data_ptr<scalar_t>();
      if (want[1]) op.grad_logvar = grad_lv.mutable_data_ptr<scalar_t>();
      op.grad_prior_mu = mutable_ptr_or_null<scalar_t>(pm_elements);
      op.grad_prior_logvar = mutable_ptr_or_null<scalar_t>(plv_elements);
      columns = launch_rows<scalar_t>(task(op, layout,
                                           {op.mu, op.logvar, matrix_ptr(op.prior_mu), matrix_ptr(op.prior_logvar),
                                            op.grad_mu, op.grad_logvar, op.grad_prior_mu, op.grad_prior_logvar}),
                                      mu.options())
                    .a_columns;
    });
  });
  if (want[2]) {
    grad_pm = operand_gradient(*pm.operand, pm_columns ? columns[0] : at::Tensor(), pm_elements, mu, *prior_mu);
  }
  if (want[3]) {
    grad_plv = operand_gradient(*plv.operand, plv_columns ? columns[1] : at::Tensor(), plv_elements, mu,
                                *prior_logvar);
  }
  return {grad_mu, grad_lv, grad_pm, grad_plv};
}

}  // namespace
}  // namespace vae_fast::cuda

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("gaussian_kl", &vae_fast::cuda::gaussian_kl);
  m.impl("_gaussian_kl_backward", &vae_fast::cuda::gaussian_kl_backward);
}
