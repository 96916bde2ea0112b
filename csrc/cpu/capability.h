#pragma once
// Run-time choice among the CPU kernels compiled for several instruction sets
// (see CMakeLists.txt): the best one the running CPU supports, as ATen does, capped
// by ATEN_CPU_CAPABILITY (default, avx2 or avx512) as ATen's own kernels are.

#include <string>

namespace vae_fast::cpu {

enum class Capability { kDefault, kAVX2, kAVX512 };

Capability capability();
std::string capability_name();

// Calls `fn` from the namespace of the best compiled capability:
//   VAE_FAST_CPU_DISPATCH(bernoulli_kernel, args);
// VAE_FAST_CPU_DISPATCH_SAMPLER is the same for the kernels that stop at AVX2.
#if defined(VAE_FAST_HAVE_AVX2)
#define VAE_FAST_CPU_DISPATCH_SAMPLER(fn, ...)                            \
  (::vae_fast::cpu::capability() != ::vae_fast::cpu::Capability::kDefault \
       ? ::vae_fast::cpu::AVX2::fn(__VA_ARGS__)                           \
       : ::vae_fast::cpu::DEFAULT::fn(__VA_ARGS__))
#else
#define VAE_FAST_CPU_DISPATCH_SAMPLER(fn, ...) ::vae_fast::cpu::DEFAULT::fn(__VA_ARGS__)
#endif

#if defined(VAE_FAST_HAVE_AVX512)
#define VAE_FAST_CPU_DISPATCH(fn, ...)                                     \
  (::vae_fast::cpu::capability() == ::vae_fast::cpu::Capability::kAVX512   \
       ? ::vae_fast::cpu::AVX512::fn(__VA_ARGS__)                          \
       : VAE_FAST_CPU_DISPATCH_SAMPLER(fn, __VA_ARGS__))
#else
#define VAE_FAST_CPU_DISPATCH(fn, ...) VAE_FAST_CPU_DISPATCH_SAMPLER(fn, __VA_ARGS__)
#endif

}  // namespace vae_fast::cpu
