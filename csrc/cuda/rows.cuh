#pragma once
// The (rows, cols) driver every log-prob / KL / elbo kernel runs on.
//
// An op is a small struct with the pointers it needs and
//   static constexpr int kRowSums;   // per-row sums it produces (0: elementwise only)
//   static constexpr int kFeatSums;  // per-column sums over rows (0, 1 or 2)
//   template <int V> void apply(int64_t row, int64_t col, acc (&sums)[..], acc (&feat)[..][V]);
//   void finish_row(int64_t row, const acc (&sums)[..]);   // writes a row's outputs
// `apply` handles V consecutive elements of one row (one 16-byte load per input when
// V > 1), adds to the row sums and the per-column sums, and writes any per-element
// gradients. The driver owns the thread mapping and every reduction:
//
// - A row is handled by a team of `tx` threads (a power of two); a 256-thread block
//   holds ty = 256 / tx teams. Short rows get a warp or less per row (B=65536, D=784:
//   one warp per row, 8 rows per block); long rows a whole block per row.
// - Row sums are reduced with warp shuffles (tx <= 32) or shuffles plus shared memory
//   (tx = 256), in a fixed order.
// - When there are too few rows to fill every SM (B=256, D=49152), each row is split
//   into `splits` column ranges handled by different blocks; each writes its partial
//   sums to a workspace and a second, tiny kernel adds them in split order and calls
//   finish_row. No float atomics anywhere, so results are deterministic.
// - Per-column sums (the gradient of a per-feature or scalar log-variance) need each
//   thread to see the same columns in every row it visits: then every thread owns
//   exactly one vector of columns (splits = ceil(cols / (tx * V))), accumulates it in
//   registers over its rows, the block reduces across its teams in shared memory, and
//   each block writes one partial row of per-column sums. The grid is then kept at
//   about one wave, so that workspace stays small (~#SMs * 8 * tx * V values), and
//   at::sum over the blocks finishes it.

#include "cuda/utils.cuh"

namespace vae_fast::cuda {

struct RowGrid {
  int64_t rows = 0, cols = 0;
  int64_t split_cols = 0;  // columns per split, a multiple of the vector width
  int32_t splits = 1;
  int32_t row_blocks = 1;  // blocks along the rows; the grid is row_blocks * splits
  int32_t tx = 1, ty = kBlockThreads;
};

// Plans the grid for `rows` x `cols` elements read `vec` at a time. `resident` is
// the number of blocks the GPU runs at once (SMs x blocks per SM).
inline RowGrid plan_rows(int64_t rows, int64_t cols, int vec, bool per_column, int64_t resident) {
  RowGrid g;
  g.rows = rows;
  g.cols = cols;
  const int64_t vectors = ceil_div(cols, vec);  // per row
  if (vectors <= kWarp) {
    g.tx = next_pow2(std::max<int64_t>(vectors, 1));  // one vector per thread
  } else if (vectors < 2048) {
    g.tx = kWarp;  // a warp per row, up to 64 vectors per thread
  } else {
    g.tx = kBlockThreads;  // a block per row
  }
  g.ty = kBlockThreads / g.tx;
  const int64_t row_blocks = std::max<int64_t>(ceil_div(rows, g.ty), 1);
  int64_t splits = 1;
  if (per_column) {
    splits = std::max<int64_t>(ceil_div(vectors, g.tx), 1);  // one vector per thread and row
  } else if (row_blocks < resident) {
    // Too few rows to fill the GPU: split rows, keeping >= 4 vectors per thread.
    // Rounded down, so that all blocks are resident at once (one wave, no tail):
    // this leaves at most half the slots idle, still plenty of loads in flight.
    const int64_t max_splits = std::max<int64_t>(vectors / (4 * g.tx), 1);
    splits = std::min(max_splits, std::max<int64_t>(resident / row_blocks, 1));
  }
  const int64_t split_vectors = std::max<int64_t>(ceil_div(vectors, splits), 1);
  g.split_cols = split_vectors * vec;
  g.splits = static_cast<int32_t>(std::max<int64_t>(ceil_div(cols, g.split_cols), 1));
  // Exactly one wave of blocks when per-column sums are kept per block (a block in
  // a second wave would loop over as many rows as a whole first-wave block, alone);
  // otherwise up to four waves. Blocks loop over rows with a grid stride.
  const int64_t waves = per_column ? 1 : 4;
  const int64_t wanted = std::max<int64_t>(resident * waves / g.splits, 1);
  g.row_blocks = static_cast<int32_t>(std::min(row_blocks, wanted));
  return g;
}

// Reduces the row sums of one team. Every thread of the block must call it (it may
// synchronize); lane 0 of each team gets the team's total.
template <int N, typename acc>
__device__ __forceinline__ void reduce_team(acc (&sums)[N], int tx) {
  if (tx <= kWarp) {
#pragma unroll
    for (int j = 0; j < N; ++j) sums[j] = warp_sum(sums[j], tx);
  } else {
    // One team per block (ty == 1).
    __shared__ acc partial[N][kWarp];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      sums[j] = warp_sum(sums[j]);
      if (lane == 0) partial[j][warp] = sums[j];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        acc total = acc(0);
        for (int w = 0; w < tx / kWarp; ++w) total += partial[j][w];
        sums[j] = total;
      }
    }
    __syncthreads();
  }
}

