#pragma once
// vae_fast::iwae's argument checks and the layout of its observation log-variance,
// used by its glue (csrc/iwae.cpp) for every device: vae_fast/_validate.py's
// check_iwae, in the same order, with the same messages.

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>

#include "common/checks.h"
#include "common/layout.h"

namespace vae_fast {

inline void check_iwae(const at::Tensor& x, const at::Tensor& recon, const at::Tensor& z,
                       const at::Tensor& mu, const at::Tensor& logvar,
                       const std::optional<at::Tensor>& obs_logvar, std::string_view likelihood,
                       std::string_view estimator, std::string_view reduction) {
  constexpr const char* fn = "vae_fast.iwae";
  TORCH_CHECK_VALUE(likelihood == "bernoulli" || likelihood == "gaussian", fn,
                    ": unknown likelihood '", likelihood,
                    "'; expected one of 'bernoulli', 'gaussian'");
  TORCH_CHECK_VALUE(estimator == "iwae" || estimator == "stl" || estimator == "dreg", fn,
                    ": unknown estimator '", estimator, "'; expected one of 'iwae', 'stl', 'dreg'");
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", fn,
                    ": unknown reduction '", reduction, "'; expected one of 'mean', 'sum', 'none'");
  check_float(fn, "x", x);
  check_like(fn, "recon", recon, "x", x);
  check_like(fn, "z", z, "x", x);
  check_like(fn, "mu", mu, "x", x);
  check_like(fn, "logvar", logvar, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1 && mu.dim() >= 1, fn,
                    ": `x` and `mu` need a leading batch dim, got shapes ", x.sizes(), " and ",
                    mu.sizes());
  TORCH_CHECK_VALUE(mu.size(0) == x.size(0), fn, ": `mu` has batch size ", mu.size(0),
                    " (shape ", mu.sizes(), ") but `x` has ", x.size(0), " (shape ", x.sizes(),
                    "); the first dims must match");
  TORCH_CHECK_VALUE(recon.dim() == x.dim() + 1 && recon.sizes().slice(1) == x.sizes(), fn,
                    ": `recon` has shape ", recon.sizes(),
                    "; expected (K, *x.shape) for x of shape ", x.sizes(),
                    " (K samples of the decoder's output)");
  check_same_shape(fn, "mu", mu, "logvar", logvar);
  TORCH_CHECK_VALUE(z.dim() == mu.dim() + 1 && z.sizes().slice(1) == mu.sizes(), fn,
                    ": `z` has shape ", z.sizes(), "; expected (K, *mu.shape) for mu of shape ",
                    mu.sizes());
  TORCH_CHECK_VALUE(z.size(0) == recon.size(0), fn, ": `z` has ", z.size(0),
                    " samples but `recon` has ", recon.size(0), "; the first dims must match");
  TORCH_CHECK_VALUE(recon.size(0) >= 1, fn, ": needs at least one sample (K >= 1)");
  if (obs_logvar) {
    TORCH_CHECK_VALUE(likelihood == "gaussian", fn,
                      ": `obs_logvar` is only used with likelihood='gaussian'");
    check_like(fn, "obs_logvar", *obs_logvar, "x", x);
    check_broadcastable(fn, "obs_logvar", *obs_logvar, "recon", recon.sizes());
  }
}

// How the kernels read obs_logvar: none (0), one value, one per feature, one per data
// element (shared by the K samples, like x) or one per element of recon.
enum class IWAEObs { kNone, kScalar, kFeature, kData, kSample };

struct IWAEObsOperand {
  IWAEObs kind = IWAEObs::kNone;
  at::Tensor data;  // kScalar (1), kFeature (cols), kData (batch, cols), kSample (K*batch, cols)
  at::Tensor data_shaped;  // obs_logvar without leading size-1 dims beyond x's rank
};

inline IWAEObsOperand iwae_obs_operand(const std::optional<at::Tensor>& obs_logvar,
                                       const at::Tensor& x, const at::Tensor& recon,
                                       const RowLayout& x_layout) {
  IWAEObsOperand out;
  if (!obs_logvar) return out;
  const at::Tensor& t = *obs_logvar;
  if (t.numel() == 1) {
    out.kind = IWAEObs::kScalar;
    out.data = t.reshape({1}).contiguous();
    return out;
  }
  at::Tensor u = t;
  while (u.dim() > x.dim() && u.size(0) == 1) u = u.squeeze(0);
  out.data_shaped = u;
  if (u.dim() <= x.dim()) {
    const BroadcastOperand op = broadcast_operand(u, x, x.dim() - 1, x_layout);
    out.kind = op.kind == Broadcast::kFeature ? IWAEObs::kFeature : IWAEObs::kData;
    out.data = op.data;
    return out;
  }
  out.kind = IWAEObs::kSample;
  out.data = t.expand(recon.sizes())
                 .reshape({recon.size(0) * x_layout.rows, x_layout.cols})
                 .contiguous();
  return out;
}

// The kernel's obs_logvar gradient (`grad`, in the operand's layout: float64 for the
// shared kinds, the accumulation dtype for kData, x's dtype for kSample) in
// obs_logvar's own shape and dtype.
inline at::Tensor iwae_obs_gradient(const IWAEObsOperand& op, const at::Tensor& grad,
                                    const at::Tensor& x, const at::Tensor& recon,
                                    const at::Tensor& obs_logvar) {
  switch (op.kind) {
    case IWAEObs::kScalar:
    case IWAEObs::kFeature:
      return grad.to(obs_logvar.scalar_type()).reshape(obs_logvar.sizes());
    case IWAEObs::kData:
      return gradient_in_shape(grad.view(x.sizes()), op.data_shaped)
          .reshape(obs_logvar.sizes())
          .to(obs_logvar.scalar_type());
    case IWAEObs::kSample:
      return gradient_in_shape(grad.view(recon.sizes()), obs_logvar).to(obs_logvar.scalar_type());
    case IWAEObs::kNone:
      break;
  }
  return grad;
}

}  // namespace vae_fast
