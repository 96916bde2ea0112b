// empty_output (common/allocation.h): CPU outputs of 32 MiB and more from huge pages.

#include "common/allocation.h"

#include <ATen/ops/empty.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vae_fast {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugeThreshold = size_t{32} << 20;

// The block's size travels with its DataPtr so that freeing it can be reported
// to torch's profiler (memory profiles and benchmarks see these allocations).
struct Block {
  void* ptr;
  size_t nbytes;
};

std::atomic<size_t> allocated_bytes{0};

void report(void* ptr, int64_t delta) {
  const size_t total = allocated_bytes.fetch_add(delta) + delta;
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(ptr, delta, total, total, c10::Device(c10::DeviceType::CPU));
  }
}

// One freed block is kept for the next large gradient that fits it (no more than
// twice its size): a training loop allocates the same gradient every step, and the
// reused block skips both the page faults and the kernel's huge-page compaction,
// whose stalls reached ~250 ms per 200 MB block on a fragmented machine. It holds
// at most one gradient's memory while no gradient is alive (left to the OS at exit).
std::mutex cache_mutex;
Block* cached_block = nullptr;

void release(Block* block) {
  std::free(block->ptr);
  delete block;
}

void free_huge(void* context) {
  auto* block = static_cast<Block*>(context);
  report(block->ptr, -static_cast<int64_t>(block->nbytes));
  Block* evicted = nullptr;
  {
    const std::lock_guard<std::mutex> lock(cache_mutex);
    evicted = std::exchange(cached_block, block);  // keep the most recent
  }
  if (evicted != nullptr) release(evicted);
}

Block* take_cached(size_t rounded) {
  const std::lock_guard<std::mutex> lock(cache_mutex);
  if (cached_block == nullptr || cached_block->nbytes < rounded ||
      cached_block->nbytes / 2 > rounded) {
    return nullptr;
  }
  return std::exchange(cached_block, nullptr);
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    if (Block* block = take_cached(rounded)) {
      report(block->ptr, static_cast<int64_t>(block->nbytes));
      return {block->ptr, block, &free_huge, c10::Device(c10::DeviceType::CPU)};
    }
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, rounded) != 0 || ptr == nullptr) {
      TORCH_CHECK(false, "vae_fast: out of memory allocating ", nbytes, " bytes");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: a refusal is harmless
#endif
    report(ptr, static_cast<int64_t>(rounded));
    return {ptr, new Block{ptr, rounded}, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

HugePageAllocator huge_page_allocator;

// On by default; VAE_FAST_HUGE_PAGES=0 turns it off (with THP defrag "madvise" the
// kernel may compact memory at fault time, which a fragmented machine may not want).
bool huge_pages_requested() {
  static const bool requested = [] {
    const char* value = std::getenv("VAE_FAST_HUGE_PAGES");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return requested;
}

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (options.device().type() != c10::DeviceType::CPU || nbytes < kHugeThreshold ||
      !huge_pages_requested()) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &huge_page_allocator,
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

}  // namespace vae_fast
