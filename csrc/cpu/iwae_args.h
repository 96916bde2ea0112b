#pragma once
// The arguments of the CPU kernel of vae_fast::iwae (csrc/cpu/iwae_kernel.cpp), which
// csrc/cpu/kernels.h declares once per CPU capability.

#include <ATen/core/Tensor.h>

#include <atomic>

#include "common/iwae_checks.h"

namespace vae_fast::cpu {

// One call covers K samples of B data rows. The (k, b) row of recon and z is row
// k*B + b of their matrices; x, mu, logvar (and a data-shaped obs_logvar) have one
// row per b, read by every sample: they are never repeated in memory.
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
  at::Tensor grad_obs;      // kScalar (1), kFeature (cols), kData (batch, cols): float64 for the
                            // shared kinds, x's dtype otherwise; kSample: like recon
  double scale = -1.0;
  // Set when an element of x lies outside [0, 1] (null: not checked).
  std::atomic<bool>* found_outside = nullptr;
};

}  // namespace vae_fast::cpu
