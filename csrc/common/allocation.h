#pragma once
// Allocation of the large full-size outputs the kernels write (on the CPU from
// huge pages; on other devices as at::empty).

#include <ATen/core/Tensor.h>

namespace vae_fast {

// An uninitialised tensor like at::empty. On the CPU, blocks of 32 MiB and more come
// from 2 MiB-aligned memory advised for transparent huge pages: glibc maps blocks
// that large afresh on every call, and first-touch page faults on 4 KiB pages
// cost more than the kernel itself (about 100 ms for a 4096 x 12288 float
// gradient, against ~20 ms with huge pages). Torch does the same for every
// allocation under THP_MEM_ALLOC_ENABLE=1; this applies it to our outputs only.
// The last such block freed is kept for the next one that fits (see allocation.cpp).
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace vae_fast
