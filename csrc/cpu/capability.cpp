// Which CPU capability's kernels run (cpu/capability.h): detected once, from the
// running CPU's features, capped by ATEN_CPU_CAPABILITY.

#include "cpu/capability.h"

#include <cstdlib>
#include <cstring>

namespace vae_fast::cpu {

namespace {
// The highest capability ATEN_CPU_CAPABILITY allows (unset: any), as for ATen.
Capability allowed_by_environment() {
  const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
  if (forced == nullptr) return Capability::kAVX512;
  if (std::strcmp(forced, "default") == 0) return Capability::kDefault;
  if (std::strcmp(forced, "avx2") == 0) return Capability::kAVX2;
  return Capability::kAVX512;
}

Capability detect() {
  const Capability allowed = allowed_by_environment();
#if defined(__x86_64__) || defined(_M_X64)
#if defined(VAE_FAST_HAVE_AVX512)
  if (allowed == Capability::kAVX512 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return Capability::kAVX512;
  }
#endif
#if defined(VAE_FAST_HAVE_AVX2)
  if (allowed != Capability::kDefault && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma")) {
    return Capability::kAVX2;
  }
#endif
#endif
  (void)allowed;
  return Capability::kDefault;
}
}  // namespace

Capability capability() {
  static const Capability chosen = detect();
  return chosen;
}

std::string capability_name() {
  switch (capability()) {
    case Capability::kAVX512:
      return "AVX512";
    case Capability::kAVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

}  // namespace vae_fast::cpu
