#pragma once
// The row driver's geometry and index math (cuda/rows.cuh): how a (rows, cols) task is
// cut into blocks, teams and lanes, and which columns each lane reads in which access
// width. Free of CUDA headers, so that a host compiler can check it: tests/test_build.py
// compiles a small program against this header with g++ and walks every block, team
// and lane of thousands of planned grids, checking that every element is visited
// exactly once and that every vector access is aligned.

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define VAE_FAST_HOST_DEVICE __host__ __device__ __forceinline__
// for_each_access is called with device lambdas from kernels and host lambdas from the
// test: the pragma stops nvcc from checking the host instantiation it never emits.
#define VAE_FAST_NO_EXEC_CHECK _Pragma("nv_exec_check_disable")
#else
#define VAE_FAST_HOST_DEVICE inline
#define VAE_FAST_NO_EXEC_CHECK
#endif

namespace vae_fast::cuda {

// Every row kernel runs 256-thread blocks: 8 per SM at full occupancy.
constexpr int kBlockThreads = 256;
constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// How a task's pointers allow it to be read: `vec` elements per access (1, or the
// kernel's 16-byte width V) and, for vec > 1, how many elements past a vec-aligned
// address the first element of row 0 lies (the same for every pointer of the task).
struct VectorMode {
  int vec = 1;
  int misalign = 0;
};

// `mode` for a task whose x is shared by the samples (`x_rows` > 0: row r reads x's
// row r % x_rows, which starts x_rows * cols elements before the others' row r once
// r >= x_rows): the rows keep one vector alignment only when x_rows rows span whole
// vectors; otherwise element by element.
inline VectorMode with_shared_x(VectorMode mode, int64_t cols, int64_t x_rows) {
  if (x_rows > 0 && (x_rows * cols) % mode.vec != 0) return VectorMode{1, 0};
  return mode;
}

struct RowGrid {
  int64_t rows = 0, cols = 0;
  int64_t split_cols = 0;  // columns per split, a multiple of vec
  int32_t splits = 1;
  int32_t row_blocks = 0;  // blocks along the rows; the task runs row_blocks * splits blocks
  int32_t tx = 1, ty = kBlockThreads;  // lanes per row (a power of two), rows per block
  int32_t vec = 1, misalign = 0;       // the VectorMode

