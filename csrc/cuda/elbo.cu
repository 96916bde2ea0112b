// vae_fast::elbo on CUDA, the fused loss (same contract as csrc/cpu/elbo.cpp).
//
// - One pass over (x, recon) (BernoulliRows or GaussianRows on the row driver) gives
//   each row's log-likelihood and, when compute_grad, writes d(loss)/d(recon) in the
//   same pass; a scalar or per-feature obs_logvar's gradient is reduced over rows in
//   that pass too (per-column sums), a per-element one written per element.
// - One pass over (mu, logvar) (KLRows with the N(0, I) prior) does the same for KL.
// - A last small kernel combines the rows into the loss (beta*kl - ll, reduced) in
//   the accumulation type, from the rounded ll and kl, exactly as on CPU.
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

constexpr int kLossThreads = 1024;

// loss = beta*kl - ll per row (reduction "none"), or its sum / mean in one block
// (a fixed summation order: deterministic). Reads the rounded ll and kl, as the
// CPU does.
template <typename scalar_t>
__global__ void __launch_bounds__(kLossThreads)
    elbo_loss_kernel(const scalar_t* __restrict__ ll, const scalar_t* __restrict__ kl,
                     scalar_t* __restrict__ loss, int64_t batch, acc_t<scalar_t> beta, bool per_row,
                     bool mean) {
  using acc = acc_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (per_row) {
    for (int64_t r = start; r < batch; r += stride) {
      loss[r] = static_cast<scalar_t>(beta * static_cast<acc>(kl[r]) - static_cast<acc>(ll[r]));
    }
    return;
  }
  acc sum = acc(0);
#pragma unroll 8
  for (int64_t r = start; r < batch; r += stride) {
    sum += beta * static_cast<acc>(kl[r]) - static_cast<acc>(ll[r]);
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) loss[0] = static_cast<scalar_t>(mean ? sum / static_cast<acc>(batch) : sum);
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
  // A beta on the host is read (free); one on the device is never read on the host
  // (a sync): the kernels then run with beta = 1 and the tensor scales their results.
  const bool beta_on_host = beta.device().is_cpu();
  const double beta_value = beta_on_host ? beta.item<double>() : 1.0;
  // d(loss)/d(per-sample term) for grad_output = 1.
  const double per_sample = mean ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : 1.0;

  at::Tensor ll = at::empty({batch}, x.options());
  at::Tensor kl = at::empty({batch}, x.options());
  at::Tensor grad_obs = compute_grad && obs_logvar ? at::zeros(obs_logvar->sizes(), x.options()) : empty_grad(x);
  at::Tensor grad_mu = compute_grad ? at::empty(mu.sizes(), x.options()) : empty_grad(x);
  at::Tensor grad_lv = compute_grad ? at::empty(mu.sizes(), x.options()) : empty_grad(x);

  if (batch == 0) {
    // The mean of no rows is nan, as torch's mean() gives; grads are already empty.
    at::Tensor loss = per_row ? at::empty({0}, x.options())
                              : at::full({}, mean ? std::numeric_limits<double>::quiet_NaN() : 0.0, x.options());
    return {loss, ll, kl, grad_recon, grad_obs, grad_mu, grad_lv};
  }

  // ---- log-likelihood (and d/d recon, d/d obs_logvar) in one pass over x, recon
  if (x.numel() == 0) {
    ll.zero_();
  } else {
    const at::Tensor xm = as_matrix(x, x_layout);
    const at::Tensor rm = as_matrix(recon, x_layout);
    if (likelihood == "bernoulli") {
      // Validation reads one flag back (a host sync); without it nothing is read.
      const at::Tensor found_outside =
          validate_x ? at::zeros({}, x.options().dtype(at::kInt)) : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::elbo", [&] {
        BernoulliRows<scalar_t, true> op;
        op.x = xm.const_data_ptr<scalar_t>();
        op.logits = rm.const_data_ptr<scalar_t>();
        op.log_prob = ll.mutable_data_ptr<scalar_t>();
        if (compute_grad) op.grad_logits = grad_recon.mutable_data_ptr<scalar_t>();
        if (validate_x) op.found_outside = found_outside.mutable_data_ptr<int>();
        op.weight.scale = static_cast<acc_t<scalar_t>>(-per_sample);  // loss = beta*kl - ll
        run_rows<scalar_t>(op, x_layout, {op.x, op.logits, op.grad_logits}, x.options());
      });
      if (validate_x) {
        check_targets_found_in_unit_interval("vae_fast.elbo", x, found_outside.item<int>() != 0);
      }
    } else {
      // No obs_logvar means logvar = 0: a null operand, which the kernel reads as 0.
      std::optional<BroadcastOperand> obs;
      if (obs_logvar) obs = broadcast_operand(*obs_logvar, x, x_event_dims, x_layout);
      const bool want_obs = compute_grad && obs.has_value();
      const bool per_column = want_obs && reduced_over_rows(*obs);
      const at::Tensor obs_elements =
          want_obs && !per_column ? at::empty({x_layout.rows, x_layout.cols}, x.options()) : at::Tensor();
      at::Tensor obs_columns;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::elbo", [&] {
        with_bool(per_column, [&](auto kPerColumn) {
          GaussianRows<scalar_t, true, decltype(kPerColumn)::value> op;
          op.x = xm.const_data_ptr<scalar_t>();
          op.mean = rm.const_data_ptr<scalar_t>();
          if (obs) op.logvar = make_operand<scalar_t>(*obs);
          op.log_prob = ll.mutable_data_ptr<scalar_t>();
          if (compute_grad) op.grad_mean = grad_recon.mutable_data_ptr<scalar_t>();
          op.grad_logvar = mutable_ptr_or_null<scalar_t>(obs_elements);
          op.weight.scale = static_cast<acc_t<scalar_t>>(-per_sample);
          obs_columns = run_rows<scalar_t>(
              op, x_layout, {op.x, op.mean, vector_ptr(op.logvar), op.grad_mean, op.grad_logvar}, x.options());
        });
      });
      if (want_obs) {
        grad_obs = operand_gradient(*obs, per_column ? obs_columns[0] : at::Tensor(), obs_elements, x, *obs_logvar);
      }
    }
  }

  // ---- KL to N(0, I) (and d/d mu, d/d logvar) in one pass over mu, logvar
  if (mu.numel() == 0) {
    kl.zero_();
    if (compute_grad) {
      grad_mu.zero_();
      grad_lv.zero_();
    }
  } else {
    const at::Tensor mm = as_matrix(mu, z_layout);
    const at::Tensor lm = as_matrix(logvar, z_layout);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::elbo", [&] {
      KLRows<scalar_t, true, false> op;
      op.mu = mm.const_data_ptr<scalar_t>();
      op.logvar = lm.const_data_ptr<scalar_t>();
      op.kl = kl.mutable_data_ptr<scalar_t>();
      if (compute_grad) {
        op.grad_mu = grad_mu.mutable_data_ptr<scalar_t>();
        op.grad_logvar = grad_lv.mutable_data_ptr<scalar_t>();
      }
      op.weight.scale = static_cast<acc_t<scalar_t>>(beta_value * per_sample);
      run_rows<scalar_t>(op, z_layout, {op.mu, op.logvar, op.grad_mu, op.grad_logvar}, x.options());
    });
  }

  // ---- the loss
  if (!beta_on_host) {
    if (compute_grad) {
      grad_mu.mul_(beta);
      grad_lv.mul_(beta);
    }
    const at::ScalarType opmath = at::toOpMathType(x.scalar_type());
    at::Tensor rows = kl.to(opmath).mul(beta.to(opmath)).sub_(ll.to(opmath));
    at::Tensor loss = per_row ? rows : mean ? rows.mean() : rows.sum();
    return {loss.to(x.scalar_type()), ll, kl, grad_recon, grad_obs, grad_mu, grad_lv};
  }
  at::Tensor loss = per_row ? at::empty({batch}, x.options()) : at::empty({}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vae_fast::elbo", [&] {
    const unsigned blocks =
        per_row ? static_cast<unsigned>(std::min<int64_t>(ceil_div(batch, kLossThreads), 1024)) : 1u;
    elbo_loss_kernel<scalar_t><<<blocks, kLossThreads, 0, stream>>>(
        ll.const_data_ptr<scalar_t>(), kl.const_data_ptr<scalar_t>(), loss.mutable_data_ptr<scalar_t>(), batch,
        static_cast<acc_t<scalar_t>>(beta_value), per_row, mean);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