template <int V, class Op>
__global__ void __launch_bounds__(kBlockThreads)
    rows_kernel(const Op op, const RowGrid g, typename Op::acc* __restrict__ row_ws,
                typename Op::acc* __restrict__ feat_ws) {
  using acc = typename Op::acc;
  constexpr int NR = Op::kRowSums > 0 ? Op::kRowSums : 1;
  constexpr int NF = Op::kFeatSums > 0 ? Op::kFeatSums : 1;
  const int tx = g.tx, ty = g.ty;
  const int lane = threadIdx.x, team = threadIdx.y;
  const int split = static_cast<int>(blockIdx.x % g.splits);
  const int64_t row_block = blockIdx.x / g.splits;
  const int64_t col_begin = static_cast<int64_t>(split) * g.split_cols;
  const int64_t col_end = col_begin + g.split_cols < g.cols ? col_begin + g.split_cols : g.cols;
  // Per-column mode: this thread's one vector of columns, the same in every row.
  const int64_t my_col = col_begin + static_cast<int64_t>(lane) * V;

  acc feat[NF][V];
#pragma unroll
  for (int q = 0; q < NF; ++q) {
#pragma unroll
    for (int i = 0; i < V; ++i) feat[q][i] = acc(0);
  }

  // The loop bound is uniform over the block, so every thread reaches the reductions.
  for (int64_t first = row_block * ty; first < g.rows; first += static_cast<int64_t>(g.row_blocks) * ty) {
    const int64_t row = first + team;
    acc sums[NR];
#pragma unroll
    for (int j = 0; j < NR; ++j) sums[j] = acc(0);
    if (row < g.rows) {
      if constexpr (Op::kFeatSums > 0) {
        if (my_col < col_end) op.template apply<V>(row, my_col, sums, feat);
      } else {
        for (int64_t col = my_col; col < col_end; col += static_cast<int64_t>(tx) * V) {
          op.template apply<V>(row, col, sums, feat);
        }
      }
    }
    if constexpr (Op::kRowSums > 0) {
      reduce_team<NR>(sums, tx);
      if (lane == 0 && row < g.rows) {
        if (g.splits == 1) {
          op.finish_row(row, sums);
        } else {
#pragma unroll
          for (int j = 0; j < NR; ++j) row_ws[(static_cast<int64_t>(j) * g.splits + split) * g.rows + row] = sums[j];
        }
      }
    }
  }

  if constexpr (Op::kFeatSums > 0) {
    // This block's per-column sums, layout [row_blocks][NF][cols].
    acc* out = feat_ws + row_block * NF * g.cols;
    if (ty == 1) {  // one team: every thread owns distinct columns
      if (my_col < col_end) {
#pragma unroll
        for (int q = 0; q < NF; ++q) {
#pragma unroll
          for (int i = 0; i < V; ++i) out[q * g.cols + my_col + i] = feat[q][i];
        }
      }
      return;
    }
    // Several teams share the same columns: first the teams inside a warp (lanes
    // that differ in a bit >= tx), then the warps in order through shared memory.
    __shared__ acc shared[NF][kWarp * V];
#pragma unroll
    for (int q = 0; q < NF; ++q) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        for (int off = tx; off < kWarp; off <<= 1) feat[q][i] += __shfl_xor_sync(0xffffffffu, feat[q][i], off);
      }
    }
    const int tid = team * tx + lane;
    const int warp = tid / kWarp, warp_lane = tid % kWarp;
    for (int w = 0; w < kBlockThreads / kWarp; ++w) {
      if (warp == w && warp_lane < tx) {
#pragma unroll
        for (int q = 0; q < NF; ++q) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            acc& slot = shared[q][warp_lane * V + i];
            slot = (w == 0 ? acc(0) : slot) + feat[q][i];
          }
        }
      }
      __syncthreads();
    }
    for (int t = tid; t < NF * tx * V; t += kBlockThreads) {
      const int q = t / (tx * V), o = t % (tx * V);
      if (col_begin + o < col_end) out[q * g.cols + col_begin + o] = shared[q][o];
    }
  }
}

