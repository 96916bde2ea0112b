#pragma once
// The CPU kernels, declared once per compiled instruction set. Each *_kernel.cpp is
// compiled once per capability with -DCPU_CAPABILITY=<name>, which puts both ATen's
// Vectorized<T> and these functions into a namespace of that name; cpu/launch.cpp
// picks one with VAE_FAST_CPU_DISPATCH and registers it in the op's kernel table.
// The arguments are the device-neutral ones of common/kernels.h.

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/kernels.h"

namespace vae_fast::cpu {

struct NormalArgs {
  at::Tensor out;    // out, contiguous float or double: standard normals
  uint64_t key = 0;  // the Philox key (see normal_kernel.cpp for the stream)
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
// defined in blocks of 8 Philox counters, one per AVX2 float lane. normal_kernel
// draws eps; reparameterize_kernel then reads args.eps (not args.generator).
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
