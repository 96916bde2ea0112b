#pragma once
// The argument checks of every op, called by its glue (csrc/<op>.cpp) for every
// device, so both devices accept and reject exactly the same calls with the same messages.
// Each returns the (rows, cols) layout the kernels use where there is one.

#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>

#include <optional>
#include <string_view>
#include <utility>

#include "common/checks.h"
#include "common/layout.h"

namespace vae_fast {

inline RowLayout check_bernoulli_log_prob(const at::Tensor& x, const at::Tensor& logits,
                                          int64_t event_dims) {
  constexpr const char* fn = "vae_fast.bernoulli_log_prob";
  check_float(fn, "x", x);
  check_like(fn, "logits", logits, "x", x);
  check_same_shape(fn, "x", x, "logits", logits);
  check_event_dims(fn, x, event_dims);
  return row_layout(x, event_dims);
}

// Bernoulli targets must lie in [0, 1]: others make the "log-likelihood" unbounded
// (raw 0..255 pixels, or recon and x swapped). The kernels note an element outside
// in the same pass that reads x (`found_outside`); this raises, with the range found
// (computed here, on the error path only). NaN targets pass and give a NaN result.
inline void check_targets_found_in_unit_interval(const char* fn, const at::Tensor& x,
                                                 bool found_outside) {
  if (!found_outside) return;
  const auto [lo, hi] = at::aminmax(x.to(at::kDouble));
  TORCH_CHECK_VALUE(false, fn, ": `x` holds Bernoulli targets outside [0, 1] (min ",
                    lo.item<double>(), ", max ", hi.item<double>(),
                    "); expected probabilities (scale 0..255 pixels to [0, 1]; the argument "
                    "order is elbo(recon, x, mu, logvar)). validate_args=False skips this check");
}

inline RowLayout check_gaussian_log_prob(const at::Tensor& x, const at::Tensor& mean,
                                         const at::Tensor& logvar, int64_t event_dims) {
  constexpr const char* fn = "vae_fast.gaussian_log_prob";
  check_float(fn, "x", x);
  check_like(fn, "mean", mean, "x", x);
  check_like(fn, "logvar", logvar, "x", x);
  check_same_shape(fn, "x", x, "mean", mean);
  check_broadcastable(fn, "logvar", logvar, "x", x.sizes());
  check_event_dims(fn, x, event_dims);
  return row_layout(x, event_dims);
}

inline RowLayout check_gaussian_kl(const at::Tensor& mu, const at::Tensor& logvar,
                                   const std::optional<at::Tensor>& prior_mu,
                                   const std::optional<at::Tensor>& prior_logvar,
                                   int64_t event_dims) {
  constexpr const char* fn = "vae_fast.gaussian_kl";
  check_float(fn, "mu", mu);
  check_like(fn, "logvar", logvar, "mu", mu);
  check_same_shape(fn, "mu", mu, "logvar", logvar);
  if (prior_mu) {
    check_like(fn, "prior_mu", *prior_mu, "mu", mu);
    check_broadcastable(fn, "prior_mu", *prior_mu, "mu", mu.sizes());
  }
  if (prior_logvar) {
    check_like(fn, "prior_logvar", *prior_logvar, "mu", mu);
    check_broadcastable(fn, "prior_logvar", *prior_logvar, "mu", mu.sizes());
  }
  check_event_dims(fn, mu, event_dims);
  return row_layout(mu, event_dims);
}

// The incoming gradient of a row-summing op's backward: one value per row.
inline void check_row_grad(const char* fn, const at::Tensor& grad, const char* like_name,
                           const at::Tensor& like, const RowLayout& layout) {
  check_like(fn, "grad", grad, like_name, like);
  check_batch_shape(fn, "grad", grad, layout.batch_shape);
}

inline void check_reparameterize(const at::Tensor& mu, const at::Tensor& logvar,
                                 std::optional<int64_t> num_samples) {
  constexpr const char* fn = "vae_fast.reparameterize";
  check_float(fn, "mu", mu);
  check_like(fn, "logvar", logvar, "mu", mu);
  check_same_shape(fn, "mu", mu, "logvar", logvar);
  TORCH_CHECK_VALUE(!num_samples || *num_samples >= 1, fn,
                    ": `num_samples` must be a positive int or None, got ", *num_samples);
}

inline void check_reparameterize_backward(const at::Tensor& grad_z, const at::Tensor& logvar,
                                          const at::Tensor& eps) {
  constexpr const char* fn = "vae_fast.reparameterize";
  check_float(fn, "logvar", logvar);
  check_like(fn, "grad_z", grad_z, "logvar", logvar);
  check_same_shape(fn, "eps", eps, "grad_z", grad_z);
  TORCH_CHECK_VALUE(eps.device() == logvar.device(), fn, ": `eps` is on ", eps.device(),
                    " but `logvar` is on ", logvar.device(),
                    "; all inputs of one call must be on the same device");
  const at::ScalarType opmath = at::toOpMathType(logvar.scalar_type());
  TORCH_CHECK_TYPE(eps.scalar_type() == opmath, fn, ": `eps` has dtype ", eps.scalar_type(),
                   "; expected ", opmath, ", the accumulation dtype of `logvar`'s ",
                   logvar.scalar_type());
  // One sample (logvar's shape) or K of them, (K, *logvar.shape).
  const bool one = eps.sizes() == logvar.sizes();
  const bool samples = eps.dim() == logvar.dim() + 1 && eps.sizes().slice(1) == logvar.sizes();
  TORCH_CHECK_VALUE(one || samples, fn, ": `eps` has shape ", eps.sizes(),
                    "; expected logvar's shape ", logvar.sizes(), " or (samples, *",
                    logvar.sizes(), ")");
}

inline void check_elbo(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& mu,
                       const at::Tensor& logvar, const std::optional<at::Tensor>& obs_logvar,
                       const at::Tensor& beta, std::string_view likelihood,
                       std::string_view reduction) {
  constexpr const char* fn = "vae_fast.elbo";
  TORCH_CHECK_VALUE(likelihood == "bernoulli" || likelihood == "gaussian", fn,
                    ": unknown likelihood '", likelihood,
                    "'; expected one of 'bernoulli', 'gaussian'");
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", fn,
                    ": unknown reduction '", reduction, "'; expected one of 'mean', 'sum', 'none'");
  check_float(fn, "x", x);
  check_like(fn, "recon", recon, "x", x);
  check_like(fn, "mu", mu, "x", x);
  check_like(fn, "logvar", logvar, "x", x);
  // recon of x's shape, or (K, *x.shape): K >= 1 samples of the decoder's output.
  const bool samples = recon.dim() == x.dim() + 1 && recon.sizes().slice(1) == x.sizes();
  if (!samples) check_same_shape(fn, "x", x, "recon", recon);
  TORCH_CHECK_VALUE(!samples || recon.size(0) >= 1, fn, ": `recon` has no samples (shape ",
                    recon.sizes(), "); K >= 1");
  check_same_shape(fn, "mu", mu, "logvar", logvar);
  TORCH_CHECK_VALUE(x.dim() >= 1 && mu.dim() >= 1, fn,
                    ": `x` and `mu` need a leading batch dim, got shapes ", x.sizes(), " and ",
                    mu.sizes());
  TORCH_CHECK_VALUE(mu.size(0) == x.size(0), fn, ": `mu` has batch size ", mu.size(0), " (shape ",
                    mu.sizes(), ") but `x` has ", x.size(0), " (shape ", x.sizes(),
                    "); the first dims must match");
  if (obs_logvar) {
    TORCH_CHECK_VALUE(likelihood == "gaussian", fn,
                      ": `obs_logvar` is only used with likelihood='gaussian'");
    check_like(fn, "obs_logvar", *obs_logvar, "x", x);
    check_broadcastable(fn, "obs_logvar", *obs_logvar, "x", x.sizes());
  }
  TORCH_CHECK_VALUE(beta.dim() == 0 && at::isFloatingType(beta.scalar_type()), fn,
                    ": `beta` must be a 0-d floating tensor, got dtype ", beta.scalar_type(),
                    " and shape ", beta.sizes());
  TORCH_CHECK_VALUE(beta.device().is_cpu() || beta.device() == x.device(), fn, ": `beta` is on ",
                    beta.device(), "; expected the CPU or x's device ", x.device());
}

