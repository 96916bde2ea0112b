// vae_fast::reparameterize and its backward on CPU. eps comes from a Philox stream
// (normal_kernel.cpp) keyed by one 64-bit draw from torch's CPU generator (the
// default one unless `generator` is given), as torch's CUDA kernels key theirs: so
// torch.manual_seed, `generator=` and a restored generator state reproduce a draw,
// every call advances the generator, and all cores draw at once (torch's own CPU
// normal_ is one sequential Mersenne Twister stream).

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <mutex>

#include "common/op_checks.h"
#include "common/layout.h"
#include "cpu/allocation.h"
#include "cpu/capability.h"
#include "cpu/kernels.h"

namespace vae_fast::cpu {
namespace {

uint64_t draw_philox_key(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

std::tuple<at::Tensor, at::Tensor> reparameterize(const at::Tensor& mu, const at::Tensor& logvar,
                                                  std::optional<int64_t> num_samples,
                                                  std::optional<at::Generator> generator) {
  check_reparameterize(mu, logvar, num_samples);
  std::vector<int64_t> shape(mu.sizes().begin(), mu.sizes().end());
  if (num_samples) shape.insert(shape.begin(), *num_samples);
  // eps in the accumulation dtype: float32 draws for half inputs, kept for backward.
  at::Tensor eps = empty_output(shape, mu.options().dtype(at::toOpMathType(mu.scalar_type())));
  NormalArgs normal;
  normal.out = eps;
  normal.key = draw_philox_key(generator);  // drawn even for an empty eps: one per call
  if (eps.numel() > 0) VAE_FAST_CPU_DISPATCH_SAMPLER(normal_kernel, normal);
  at::Tensor z = empty_output(shape, mu.options());
  if (mu.numel() == 0) return {z, eps};
  const int64_t n = mu.numel();
  ReparameterizeArgs args;
  args.mu = mu.reshape({n}).contiguous();
  args.logvar = logvar.reshape({n}).contiguous();
  args.eps = eps.view({-1, n});
  args.z = z.view({-1, n});
  VAE_FAST_CPU_DISPATCH_SAMPLER(reparameterize_kernel, args);
  return {z, eps};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward(const at::Tensor& grad_z,
                                                           const at::Tensor& logvar,
                                                           const at::Tensor& eps,
                                                           std::array<bool, 2> output_mask) {
  check_reparameterize_backward(grad_z, logvar, eps);
  at::Tensor grad_mu = output_mask[0] ? empty_output(logvar.sizes(), logvar.options())
                                      : logvar.new_empty({0});
  at::Tensor grad_lv = output_mask[1] ? empty_output(logvar.sizes(), logvar.options())
                                      : logvar.new_empty({0});
  const int64_t n = logvar.numel();
  if (!(output_mask[0] || output_mask[1])) return {grad_mu, grad_lv};
  if (n == 0 || eps.numel() == 0) {
    if (output_mask[0]) grad_mu.zero_();
    if (output_mask[1]) grad_lv.zero_();
    return {grad_mu, grad_lv};
  }
  ReparameterizeBackwardArgs args;
  args.grad_z = grad_z.reshape({-1, n}).contiguous();
  args.logvar = logvar.reshape({n}).contiguous();
  args.eps = eps.reshape({-1, n}).contiguous();
  if (output_mask[0]) args.grad_mu = grad_mu.view({n});
  if (output_mask[1]) args.grad_logvar = grad_lv.view({n});
  VAE_FAST_CPU_DISPATCH_SAMPLER(reparameterize_backward_kernel, args);
  return {grad_mu, grad_lv};
}

}  // namespace
}  // namespace vae_fast::cpu

TORCH_LIBRARY_IMPL(vae_fast, CPU, m) {
  m.impl("reparameterize", &vae_fast::cpu::reparameterize);
  m.impl("_reparameterize_backward", &vae_fast::cpu::reparameterize_backward);
}
