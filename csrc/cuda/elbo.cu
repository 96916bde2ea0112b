// vae_fast::elbo on CUDA, the fused loss (same contract as csrc/cpu/elbo.cpp), in one
// launch of the row driver (cuda/rows.cuh) with two tasks:
//
// - the log-likelihood over (x, recon) (BernoulliRows or GaussianRows): each row's
//   log-likelihood and, when compute_grad, d(loss)/d(recon) written in the same pass;
//   a scalar or per-feature obs_logvar's gradient reduced over rows in that pass too
//   (per-column sums), a per-element one written per element;
// - the KL to N(0, I) over (mu, logvar) (KLRows), likewise.
//
// For reduction "sum" / "mean" the same launch reduces the loss, sum(beta*kl - ll),
// from the rounded ll and kl as the CPU does: each block adds the rows it finishes,
// and the last block adds those parts in block order (deterministic). "none" takes
// one more small elementwise kernel (beta*kl - ll per row needs both tasks done).
// Also left outside the launch: at::sum over the blocks' per-column sums (a scalar or
// per-feature obs_logvar with gradients), a cast of a device beta of another dtype,
// and the flag read when validating Bernoulli targets (a host sync). One memset zeroes
// the launch's ticket and that flag.
//
// The gradients are those of `loss` for grad_output = 1 (they include 1/B for
// reduction="mean"), so autograd's backward only scales them.

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string_view>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cuda/row_ops.cuh"

namespace vae_fast::cuda {
namespace {

// loss = beta*kl - ll per row (reduction "none"), from the rounded ll and kl.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    elbo_loss_rows_kernel(const scalar_t* __restrict__ ll, const scalar_t* __restrict__ kl,
                          scalar_t* __restrict__ loss, int64_t batch, acc_t<scalar_t> beta,
                          const acc_t<scalar_t>* __restrict__ beta_ptr) {
  using acc = acc_t<scalar_t>;
  const acc b = beta_ptr != nullptr ? *beta_ptr : beta;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < batch;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    loss[r] = static_cast<scalar_t>(b * static_cast<acc>(kl[r]) - static_cast<acc>(ll[r]));
  }
}

at::Tensor empty_grad(const at::Tensor& like) { return like.new_empty({0}); }

using ElboOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The loss and, when compute_grad, the gradients; d(loss)/d(recon) is written into
// `grad_recon` (a fresh tensor, or recon itself for _elbo_into_recon: each thread
// reads its elements of recon before it writes their gradient there).
ElboOutputs elbo_into(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                      const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                      c10::string_view likelihood, const at::Tensor& beta, c10::string_view reduction,
                      bool compute_grad, bool validate_x, const at::Tensor& grad_recon) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t batch = x.size(0);
  const int64_t x_event_dims = x.dim() - 1;
  const RowLayout x_layout = row_layout(x, x_event_dims);
  const RowLayout z_layout = row_layout(mu, mu.dim() - 1);
  const bool per_row = reduction == "none", mean = reduction == "mean";
  const bool bernoulli = likelihood == "bernoulli";
  // A beta on the host is read (free); one on the device is never read on the host
  // (a sync): the kernels read it, in the accumulation dtype.
  const at::ScalarType opmath = at::toOpMathType(x.scalar_type());
  const bool beta_on_host = beta.device().is_cpu();
  const double beta_value = beta_on_host ? beta.item<double>() : 1.0;
  const at::Tensor beta_device = beta_on_host ? at::Tensor() : beta.to(opmath);
  // d(loss)/d(per-sample term) for grad_output = 1.
  const double per_sample = mean ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : 1.0;

  at::Tensor ll = at::empty({batch}, x.options());
  at::Tensor kl = at::empty({batch}, x.options());
  at::Tensor grad_mu = compute_grad ? at::empty(mu.sizes(), x.options()) : empty_grad(x);
  at::Tensor grad_lv = compute_grad ? at::empty(mu.sizes(), x.options()) : empty_grad(x);
  // Zeros only where no kernel writes it: with no elements of x, obs_logvar's gradient is 0.
  at::Tensor grad_obs = compute_grad && obs_logvar && x.numel() == 0 ? at::zeros(obs_logvar->sizes(), x.options())
                                                                     : empty_grad(x);

  if (batch == 0) {
    // The mean of no rows is nan, as torch's mean() gives; grads are already empty.
    at::Tensor loss = per_row ? at::empty({0}, x.options())
                              : at::full({}, mean ? std::numeric_limits<double>::quiet_NaN() : 0.0, x.options());
    return {loss, ll, kl, grad_recon, grad_obs, grad_mu, grad_lv};
  }
  // An empty event sums to 0: such a task has no rows to run (its rows add 0 to the loss).
  if (x.numel() == 0) ll.zero_();
  if (mu.numel() == 0) kl.zero_();
  const RowLayout ll_rows = x.numel() == 0 ? RowLayout{0, x_layout.cols, {}} : x_layout;
  const RowLayout kl_rows = mu.numel() == 0 ? RowLayout{0, z_layout.cols, {}} : z_layout;

  const at::Tensor xm = as_matrix(x, x_layout);
  const at::Tensor rm = as_matrix(recon, x_layout);
  const at::Tensor mm = as_matrix(mu, z_layout);
  const at::Tensor lm = as_matrix(logvar, z_layout);
  // No obs_logvar means logvar = 0: a null operand, which the kernel reads as 0.
  std::optional<BroadcastOperand> obs;
  if (!bernoulli && obs_logvar) obs = broadcast_operand(*obs_logvar, x, x_event_dims, x_layout);
  const bool want_obs = compute_grad && obs.has_value() && x.numel() > 0;
  const bool per_column = want_obs && reduced_over_rows(*obs);
  const at::Tensor obs_elements =
      want_obs && !per_column ? at::empty({x_layout.rows, x_layout.cols}, x.options()) : at::Tensor();
  at::Tensor loss = per_row ? at::empty({batch}, x.options()) : at::empty({}, x.options());

  at::Tensor obs_columns, flags;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::elbo", [&] {
    using acc = acc_t<scalar_t>;
    const acc* beta_ptr = beta_device.defined() ? beta_device.const_data_ptr<acc>() : nullptr;
    LossSpec<scalar_t> loss_spec;
    if (!per_row) {
      loss_spec.loss = loss.mutable_data_ptr<scalar_t>();
      loss_spec.scale = static_cast<acc>(per_sample);
    }

    KLRows<scalar_t, true, false> kl_op;
    kl_op.mu = mm.const_data_ptr<scalar_t>();
    kl_op.logvar = lm.const_data_ptr<scalar_t>();
    kl_op.kl = kl.mutable_data_ptr<scalar_t>();
    if (compute_grad) {
      kl_op.grad_mu = grad_mu.mutable_data_ptr<scalar_t>();
      kl_op.grad_logvar = grad_lv.mutable_data_ptr<scalar_t>();
    }
    kl_op.weight.scale = static_cast<acc>(beta_value * per_sample);
    kl_op.weight.scale_ptr = beta_ptr;
    auto kl_task = task(kl_op, kl_rows, {kl_op.mu, kl_op.logvar, kl_op.grad_mu, kl_op.grad_logvar});
    kl_task.adds_loss = true;  // + beta * kl
    kl_task.loss_coef = static_cast<acc>(beta_value);
    kl_task.loss_coef_ptr = beta_ptr;

    const auto run = [&](auto ll_task, int n_flags, const auto& attach) {
      ll_task.adds_loss = true;  // - ll
      ll_task.loss_coef = acc(-1);
      const RowResult result = launch_rows<scalar_t>(ll_task, kl_task, loss_spec, n_flags, attach, x.options());
      obs_columns = result.a_columns;
      flags = result.flags;
    };
    if (bernoulli) {
      BernoulliRows<scalar_t, true> op;
      op.x = xm.const_data_ptr<scalar_t>();
      op.logits = rm.const_data_ptr<scalar_t>();
      op.log_prob = ll.mutable_data_ptr<scalar_t>();
      if (compute_grad) op.grad_logits = grad_recon.mutable_data_ptr<scalar_t>();
      op.weight.scale = static_cast<acc>(-per_sample);  // loss = beta*kl - ll
      // Validation reads one flag back (a host sync); without it nothing is read.
      const auto attach = [&](auto& a, auto&, int* found_outside) {
        if (validate_x) a.op.found_outside = found_outside;
      };
      run(task(op, ll_rows, {op.x, op.logits, op.grad_logits}), validate_x ? 1 : 0, attach);
    } else {
      with_bool(per_column, [&](auto kPerColumn) {
        GaussianRows<scalar_t, true, decltype(kPerColumn)::value> op;
        op.x = xm.const_data_ptr<scalar_t>();
        op.mean = rm.const_data_ptr<scalar_t>();
        if (obs) op.logvar = make_operand<scalar_t>(*obs);
        op.log_prob = ll.mutable_data_ptr<scalar_t>();
        if (compute_grad) op.grad_mean = grad_recon.mutable_data_ptr<scalar_t>();
        op.grad_logvar = mutable_ptr_or_null<scalar_t>(obs_elements);
        op.weight.scale = static_cast<acc>(-per_sample);
        run(task(op, ll_rows, {op.x, op.mean, matrix_ptr(op.logvar), op.grad_mean, op.grad_logvar}), 0,
            [](auto&, auto&, int*) {});
      });
    }
    if (per_row) {
      const auto blocks = static_cast<unsigned>(
          std::max<int64_t>(std::min<int64_t>(ceil_div(batch, kBlockThreads), static_cast<int64_t>(sm_count()) * 8), 1));
      elbo_loss_rows_kernel<scalar_t><<<blocks, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          ll.const_data_ptr<scalar_t>(), kl.const_data_ptr<scalar_t>(), loss.mutable_data_ptr<scalar_t>(), batch,
          static_cast<acc>(beta_value), beta_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  if (bernoulli && validate_x && x.numel() > 0) {
    check_targets_found_in_unit_interval("vae_fast.elbo", x, flags[1].item<int>() != 0);
  }
  if (want_obs) {
    grad_obs = operand_gradient(*obs, per_column ? obs_columns[0] : at::Tensor(), obs_elements, x, *obs_logvar);
  }
  return {loss, ll, kl, grad_recon, grad_obs, grad_mu, grad_lv};
}

