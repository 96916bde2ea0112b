#pragma once
// The (rows, cols) driver every log-prob / KL / elbo kernel runs on.
//
// An op is a small struct with the pointers it needs and
//   static constexpr int kRowSums;   // per-row sums it produces (0: elementwise only)
//   static constexpr int kFeatSums;  // per-column sums over rows (0, 1 or 2)
//   template <int V> void apply(int64_t row, int64_t col, acc (&sums)[..], acc (&feat)[..][V]);
//   acc finish_row(int64_t row, const acc (&sums)[..]);  // writes a row's outputs (in the
//                                                        // accumulation dtype), returns it
// `apply` handles V consecutive elements of one row (one 16-byte load per input when
// V > 1; V = 1 for single elements), adds to the row sums and the per-column sums, and
// writes any per-element gradients. The driver owns the thread mapping, the access
// widths and every reduction. The geometry is in cuda/row_plan.h (checked on the host
// by tests/test_build.py):
//
// - A task is one op over its rows x cols. A row is handled by a team of `tx` lanes
//   (a power of two); a 256-thread block holds ty = 256 / tx teams. Short rows get a
//   warp or less per row (B=65536, D=784: one warp per row, 8 rows per block); long
//   rows a whole block per row.
// - 16-byte vectors wherever the pointers allow: each row's unaligned head and tail
//   are read element by element, the body in vectors (see row_segment).
// - Row sums are reduced with warp shuffles (tx <= 32) or shuffles plus shared memory
//   (tx = 256), in a fixed order.
// - When there are too few rows to fill every SM (B=256, D=49152), each row is split
//   into `splits` column ranges handled by different blocks; each writes its partial
//   sums to a workspace, and the last block of the launch adds them in split order
//   (a thread per row for up to 32 splits, else a warp per row) and calls finish_row.
// - Per-column sums (the gradient of a per-feature or scalar log-variance) need each
//   lane to see the same columns in every row: then every lane owns exactly one
//   vector of columns (splits = ceil(cols / (tx * V))), accumulates it in registers
//   over its rows, the block reduces across its teams in shared memory, and each
//   block writes one partial row of per-column sums. The grid is then kept at about
//   one wave, so that workspace stays small (~#SMs * 8 * tx * V values), and at::sum
//   over the blocks finishes it.
// - One launch can run two tasks (the fused elbo: the log-likelihood over (x, recon)
//   and the KL over (mu, logvar)), the second's blocks after the first's, and reduce
//   a loss over both: each finished row adds coefficient * its value to its block's
//   partial; the last block to finish (a ticket counter, as in the CUDA samples'
//   threadfence reduction) finishes the split rows and adds the partials in block order.
// No float atomics anywhere, so every result is deterministic.

#include "cuda/math.cuh"

namespace vae_fast::cuda {

// One op over its rows: the plan and the workspaces the launch gives it.
template <class Op>
struct RowTask {
  using acc = typename Op::acc;
  Op op;
  RowGrid g;
  acc* row_ws = nullptr;   // split rows' partial sums (RowGrid::partial_index)
  acc* feat_ws = nullptr;  // per-column sums, [row_blocks][kFeatSums][cols]
  // When adds_loss, each row finished adds loss_coef (times *loss_coef_ptr when set:
  // a beta that stays on the device) times its value to the loss.
  bool adds_loss = false;
  acc loss_coef = acc(1);
  const acc* loss_coef_ptr = nullptr;

