#pragma once
// Allocation of the large full-size outputs the kernels write (on the CPU reused
// across calls; on other devices as at::empty).

#include <ATen/core/Tensor.h>

namespace vae_fast {

// An uninitialised tensor like at::empty, for the full-size outputs (gradients) the
// kernels write. On the CPU, outputs of 128 KiB (glibc's mmap threshold) and more come
// from an allocator that keeps the last blocks freed for the next outputs that fit (see
// allocation.cpp): a training loop allocates the same gradients every step, and glibc,
// whose heap the step's other large temporaries churn, would otherwise map them afresh,
// each first touch of a page a fault (at 8192 x 784 floats, about 200 faults and half
// the kernel's time again when eager torch ran in between; at 128 x 784, a third of a
// one-thread forward+backward). Blocks of 32 MiB and more are 2 MiB-aligned and advised
// for transparent huge pages: a 4096 x 12288 float gradient costs about 100 ms of 4 KiB
// faults against ~20 ms on huge pages (torch does the same for every allocation under
// THP_MEM_ALLOC_ENABLE=1; VAE_FAST_HUGE_PAGES=0 turns it off for ours).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// An output slot the caller did not ask for: empty, in like's dtype and device (every
// schema slot returns a Tensor; the Python layer reads an empty one as "none").
inline at::Tensor not_wanted(const at::Tensor& like) { return like.new_empty({0}); }

// empty_output of `sizes` in like's dtype and device when `wanted`, else not_wanted.
inline at::Tensor output_if(bool wanted, at::IntArrayRef sizes, const at::Tensor& like) {
  return wanted ? empty_output(sizes, like.options()) : not_wanted(like);
}

}  // namespace vae_fast