// elbo(..., inplace_grad=True): d(loss)/d(recon) is written over recon itself.
inline void check_elbo_into_recon(const at::Tensor& x, const at::Tensor& recon,
                                  const at::Tensor& mu, const at::Tensor& logvar,
                                  const std::optional<at::Tensor>& obs_logvar,
                                  const at::Tensor& beta, std::string_view likelihood,
                                  std::string_view reduction) {
  check_elbo(x, recon, mu, logvar, obs_logvar, beta, likelihood, reduction);
  constexpr const char* fn = "vae_fast.elbo(inplace_grad=True)";
  TORCH_CHECK_VALUE(reduction != "none", fn,
                    ": needs reduction 'mean' or 'sum' (with 'none' the gradient depends on "
                    "grad_output per sample, so it cannot be written in the forward pass)");
  TORCH_CHECK_VALUE(recon.is_contiguous(), fn,
                    ": writes the gradient over `recon`, which must be contiguous; got shape ",
                    recon.sizes(), " with strides ", recon.strides());
  // An input read while recon is being written would be read half overwritten.
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"x", &x}, {"mu", &mu}, {"logvar", &logvar}, {"beta", &beta},
      {"obs_logvar", obs_logvar.has_value() ? &*obs_logvar : nullptr}};
  for (const auto& [name, t] : inputs) {
    if (t == nullptr || !t->defined()) continue;
    const at::MemOverlapStatus overlap = at::get_overlap_status(recon, *t);
    const bool shared =
        overlap == at::MemOverlapStatus::Full || overlap == at::MemOverlapStatus::Partial;
    TORCH_CHECK_VALUE(!shared, fn, ": `", name,
                      "` shares memory with `recon`, which the gradient is written "
                      "over; pass a copy of it");
  }
}

}  // namespace vae_fast
