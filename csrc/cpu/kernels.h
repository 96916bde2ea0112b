#pragma once
// The CPU kernels, declared once per compiled instruction set. Each *_kernel.cpp is
// compiled once per capability with -DCPU_CAPABILITY=<name>, which puts both ATen's
// Vectorized<T> and these functions into a namespace of that name; the op files
// (bernoulli.cpp, ...) pick one with VAE_FAST_CPU_DISPATCH.
//
// Every kernel reads contiguous (rows, cols) matrices. Optional outputs are
// undefined tensors when not wanted. Gradients are multiplied by `scale` and, when
// `row_weight` is defined, by row_weight[row] (the incoming per-row gradient).

#include <ATen/core/Tensor.h>

#include <atomic>

#include "common/layout.h"
#include "cpu/iwae_args.h"  // IWAEArgs (vae_fast::iwae)

namespace vae_fast::cpu {

struct BernoulliArgs {
  at::Tensor x, logits;            // (rows, cols)
  at::Tensor log_prob;             // out (rows)
  at::Tensor grad_x, grad_logits;  // out (rows, cols)
  at::Tensor row_weight;           // (rows)
  double scale = 1.0;
  // With log_prob: set when an element of x lies outside [0, 1] (null: not checked).
  std::atomic<bool>* found_outside = nullptr;
};

struct GaussianArgs {
  at::Tensor x, mean;              // (rows, cols)
  Broadcast logvar_kind = Broadcast::kElement;
  at::Tensor logvar;               // 1, (cols) or (rows, cols) elements, by logvar_kind
  at::Tensor log_prob;             // out (rows)
  at::Tensor grad_x, grad_mean;    // out (rows, cols)
  at::Tensor grad_logvar;          // out, logvar's layout
  at::Tensor row_weight;           // (rows)
  double scale = 1.0;
};

struct KLArgs {
  at::Tensor mu, logvar;                     // (rows, cols)
  at::Tensor prior_mu, prior_logvar;         // (rows, cols) or undefined (standard normal)
  at::Tensor kl;                             // out (rows)
  at::Tensor grad_mu, grad_logvar;           // out (rows, cols)
  at::Tensor grad_prior_mu, grad_prior_logvar;
  at::Tensor row_weight;                     // (rows)
  double scale = 1.0;
};

struct NormalArgs {
  at::Tensor out;    // out, contiguous float or double: standard normals
  uint64_t key = 0;  // the Philox key (see normal_kernel.cpp for the stream)
};

struct ReparameterizeArgs {
  at::Tensor mu, logvar;  // (n)
  at::Tensor eps;         // (samples, n), in opmath dtype
  at::Tensor z;           // out (samples, n)
};

struct ReparameterizeBackwardArgs {
  at::Tensor grad_z;                // (samples, n)
  at::Tensor logvar;                // (n)
  at::Tensor eps;                   // (samples, n)
  at::Tensor grad_mu, grad_logvar;  // out (n)
};

// The loss kernels, compiled for every capability.
#define VAE_FAST_DECLARE_LOSS_KERNELS(capability)   \
  namespace capability {                            \
  void bernoulli_kernel(const BernoulliArgs& args); \
  void gaussian_kernel(const GaussianArgs& args);   \
  void kl_kernel(const KLArgs& args);               \
  void iwae_kernel(const IWAEArgs& args);           \
  }

// The sampler's kernels, compiled for DEFAULT and AVX2 only: the eps stream is
// defined in blocks of 8 Philox counters, one per AVX2 float lane.
#define VAE_FAST_DECLARE_SAMPLER_KERNELS(capability)                             \
  namespace capability {                                                         \
  void normal_kernel(const NormalArgs& args);                                    \
  void reparameterize_kernel(const ReparameterizeArgs& args);                    \
  void reparameterize_backward_kernel(const ReparameterizeBackwardArgs& args);   \
  }

VAE_FAST_DECLARE_LOSS_KERNELS(DEFAULT)
VAE_FAST_DECLARE_LOSS_KERNELS(AVX2)
VAE_FAST_DECLARE_LOSS_KERNELS(AVX512)
VAE_FAST_DECLARE_SAMPLER_KERNELS(DEFAULT)
VAE_FAST_DECLARE_SAMPLER_KERNELS(AVX2)

}  // namespace vae_fast::cpu
