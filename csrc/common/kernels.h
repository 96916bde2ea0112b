#pragma once
// The contract between each op's glue (csrc/<op>.cpp) and its per-device kernels
// (csrc/cpu/, csrc/cuda/): one argument struct per kernel, which the glue fills and
// the kernels only read, and the table each device registers its kernel into
// (common/dispatch.h).
//
// The glue has done everything that does not depend on the device: the checks, the
// layout, every output allocated (an undefined tensor: not wanted), empty inputs
// handled (a kernel is never called with no rows or no columns, except where noted),
// and it reduces a broadcast input's gradient to the input's shape afterwards. So
// both devices accept the same calls and return the same shapes by construction.
//
// Every matrix is a contiguous (rows, cols) tensor on the op's device, in the op's
// dtype unless noted. Gradients are multiplied by `scale` and, when `row_weight` is
// defined, by row_weight[row] (the incoming per-row gradient).
//
// A broadcast input (logvar, the priors, obs_logvar) is passed in its broadcast form,
// as common/layout.h's broadcast_operand gives it: one value (kScalar), one per column
// (kFeature), or a (rows, cols) matrix (kElement, for any other broadcast). No device
// materializes a scalar or per-feature input at the full size, and the gradient of
// such an input comes back in the same layout, reduced over rows by the kernel.

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <atomic>
#include <optional>

#include "common/dispatch.h"
#include "common/iwae_checks.h"
#include "common/layout.h"

namespace vae_fast {

// x broadcast over samples (elbo's num_samples): when `x_rows` > 0, x holds x_rows
// rows and row r of the others reads x's row r % x_rows, so K samples of recon, (K*B,
// cols), share one x of (B, cols) that is never repeated in memory (grad_x is then
// not asked for: the samples would write it K times).
struct BernoulliArgs {
  at::Tensor x, logits;            // (rows or x_rows, cols), (rows, cols)
  int64_t x_rows = 0;
  at::Tensor log_prob;             // out (rows), in the accumulation dtype (empty_rows)
  at::Tensor grad_x, grad_logits;  // out (rows, cols)
  at::Tensor row_weight;           // (rows)
  double scale = 1.0;
  // With log_prob: set when an element of x lies outside [0, 1] (null: not checked).
  // A host flag on every device; the glue raises from it.
  std::atomic<bool>* found_outside = nullptr;
};

struct GaussianArgs {
  at::Tensor x, mean;              // (rows or x_rows, cols), (rows, cols); see BernoulliArgs
  int64_t x_rows = 0;
  Broadcast logvar_kind = Broadcast::kElement;
  at::Tensor logvar;               // 1, (cols) or (rows, cols) elements, by logvar_kind;
                                   // undefined: 0 (elbo without obs_logvar)
  at::Tensor log_prob;             // out (rows), in the accumulation dtype
  at::Tensor grad_x, grad_mean;    // out (rows, cols)
  at::Tensor grad_logvar;          // out, logvar's layout
  at::Tensor row_weight;           // (rows)
  double scale = 1.0;
};

struct KLArgs {
  at::Tensor mu, logvar;                       // (rows, cols)
  // Undefined: the standard normal's 0. Otherwise 1, (cols) or (rows, cols) elements.
  Broadcast prior_mu_kind = Broadcast::kElement, prior_logvar_kind = Broadcast::kElement;
  at::Tensor prior_mu, prior_logvar;
  at::Tensor kl;                               // out (rows), in the accumulation dtype
  at::Tensor grad_mu, grad_logvar;             // out (rows, cols)
  at::Tensor grad_prior_mu, grad_prior_logvar; // out, their prior's layout
  at::Tensor row_weight;                       // (rows)
  double scale = 1.0;
};

// The fused elbo: the likelihood pass (`bernoulli` or `gaussian`, by `is_bernoulli`)
// over (x, recon) and the KL pass (to N(0, I)) over (mu, logvar), with their
// gradients for grad_output = 1 (the glue sets each pass's scale), then
// loss = beta*kl - ll per row, reduced.
struct ElboArgs {
  bool is_bernoulli = true;
  BernoulliArgs bernoulli;
  GaussianArgs gaussian;
  KLArgs kl;
  // False for a pass over no elements (an empty event): its rows are 0, written by
  // the glue. The batch itself is never empty here.
  bool run_likelihood = true, run_kl = true;
  at::Tensor loss;           // out: 0-d (reduction "mean" or "sum") or (batch)
  bool per_row = false;      // reduction "none"
  bool mean = false;         // reduction "mean"
  // beta is `beta` times *beta_device when that is defined (a 0-d tensor on the op's
  // device in the accumulation dtype: a beta given on the device is never read on the
  // host). The KL pass's scale holds beta * d(loss)/d(row) for the host part only.
  double beta = 1.0;
  at::Tensor beta_device;

