// vae_fast::reparameterize and its backward, for every device: checks, the sample
// shape, allocation, output_mask and empty inputs, then the device's kernel through
// reparameterize_stub / reparameterize_backward_stub (csrc/cpu/launch.cpp with
// normal_kernel.cpp and reparameterize_kernel.cpp; csrc/cuda/reparameterize.cu).
// How eps is drawn is the device's: each draws from its own torch generator.
//
// eps is returned in the accumulation dtype (float32 draws for half inputs) and saved
// for backward, which then uses it exactly instead of recovering it as
// (z - mu) / sigma.

#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <vector>

#include "common/allocation.h"
#include "common/kernels.h"
#include "common/op_checks.h"

namespace vae_fast {

VAE_FAST_DEFINE_KERNEL(reparameterize_stub, void(const ReparameterizeArgs&),
                       "vae_fast.reparameterize");
VAE_FAST_DEFINE_KERNEL(reparameterize_backward_stub, void(const ReparameterizeBackwardArgs&),
                       "vae_fast._reparameterize_backward");

namespace {

std::tuple<at::Tensor, at::Tensor> reparameterize(const at::Tensor& mu, const at::Tensor& logvar,
                                                  std::optional<int64_t> num_samples,
                                                  std::optional<at::Generator> generator) {
  check_reparameterize(mu, logvar, num_samples);
  const c10::OptionalDeviceGuard device_guard(mu.device());
  std::vector<int64_t> shape(mu.sizes().begin(), mu.sizes().end());
  if (num_samples) shape.insert(shape.begin(), *num_samples);
  at::Tensor eps = empty_output(shape, mu.options().dtype(at::toOpMathType(mu.scalar_type())));
  at::Tensor z = empty_output(shape, mu.options());
  const int64_t n = mu.numel(), samples = num_samples.value_or(1);
  ReparameterizeArgs args;
  args.mu = mu.reshape({n}).contiguous();
  args.logvar = logvar.reshape({n}).contiguous();
  args.eps = eps.view({samples, n});
  args.z = z.view({samples, n});
  args.generator = std::move(generator);
  // Called for an empty draw too: the generator advances on every call
  // (common/kernels.h).
  reparameterize_stub(mu.device().type(), args);
  return {z, eps};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward(const at::Tensor& grad_z,
                                                           const at::Tensor& logvar,
                                                           const at::Tensor& eps,
                                                           std::array<bool, 2> output_mask) {
  check_reparameterize_backward(grad_z, logvar, eps);
  const c10::OptionalDeviceGuard device_guard(logvar.device());
  at::Tensor grad_mu = output_if(output_mask[0], logvar.sizes(), logvar);
  at::Tensor grad_lv = output_if(output_mask[1], logvar.sizes(), logvar);
  const int64_t n = logvar.numel();
  if (!(output_mask[0] || output_mask[1])) return {grad_mu, grad_lv};
  if (n == 0 || eps.numel() == 0) {  // no elements, or no samples: nothing to add up
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
  reparameterize_backward_stub(logvar.device().type(), args);
  return {grad_mu, grad_lv};
}

void define_impls(torch::Library& m) {
  m.impl("reparameterize", &reparameterize);
  m.impl("_reparameterize_backward", &reparameterize_backward);
}

}  // namespace
}  // namespace vae_fast

VAE_FAST_REGISTER_GLUE(vae_fast::define_impls);
