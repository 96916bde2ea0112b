// empty_output (common/allocation.h): large CPU outputs, reused across calls.

#include "common/allocation.h"

#include <ATen/ops/empty.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vae_fast {
namespace {

constexpr size_t kPage = size_t{4} << 10;
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kCachedThreshold = size_t{128} << 10;
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

// The last kCachedBlocks blocks freed are kept for the next outputs that fit them (no
// more than twice their size): a training step allocates the same few gradients every
// step (recon's, mu's and logvar's), and a reused block skips both the page faults and
// the kernel's huge-page compaction, whose stalls reached ~250 ms per 200 MB block on a
// fragmented machine. While no output is alive the cache holds what one step's outputs
// held (left to the OS at exit).
constexpr size_t kCachedBlocks = 4;
std::mutex cache_mutex;
std::deque<Block*> cached_blocks;  // most recently freed first

void release(Block* block) {
  std::free(block->ptr);
  delete block;
}

void free_block(void* context) {
  auto* block = static_cast<Block*>(context);
  report(block->ptr, -static_cast<int64_t>(block->nbytes));
  Block* evicted = nullptr;
  {
    const std::lock_guard<std::mutex> lock(cache_mutex);
    cached_blocks.push_front(block);
    if (cached_blocks.size() > kCachedBlocks) {
      evicted = cached_blocks.back();
      cached_blocks.pop_back();
    }
  }
  if (evicted != nullptr) release(evicted);
}

// The smallest cached block that fits `rounded` bytes without wasting half of itself.
Block* take_cached(size_t rounded) {
  const std::lock_guard<std::mutex> lock(cache_mutex);
  auto best = cached_blocks.end();
  for (auto it = cached_blocks.begin(); it != cached_blocks.end(); ++it) {
    const size_t size = (*it)->nbytes;
    if (size >= rounded && size / 2 <= rounded &&
        (best == cached_blocks.end() || size < (*best)->nbytes)) {
      best = it;
    }
  }
  if (best == cached_blocks.end()) return nullptr;
  Block* block = *best;
  cached_blocks.erase(best);
  return block;
}

// On by default; VAE_FAST_HUGE_PAGES=0 turns it off (with THP defrag "madvise" the
// kernel may compact memory at fault time, which a fragmented machine may not want).
bool huge_pages_requested() {
  static const bool requested = [] {
    const char* value = std::getenv("VAE_FAST_HUGE_PAGES");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return requested;
}

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const bool huge = nbytes >= kHugeThreshold && huge_pages_requested();
    const size_t unit = huge ? kHugePage : kPage;
    const size_t rounded = (nbytes + unit - 1) / unit * unit;
    if (Block* block = take_cached(rounded)) {
      report(block->ptr, static_cast<int64_t>(block->nbytes));
      return {block->ptr, block, &free_block, c10::Device(c10::DeviceType::CPU)};
    }
    void* ptr = nullptr;
    if (posix_memalign(&ptr, unit, rounded) != 0 || ptr == nullptr) {
      TORCH_CHECK(false, "vae_fast: out of memory allocating ", nbytes, " bytes");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: a refusal is harmless
#endif
    report(ptr, static_cast<int64_t>(rounded));
    return {ptr, new Block{ptr, rounded}, &free_block, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

OutputAllocator output_allocator;

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (options.device().type() != c10::DeviceType::CPU || nbytes < kCachedThreshold) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &output_allocator,
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

}  // namespace vae_fast
