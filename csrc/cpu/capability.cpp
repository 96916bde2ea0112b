#include "cpu/capability.h"

#include <cstdlib>
#include <cstring>

namespace vae_fast::cpu {

namespace {
Capability detect() {
#if defined(VAE_FAST_HAVE_AVX2) && (defined(__x86_64__) || defined(_M_X64))
  // ATEN_CPU_CAPABILITY=default forces the portable kernels, as it does for ATen.
  const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
  const bool force_default = forced != nullptr && std::strcmp(forced, "default") == 0;
  if (!force_default && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Capability::kAVX2;
  }
#endif
  return Capability::kDefault;
}
}  // namespace

Capability capability() {
  static const Capability chosen = detect();
  return chosen;
}

std::string capability_name() {
  return capability() == Capability::kAVX2 ? "AVX2" : "DEFAULT";
}

}  // namespace vae_fast::cpu