  const at::Tensor& log_likelihood() const {
    return is_bernoulli ? bernoulli.log_prob : gaussian.log_prob;
  }
};

// z = mu + exp(logvar / 2) * eps with eps ~ N(0, 1) drawn from `generator` (the
// device's default when unset). Called for empty inputs too (n = 0): every call
// draws from the generator once, so its state after a sequence of calls does not
// depend on whether some were empty, on either device.
struct ReparameterizeArgs {
  at::Tensor mu, logvar;                  // (n)
  at::Tensor eps;                         // out (samples, n), in the accumulation dtype
  at::Tensor z;                           // out (samples, n)
  std::optional<at::Generator> generator;
};

struct ReparameterizeBackwardArgs {
  at::Tensor grad_z;                // (samples, n)
  at::Tensor logvar;                // (n)
  at::Tensor eps;                   // (samples, n), in the accumulation dtype
  at::Tensor grad_mu, grad_logvar;  // out (n)
};

// vae_fast::iwae: one call covers K samples of B data rows. The (k, b) row of recon
// and z is row k*B + b of their matrices; x, mu, logvar (and a data-shaped obs_logvar)
// have one row per b, read by every sample: they are never repeated in memory.
struct IWAEArgs {
  bool bernoulli = true;
  int64_t samples = 1, batch = 0;
  at::Tensor x;             // (batch, cols)
  at::Tensor recon;         // (samples*batch, cols)
  at::Tensor z;             // (samples*batch, latent)
  at::Tensor mu, logvar;    // (batch, latent)
  IWAEObs obs_kind = IWAEObs::kNone;
  at::Tensor obs;           // kScalar (1), kFeature (cols), kData (batch, cols), kSample
                            // (samples*batch, cols)
  at::Tensor log_weights;   // out (samples, batch), opmath dtype
  at::Tensor bound;         // out (batch), float64: logsumexp_k(log w) - log K
  // Gradients of the loss for grad_output = 1 (undefined: not computed). d(loss)/d(bound_b)
  // is `scale` for every row (-1/B for "mean", -1 otherwise).
  at::Tensor grad_recon;    // (samples*batch, cols)
  at::Tensor grad_z;        // (samples*batch, latent)
  at::Tensor grad_mu, grad_logvar;  // (batch, latent): the score terms, estimator "iwae" only
  at::Tensor grad_obs;      // kScalar (1), kFeature (cols): float64; kData (batch, cols):
                            // opmath dtype; kSample: like recon
  double scale = -1.0;
  // Set when an element of x lies outside [0, 1] (null: not checked).
  std::atomic<bool>* found_outside = nullptr;
};

VAE_FAST_DECLARE_KERNEL(bernoulli_stub, void(const BernoulliArgs&));
VAE_FAST_DECLARE_KERNEL(gaussian_stub, void(const GaussianArgs&));
VAE_FAST_DECLARE_KERNEL(kl_stub, void(const KLArgs&));
VAE_FAST_DECLARE_KERNEL(elbo_stub, void(const ElboArgs&));
VAE_FAST_DECLARE_KERNEL(reparameterize_stub, void(const ReparameterizeArgs&));
VAE_FAST_DECLARE_KERNEL(reparameterize_backward_stub, void(const ReparameterizeBackwardArgs&));
VAE_FAST_DECLARE_KERNEL(iwae_stub, void(const IWAEArgs&));

}  // namespace vae_fast