// Adds the per-split row sums in split order and finishes each row.
template <class Op>
__global__ void __launch_bounds__(kBlockThreads)
    finish_rows_kernel(const Op op, int64_t rows, int32_t splits, const typename Op::acc* __restrict__ row_ws) {
  using acc = typename Op::acc;
  constexpr int NR = Op::kRowSums;
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc sums[NR];
#pragma unroll
    for (int j = 0; j < NR; ++j) {
      acc s = acc(0);
      for (int32_t k = 0; k < splits; ++k) s += row_ws[(static_cast<int64_t>(j) * splits + k) * rows + row];
      sums[j] = s;
    }
    op.finish_row(row, sums);
  }
}

template <int V, class Op>
std::array<std::atomic<int>, 64>& occupancy_cache() {
  static std::array<std::atomic<int>, 64> cache{};
  return cache;
}

// Runs `op` over a rows x cols matrix on the current device and stream, V elements
// per access. Returns the per-column sums, shape (kFeatSums, cols) in the
// accumulation dtype, when the op has any (an undefined tensor otherwise).
template <int V, class Op>
at::Tensor launch_rows(const Op& op, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  if (rows == 0) return at::Tensor();
  constexpr bool kPerColumn = Op::kFeatSums > 0;
  auto kernel = rows_kernel<V, Op>;
  const int64_t resident = static_cast<int64_t>(sm_count()) * occupancy(kernel, occupancy_cache<V, Op>());
  const RowGrid g = plan_rows(rows, cols, V, kPerColumn, resident);
  const auto acc_options = options.dtype(c10::CppTypeToScalarType<typename Op::acc>::value);
  at::Tensor row_ws, feat_ws;
  if (Op::kRowSums > 0 && g.splits > 1) row_ws = at::empty({Op::kRowSums * g.splits * rows}, acc_options);
  if (kPerColumn) feat_ws = at::empty({g.row_blocks, Op::kFeatSums, cols}, acc_options);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(g.tx, g.ty);
  const int64_t blocks = static_cast<int64_t>(g.row_blocks) * g.splits;
  TORCH_INTERNAL_ASSERT(blocks <= std::numeric_limits<int32_t>::max(), "vae_fast: grid too large");
  kernel<<<static_cast<unsigned>(blocks), block, 0, stream>>>(
      op, g, row_ws.defined() ? row_ws.mutable_data_ptr<typename Op::acc>() : nullptr,
      feat_ws.defined() ? feat_ws.mutable_data_ptr<typename Op::acc>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (Op::kRowSums > 0) {
    if (g.splits > 1) {
      const auto finish_blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kBlockThreads), 4096));
      finish_rows_kernel<Op><<<finish_blocks, kBlockThreads, 0, stream>>>(
          op, rows, g.splits, row_ws.const_data_ptr<typename Op::acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return kPerColumn ? feat_ws.sum(0) : at::Tensor();
}

// Calls body(std::integral_constant<int, V>) with the widest vector V that divides
// cols and keeps every pointer 16-byte aligned, or V = 1.
template <typename scalar_t, class Body>
void with_vector_width(int64_t cols, std::initializer_list<const void*> ptrs, const Body& body) {
  constexpr int kVec = max_vec<scalar_t>();
  if (cols % kVec == 0 && all_aligned(ptrs, sizeof(scalar_t) * kVec)) {
    body(std::integral_constant<int, kVec>());
  } else {
    body(std::integral_constant<int, 1>());
  }
}

// The gradient of a broadcast operand from its per-column sums (kScalar, kFeature)
// or its per-element buffer (kElement, in x's shape), in the original's shape.
inline at::Tensor operand_gradient(const BroadcastOperand& op, const at::Tensor& per_column,
                                   const at::Tensor& per_element, const at::Tensor& x,
                                   const at::Tensor& original) {
  switch (op.kind) {
    case Broadcast::kScalar:
      return per_column.sum().to(original.scalar_type()).reshape(original.sizes());
    case Broadcast::kFeature:
      return per_column.to(original.scalar_type()).reshape(original.sizes());
    case Broadcast::kElement:
    default:
      return gradient_in_shape(per_element.view(x.sizes()), original);
  }
}

}  // namespace vae_fast::cuda