ElboOutputs elbo(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu, const at::Tensor& logvar,
                 const std::optional<at::Tensor>& obs_logvar, c10::string_view likelihood, const at::Tensor& beta,
                 c10::string_view reduction, bool compute_grad, bool validate_x) {
  check_elbo(x, recon, mu, logvar, obs_logvar, beta, likelihood, reduction);
  const at::Tensor grad_recon = compute_grad ? at::empty(x.sizes(), x.options()) : empty_grad(x);
  return elbo_into(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, compute_grad, validate_x,
                   grad_recon);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> elbo_into_recon(
    const at::Tensor& x, at::Tensor& recon, const at::Tensor& mu, const at::Tensor& logvar,
    const std::optional<at::Tensor>& obs_logvar, c10::string_view likelihood, const at::Tensor& beta,
    c10::string_view reduction, bool validate_x) {
  check_elbo_into_recon(x, recon, mu, logvar, obs_logvar, beta, likelihood, reduction);
  auto [loss, ll, kl, grad_recon, grad_obs, grad_mu, grad_lv] =
      elbo_into(x, recon, mu, logvar, obs_logvar, likelihood, beta, reduction, true, validate_x, recon);
  return {loss, ll, kl, grad_obs, grad_mu, grad_lv};
}

}  // namespace
}  // namespace vae_fast::cuda

TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) {
  m.impl("elbo", &vae_fast::cuda::elbo);
  m.impl("_elbo_into_recon", &vae_fast::cuda::elbo_into_recon);
}