  __device__ __forceinline__ acc coefficient() const {
    return loss_coef_ptr != nullptr ? loss_coef * *loss_coef_ptr : loss_coef;
  }
};

// The second task of a launch that has only one.
struct NoTask {};

// What the last block of a launch does once every other block is done. `ticket` is
// zeroed before the launch; null when nothing waits for the whole grid.
template <typename scalar_t>
struct RowEpilogue {
  using acc = acc_t<scalar_t>;
  unsigned int* ticket = nullptr;
  acc* block_loss = nullptr;  // [gridDim.x] each block's part of the loss; null: no loss
  scalar_t* loss = nullptr;   // 0-d
  acc loss_scale = acc(1);    // 1 for the sum, 1/B for the mean
};

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

// Block `block` of task t, reading vectors of V = 16 bytes. Adds the loss of the
// rows it finishes to `loss`.
template <class Op>
__device__ __forceinline__ void run_task(const RowTask<Op>& t, int64_t block, typename Op::acc& loss) {
  using acc = typename Op::acc;
  constexpr int V = max_vec<typename Op::scalar>();
  constexpr int NR = Op::kRowSums > 0 ? Op::kRowSums : 1;
  constexpr int NF = Op::kFeatSums > 0 ? Op::kFeatSums : 1;
  const RowGrid& g = t.g;
  const int tx = g.tx, ty = g.ty;
  const int lane = static_cast<int>(threadIdx.x) % tx, team = static_cast<int>(threadIdx.x) / tx;
  const int32_t split = g.split_of(block);
  const int64_t row_block = g.row_block_of(block);
  const acc loss_coef = t.adds_loss ? t.coefficient() : acc(0);

  acc feat[NF][V];
#pragma unroll
  for (int q = 0; q < NF; ++q) {
#pragma unroll
    for (int i = 0; i < V; ++i) feat[q][i] = acc(0);
  }

  // The loop bound is uniform over the block, so every thread reaches the reductions.
  for (int64_t first = row_block * ty; first < g.rows; first += g.row_stride()) {
    const int64_t row = first + team;
    acc sums[NR];
#pragma unroll
    for (int j = 0; j < NR; ++j) sums[j] = acc(0);
    if (row < g.rows) {
      for_each_access(
          row_segment(g, row, split), g.vec, lane, tx,
          [&](int64_t col) { t.op.template apply<V>(row, col, sums, feat); },
          [&](int64_t col) {
            acc one[NF][1];
#pragma unroll
            for (int q = 0; q < NF; ++q) one[q][0] = acc(0);
            t.op.template apply<1>(row, col, sums, one);
            if constexpr (Op::kFeatSums > 0) {
              // Per-column sums in scalar mode: this lane's one column, slot 0.
#pragma unroll
              for (int q = 0; q < NF; ++q) feat[q][0] += one[q][0];
            }
          });
    }
    if constexpr (Op::kRowSums > 0) {
      reduce_team<NR>(sums, tx);
      if (lane == 0 && row < g.rows) {
        if (g.splits == 1) {
          const acc value = t.op.finish_row(row, sums);
          if (t.adds_loss) loss += loss_coef * value;
        } else {
#pragma unroll
          for (int j = 0; j < NR; ++j) t.row_ws[g.partial_index(j, row, split)] = sums[j];
        }
      }
    }
  }

  if constexpr (Op::kFeatSums > 0) {
    // This block's per-column sums: slot lane * vec + i holds column begin + lane * vec + i.
    const int vec = g.vec;
    const int64_t col_begin = static_cast<int64_t>(split) * g.split_cols;
    const int64_t col_end = col_begin + g.split_cols < g.cols ? col_begin + g.split_cols : g.cols;
    acc* out = t.feat_ws + row_block * NF * g.cols;
    if (ty == 1) {  // one team: every lane owns distinct columns
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t col = col_begin + static_cast<int64_t>(lane) * vec + i;
        if (i < vec && col < col_end) {
#pragma unroll
          for (int q = 0; q < NF; ++q) out[q * g.cols + col] = feat[q][i];
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
    const int tid = static_cast<int>(threadIdx.x);
    const int warp = tid / kWarp, warp_lane = tid % kWarp;
    for (int w = 0; w < kBlockThreads / kWarp; ++w) {
      if (warp == w && warp_lane < tx) {
#pragma unroll
        for (int q = 0; q < NF; ++q) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            if (i < vec) {
              acc& slot = shared[q][warp_lane * vec + i];
              slot = (w == 0 ? acc(0) : slot) + feat[q][i];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int s = tid; s < NF * tx * vec; s += kBlockThreads) {
      const int q = s / (tx * vec), o = s % (tx * vec);
      if (col_begin + o < col_end) out[q * g.cols + col_begin + o] = shared[q][o];
    }
  }
}

template <typename acc>
__device__ __forceinline__ void run_task(const NoTask&, int64_t, acc&) {}

// In the last block: adds each split row's partial sums in split order and finishes
// the row; adds the loss of those rows to `loss`. Few splits (per-column sums split
// every row of a wide input, for any number of rows): a thread per row, adding its
// splits one after another, so that 256 rows are in flight at once, not 8. Many
// splits (a few very long rows): a warp per row, each lane a fixed stride of the
// splits, then the warp's fixed shuffle tree. Either order is fixed by the shape.
template <class Op>
__device__ __forceinline__ void finish_split_rows(const RowTask<Op>& t, typename Op::acc& loss) {
  using acc = typename Op::acc;
  constexpr int NR = Op::kRowSums;
  if constexpr (NR > 0) {
    const RowGrid& g = t.g;
    if (g.splits == 1) return;
    const acc loss_coef = t.adds_loss ? t.coefficient() : acc(0);
    // Written by other blocks of this launch: read from L2 (__ldcg), never a stale L1 line.
    if (g.splits <= kWarp) {
      for (int64_t row = threadIdx.x; row < g.rows; row += kBlockThreads) {
        acc sums[NR];
#pragma unroll
        for (int j = 0; j < NR; ++j) {
          acc s = acc(0);
          for (int32_t k = 0; k < g.splits; ++k) s += __ldcg(t.row_ws + g.partial_index(j, row, k));
          sums[j] = s;
        }
        const acc value = t.op.finish_row(row, sums);
        if (t.adds_loss) loss += loss_coef * value;
      }
      return;
    }
    const int lane = static_cast<int>(threadIdx.x) % kWarp, warp = static_cast<int>(threadIdx.x) / kWarp;
    for (int64_t row = warp; row < g.rows; row += kBlockThreads / kWarp) {
      acc sums[NR];
#pragma unroll
      for (int j = 0; j < NR; ++j) {
        acc s = acc(0);
        for (int32_t k = lane; k < g.splits; k += kWarp) s += __ldcg(t.row_ws + g.partial_index(j, row, k));
        sums[j] = warp_sum(s);
      }
      if (lane == 0) {
        const acc value = t.op.finish_row(row, sums);
        if (t.adds_loss) loss += loss_coef * value;
      }
    }
  }
}

template <typename acc>
__device__ __forceinline__ void finish_split_rows(const NoTask&, acc&) {}

template <class A, class B, typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    rows_kernel(const A a, const B b, const RowEpilogue<scalar_t> e) {
  using acc = acc_t<scalar_t>;
  acc loss = acc(0);  // this thread's part of its block's loss
  const int64_t a_blocks = a.g.blocks();
  const int64_t block = blockIdx.x;
  if (block < a_blocks) {
    run_task(a, block, loss);
  } else {
    run_task(b, block - a_blocks, loss);
  }
  if (e.ticket == nullptr) return;

  if (e.block_loss != nullptr) {
    loss = block_sum(loss);
    if (threadIdx.x == 0) e.block_loss[blockIdx.x] = loss;
  }
  // Every thread makes its writes (row partials, finished rows, the block's loss)
  // visible device-wide before the block takes a ticket; the block that takes the
  // last one then sees all of them.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(e.ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();

  acc total = acc(0);
  finish_split_rows(a, total);
  finish_split_rows(b, total);
  if (e.block_loss != nullptr) {
    // Each thread a fixed stride of the blocks' parts, then the block's fixed tree:
    // the same order whichever block is last.
    for (int64_t k = threadIdx.x; k < gridDim.x; k += kBlockThreads) total += __ldcg(e.block_loss + k);
    total = block_sum(total);
    if (threadIdx.x == 0) *e.loss = static_cast<scalar_t>(total * e.loss_scale);
  }
}

template <class A, class B, typename scalar_t>
std::array<std::atomic<int>, 64>& occupancy_cache() {
  static std::array<std::atomic<int>, 64> cache{};
  return cache;
}

// What a task needs from the launch: the op, its rows x cols, how they can be read
// (vector_mode), and whether its rows add to the loss and with what coefficient.
template <class Op>
struct TaskSpec {
  using acc = typename Op::acc;
  Op op;
  int64_t rows = 0, cols = 0;
  VectorMode mode;
  bool adds_loss = false;
  acc loss_coef = acc(1);
  const acc* loss_coef_ptr = nullptr;
};

// The loss a launch reduces over the rows of its tasks that add to it, or none.
template <typename scalar_t>
struct LossSpec {
  scalar_t* loss = nullptr;  // 0-d; null: no loss
  acc_t<scalar_t> scale = acc_t<scalar_t>(1);
};

// What a launch leaves: each task's per-column sums, shape (kFeatSums, cols) in the
// accumulation dtype (undefined when it has none), and the ints zeroed for the
// caller (see launch_rows; undefined when it asked for none).
struct RowResult {
  at::Tensor a_columns, b_columns;
  at::Tensor flags;
};

namespace detail {

template <class Op>
RowTask<Op> plan_task(const TaskSpec<Op>& spec, int64_t resident, const at::TensorOptions& acc_options,
                      at::Tensor& row_ws, at::Tensor& feat_ws) {
  constexpr bool kPerColumn = Op::kFeatSums > 0;
  RowTask<Op> t;
  t.op = spec.op;
  t.g = plan_rows(spec.rows, spec.cols, spec.mode, kPerColumn, resident);
  t.adds_loss = spec.adds_loss;
  t.loss_coef = spec.loss_coef;
  t.loss_coef_ptr = spec.loss_coef_ptr;
  if (t.g.blocks() == 0) return t;
  if (Op::kRowSums > 0 && t.g.splits > 1) {
    row_ws = at::empty({Op::kRowSums * t.g.rows * t.g.splits}, acc_options);
    t.row_ws = row_ws.mutable_data_ptr<typename Op::acc>();
  }
  if (kPerColumn) {
    feat_ws = at::empty({t.g.row_blocks, Op::kFeatSums, t.g.cols}, acc_options);
    t.feat_ws = feat_ws.mutable_data_ptr<typename Op::acc>();
  }
  return t;
}

inline NoTask plan_task(const NoTask&, int64_t, const at::TensorOptions&, at::Tensor&, at::Tensor&) { return {}; }

template <class Op>
bool has_split_rows(const RowTask<Op>& t) {
  return Op::kRowSums > 0 && t.g.splits > 1 && t.g.blocks() > 0;
}
inline bool has_split_rows(const NoTask&) { return false; }

template <class Op>
int64_t blocks_of(const RowTask<Op>& t) {
  return t.g.blocks();
}
inline int64_t blocks_of(const NoTask&) { return 0; }

}  // namespace detail

// Runs task `a` and, unless `spec_b` is NoTask, task `b` in one launch on the current
// device and stream, and reduces `loss` over the rows that add to it.
//
// When the launch needs a ticket (split rows or a loss), or the caller asks for
// `flags` zeroed ints (the flag a Bernoulli op sets for targets outside [0, 1]), one
// memset zeroes them all; attach(a, b, int* flags) is called with the planned tasks
// before the launch, so that the caller can point its ops at its flags.
template <typename scalar_t, class SpecA, class SpecB, class Attach>
RowResult launch_rows(const SpecA& spec_a, const SpecB& spec_b, const LossSpec<scalar_t>& loss, int flags,
                      const Attach& attach, const at::TensorOptions& options) {
  at::Tensor ws[4];
  using A = decltype(detail::plan_task(spec_a, 0, options, ws[0], ws[1]));
  using B = decltype(detail::plan_task(spec_b, 0, options, ws[2], ws[3]));
  auto kernel = rows_kernel<A, B, scalar_t>;
  const int64_t resident = static_cast<int64_t>(sm_count()) * occupancy(kernel, occupancy_cache<A, B, scalar_t>());
  const auto acc_options = options.dtype(c10::CppTypeToScalarType<acc_t<scalar_t>>::value);
  A a = detail::plan_task(spec_a, resident, acc_options, ws[0], ws[1]);
  B b = detail::plan_task(spec_b, resident, acc_options, ws[2], ws[3]);
  const int64_t blocks = detail::blocks_of(a) + detail::blocks_of(b);
  TORCH_INTERNAL_ASSERT(blocks <= std::numeric_limits<int32_t>::max(), "vae_fast: grid too large");
  auto stream = c10::cuda::getCurrentCUDAStream();

  RowResult result;
  RowEpilogue<scalar_t> e;
  const bool reduce_loss = loss.loss != nullptr && blocks > 0;
  const bool ticket = reduce_loss || detail::has_split_rows(a) || detail::has_split_rows(b);
  if (ticket || flags > 0) {
    result.flags = at::empty({1 + flags}, options.dtype(at::kInt));
    int* ints = result.flags.mutable_data_ptr<int>();
    C10_CUDA_CHECK(cudaMemsetAsync(ints, 0, result.flags.nbytes(), stream));
    if (ticket) e.ticket = reinterpret_cast<unsigned int*>(ints);
    attach(a, b, ints + 1);
  }
  at::Tensor block_loss;
  if (reduce_loss) {
    block_loss = at::empty({blocks}, acc_options);
    e.block_loss = block_loss.mutable_data_ptr<acc_t<scalar_t>>();
    e.loss = loss.loss;
    e.loss_scale = loss.scale;
  }
  if (blocks > 0) {
    kernel<<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(a, b, e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (loss.loss != nullptr) {
    C10_CUDA_CHECK(cudaMemsetAsync(loss.loss, 0, sizeof(scalar_t), stream));  // the loss of no rows
  }
  if (ws[1].defined()) result.a_columns = ws[1].sum(0);
  if (ws[3].defined()) result.b_columns = ws[3].sum(0);
  return result;
}

// The same for one task that needs no flags.
template <typename scalar_t, class Op>
RowResult launch_rows(const TaskSpec<Op>& spec, const at::TensorOptions& options) {
  return launch_rows<scalar_t>(spec, NoTask{}, LossSpec<scalar_t>{}, 0, [](auto&, auto&, int*) {}, options);
}

// The gradient of a scalar or per-feature operand, in the operand's layout (1 or cols
// elements, common/kernels.h), from its per-column sums (cols, accumulation dtype).
inline void write_column_gradient(Broadcast kind, const at::Tensor& columns, const at::Tensor& grad) {
  grad.copy_(kind == Broadcast::kScalar ? columns.sum().reshape({1}) : columns);
}

}  // namespace vae_fast::cuda
