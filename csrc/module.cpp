// The Python extension module vae_fast._C. Importing it loads this library, whose
// static TORCH_LIBRARY / TORCH_LIBRARY_IMPL blocks register every operator.

#include <pybind11/pybind11.h>

#include "cpu/capability.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vae_fast operators (registered under torch.ops.vae_fast)";
  m.def("cpu_capability", &vae_fast::cpu::capability_name,
        "The instruction set the CPU kernels run with (DEFAULT, AVX2 or AVX512).");
#ifdef VAE_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
