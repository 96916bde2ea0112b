#pragma once
// How an op's one glue (csrc/<op>.cpp) reaches the kernel of its tensors' device:
// a table of per-device kernels, as ATen's DispatchStub. The glue calls
//   kl_stub(mu.device().type(), args);
// csrc/cpu/launch.cpp registers the CPU kernel of every table, and each csrc/cuda/*.cu
// its CUDA kernel, when the extension is built with CUDA. A device with no kernel in
// the table raises an error naming the op and the device. VAE_FAST_REGISTER_GLUE
// registers the glue itself with the dispatcher, once per device key.
//
// The table is constant-initialized (a constexpr constructor and plain pointers), so
// it holds its null entries before any static registration runs, whatever order the
// linker puts the translation units in (DispatchStub relies on the same rule).

#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <utility>

namespace vae_fast {

template <typename Fn>
class KernelTable;

template <typename... Args>
class KernelTable<void(Args...)> {
 public:
  using Kernel = void (*)(Args...);

  constexpr explicit KernelTable(const char* op) : op_(op) {}
  KernelTable(const KernelTable&) = delete;
  KernelTable& operator=(const KernelTable&) = delete;

  // Called once per device by VAE_FAST_REGISTER_KERNEL, during static initialization.
  bool set(c10::DeviceType device, Kernel kernel) {
    slot(device) = kernel;
    return true;
  }

  Kernel for_device(c10::DeviceType device) const {
    const Kernel kernel = device == c10::DeviceType::CPU    ? cpu_
                          : device == c10::DeviceType::CUDA ? cuda_
                                                            : nullptr;
    TORCH_CHECK(kernel != nullptr, op_, ": no kernel for device type ", device,
                " in this build of vae_fast (kernels: CPU",
                cuda_ != nullptr ? ", CUDA" : "; CUDA not built", ")");
    return kernel;
  }

  template <typename... CallArgs>
  void operator()(c10::DeviceType device, CallArgs&&... args) const {
    for_device(device)(std::forward<CallArgs>(args)...);
  }

 private:
  Kernel& slot(c10::DeviceType device) {
    TORCH_INTERNAL_ASSERT(device == c10::DeviceType::CPU || device == c10::DeviceType::CUDA,
                          op_, ": kernels register for CPU or CUDA only");
    return device == c10::DeviceType::CPU ? cpu_ : cuda_;
  }

  const char* op_;
  Kernel cpu_ = nullptr;
  Kernel cuda_ = nullptr;
};

}  // namespace vae_fast

// Declares a table (in a header): VAE_FAST_DECLARE_KERNEL(kl_stub, void(const KLArgs&));
#define VAE_FAST_DECLARE_KERNEL(table, signature) \
  extern ::vae_fast::KernelTable<signature> table

// Defines a declared table, once, in the op's glue (namespace vae_fast).
#define VAE_FAST_DEFINE_KERNEL(table, signature, op_name) \
  ::vae_fast::KernelTable<signature> table(op_name)

// Registers `kernel` as the table's kernel for `device` (CPU or CUDA) from the file
// that holds it; at namespace scope.
#define VAE_FAST_REGISTER_KERNEL(table, device, kernel)                               \
  [[maybe_unused]] static const bool vae_fast_registered_##table##_##device =         \
      ::vae_fast::table.set(::c10::DeviceType::device, kernel)

// Registers an op's glue, `define(torch::Library&)` (its m.impl calls), for CPU
// tensors and, where the CUDA kernels are built, for CUDA tensors: the glue is the
// same for both. Without CUDA kernels the CUDA key has no kernel at all, so the
// dispatcher itself refuses a CUDA tensor with its own message naming the op and
// the backend. For the glue files, which include <torch/library.h>.
#ifdef VAE_FAST_WITH_CUDA
#define VAE_FAST_REGISTER_GLUE(define)                \
  TORCH_LIBRARY_IMPL(vae_fast, CPU, m) { define(m); } \
  TORCH_LIBRARY_IMPL(vae_fast, CUDA, m) { define(m); }
#else
#define VAE_FAST_REGISTER_GLUE(define) \
  TORCH_LIBRARY_IMPL(vae_fast, CPU, m) { define(m); }
#endif