  VAE_FAST_HOST_DEVICE int64_t blocks() const { return static_cast<int64_t>(row_blocks) * splits; }
  // Block b of the task handles split b % splits of the rows of row block b / splits:
  // its team t handles rows row_block * ty + t, then every row_blocks * ty rows after.
  VAE_FAST_HOST_DEVICE int32_t split_of(int64_t block) const { return static_cast<int32_t>(block % splits); }
  VAE_FAST_HOST_DEVICE int64_t row_block_of(int64_t block) const { return block / splits; }
  VAE_FAST_HOST_DEVICE int64_t row_stride() const { return static_cast<int64_t>(row_blocks) * ty; }
  // Where split `split` of row `row` leaves row sum j when splits > 1: each row's
  // partials lie side by side, so that one warp reads them in one pass.
  VAE_FAST_HOST_DEVICE int64_t partial_index(int j, int64_t row, int32_t split) const {
    return (static_cast<int64_t>(j) * rows + row) * splits + split;
  }
};

// Plans the grid for a task of `rows` x `cols` elements read as `mode` says. `resident`
// is the number of blocks the GPU runs at once (SMs x blocks per SM). With per-column
// sums, every lane must see the same columns in every row: the caller then passes
// vec = 1 unless every row starts vector-aligned (misalign 0, cols % vec == 0).
inline RowGrid plan_rows(int64_t rows, int64_t cols, VectorMode mode, bool per_column, int64_t resident) {
  RowGrid g;
  g.rows = rows;
  g.cols = cols;
  g.vec = mode.vec;
  g.misalign = mode.vec > 1 ? mode.misalign : 0;
  const int64_t vectors = ceil_div(cols, g.vec);  // per row
  if (vectors <= kWarp) {
    g.tx = next_pow2(std::max<int64_t>(vectors, 1));  // one vector per lane
  } else if (vectors < 2048) {
    g.tx = kWarp;  // a warp per row, up to 64 vectors per lane
  } else {
    g.tx = kBlockThreads;  // a block per row
  }
  g.ty = kBlockThreads / g.tx;
  const int64_t row_blocks = ceil_div(rows, g.ty);
  int64_t splits = 1;
  if (per_column) {
    splits = std::max<int64_t>(ceil_div(vectors, g.tx), 1);  // one vector per lane and row
  } else if (row_blocks < resident) {
    // Too few rows to fill the GPU: split rows, keeping >= 4 vectors per lane.
    // Rounded down, so that all blocks are resident at once (one wave, no tail):
    // this leaves at most half the slots idle, still plenty of loads in flight.
    const int64_t max_splits = std::max<int64_t>(vectors / (4 * g.tx), 1);
    splits = std::min(max_splits, std::max<int64_t>(resident / std::max<int64_t>(row_blocks, 1), 1));
  }
  const int64_t split_vectors = std::max<int64_t>(ceil_div(vectors, splits), 1);
  g.split_cols = split_vectors * g.vec;
  g.splits = static_cast<int32_t>(std::max<int64_t>(ceil_div(cols, g.split_cols), 1));
  // Exactly one wave of blocks when per-column sums are kept per block (a block in
  // a second wave would loop over as many rows as a whole first-wave block, alone);
  // otherwise up to four waves. Blocks loop over rows with a grid stride.
  const int64_t waves = per_column ? 1 : 4;
  const int64_t wanted = std::max<int64_t>(resident * waves / g.splits, 1);
  g.row_blocks = static_cast<int32_t>(std::min(row_blocks, wanted));
  return g;
}

// The columns [begin, end) of one row in one split, cut where vector accesses can
// start: a head up to the first vec-aligned element, a body [body_begin, body_end)
// of whole aligned vectors and a tail, each edge shorter than a vector. An odd column
// count or a pointer off 16-byte alignment costs only these edges, not vectors for
// the whole task. In scalar mode (vec == 1) the body is empty: every column is an edge.
struct Segment {
  int64_t begin = 0, body_begin = 0, body_end = 0, end = 0;

  VAE_FAST_HOST_DEVICE int64_t edges() const { return (body_begin - begin) + (end - body_end); }
  // The column of edge element k < edges(): the head's, then the tail's.
  VAE_FAST_HOST_DEVICE int64_t edge_col(int64_t k) const {
    const int64_t head = body_begin - begin;
    return k < head ? begin + k : body_end + (k - head);
  }
};

VAE_FAST_HOST_DEVICE Segment row_segment(const RowGrid& g, int64_t row, int32_t split) {
  Segment s;
  s.begin = static_cast<int64_t>(split) * g.split_cols;
  s.end = s.begin + g.split_cols < g.cols ? s.begin + g.split_cols : g.cols;
  if (g.vec == 1) {
    s.body_begin = s.body_end = s.begin;
    return s;
  }
  const int64_t mask = g.vec - 1;  // vec is a power of two
  const int64_t head = (g.vec - ((g.misalign + row * g.cols + s.begin) & mask)) & mask;
  s.body_begin = s.begin + head < s.end ? s.begin + head : s.end;
  s.body_end = s.body_begin + ((s.end - s.body_begin) & ~mask);
  return s;
}

// What lane `lane` of a `tx`-lane team reads of segment `s`: vector(col) for each
// aligned vector of `vec` columns from col, then element(col) for each edge column.
// Consecutive lanes take consecutive vectors (coalesced), then consecutive edges.
VAE_FAST_NO_EXEC_CHECK
template <class Vector, class Element>
VAE_FAST_HOST_DEVICE void for_each_access(const Segment& s, int vec, int lane, int tx, Vector&& vector,
                                          Element&& element) {
  for (int64_t col = s.body_begin + static_cast<int64_t>(lane) * vec; col < s.body_end;
       col += static_cast<int64_t>(tx) * vec) {
    vector(col);
  }
  const int64_t edges = s.edges();
  for (int64_t k = lane; k < edges; k += tx) element(s.edge_col(k));
}

}  // namespace vae_fast::cuda
