// The CPU kernel of every op's table (common/kernels.h), compiled once: each entry
// runs the kernel compiled for the best capability of the running CPU
// (cpu/capability.h). Only the work that is the CPU's own is done here: reparameterize
// keys its Philox stream from torch's CPU generator, and elbo runs its two passes and
// combines the loss. Everything device-neutral was done by the op's glue.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <mutex>

#include "common/kernels.h"
#include "cpu/capability.h"
#include "cpu/kernels.h"

namespace vae_fast::cpu {
namespace {

void bernoulli(const BernoulliArgs& args) { VAE_FAST_CPU_DISPATCH(bernoulli_kernel, args); }
void gaussian(const GaussianArgs& args) { VAE_FAST_CPU_DISPATCH(gaussian_kernel, args); }
void kl(const KLArgs& args) { VAE_FAST_CPU_DISPATCH(kl_kernel, args); }
void iwae(const IWAEArgs& args) { VAE_FAST_CPU_DISPATCH(iwae_kernel, args); }

// loss = beta*kl - ll per row in the accumulation dtype, its mean or sum taken in
// double. A loop over the batch: the handful of ATen ops it replaces cost more than
// the kernels themselves at small batches.
template <typename scalar_t>
void combine_loss(const ElboArgs& args) {
  using opmath = at::opmath_type<scalar_t>;
  const opmath* ll = args.log_likelihood().const_data_ptr<opmath>();
  const opmath* kl = args.kl.kl.const_data_ptr<opmath>();
  scalar_t* loss = args.loss.mutable_data_ptr<scalar_t>();
  const int64_t batch = args.kl.kl.numel();
  const auto beta = static_cast<opmath>(args.beta);
  double total = 0;
  for (int64_t i = 0; i < batch; ++i) {
    const opmath row = beta * kl[i] - ll[i];
    if (args.per_row) {
      loss[i] = static_cast<scalar_t>(row);
    } else {
      total += static_cast<double>(row);
    }
  }
  if (!args.per_row) {
    loss[0] = static_cast<scalar_t>(args.mean ? total / static_cast<double>(batch) : total);
  }
}

// The two passes, then the loss.
void elbo(const ElboArgs& args) {
  // A CPU x takes its beta on the CPU (the checks refuse any other): it is on the host.
  TORCH_INTERNAL_ASSERT(!args.beta_device.defined(), "vae_fast.elbo: a device beta on the CPU");
  if (args.run_likelihood) {
    if (args.is_bernoulli) {
      bernoulli(args.bernoulli);
    } else {
      gaussian(args.gaussian);
    }
  }
  if (args.run_kl) kl(args.kl);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.loss.scalar_type(),
                                  "vae_fast::elbo", [&] { combine_loss<scalar_t>(args); });
}

// eps comes from a Philox stream (normal_kernel.cpp) keyed by one 64-bit draw from
// torch's CPU generator (the default one unless `generator` is given), as torch's
// CUDA kernels key theirs: so torch.manual_seed, `generator=` and a restored
// generator state reproduce a draw, every call advances the generator (an empty one
// too), and all cores draw at once (torch's own CPU normal_ is one sequential
// Mersenne Twister stream).
uint64_t draw_philox_key(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  const std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

void reparameterize(const ReparameterizeArgs& args) {
  NormalArgs normal;
  normal.out = args.eps;
  normal.key = draw_philox_key(args.generator);
  if (args.eps.numel() == 0) return;
  VAE_FAST_CPU_DISPATCH_SAMPLER(normal_kernel, normal);
  VAE_FAST_CPU_DISPATCH_SAMPLER(reparameterize_kernel, args);
}

void reparameterize_backward(const ReparameterizeBackwardArgs& args) {
  VAE_FAST_CPU_DISPATCH_SAMPLER(reparameterize_backward_kernel, args);
}

}  // namespace
}  // namespace vae_fast::cpu

VAE_FAST_REGISTER_KERNEL(bernoulli_stub, CPU, &vae_fast::cpu::bernoulli);
VAE_FAST_REGISTER_KERNEL(gaussian_stub, CPU, &vae_fast::cpu::gaussian);
VAE_FAST_REGISTER_KERNEL(kl_stub, CPU, &vae_fast::cpu::kl);
VAE_FAST_REGISTER_KERNEL(elbo_stub, CPU, &vae_fast::cpu::elbo);
VAE_FAST_REGISTER_KERNEL(reparameterize_stub, CPU, &vae_fast::cpu::reparameterize);
VAE_FAST_REGISTER_KERNEL(reparameterize_backward_stub, CPU,
                         &vae_fast::cpu::reparameterize_backward);
VAE_FAST_REGISTER_KERNEL(iwae_stub, CPU, &vae_fast::cpu::iwae);
