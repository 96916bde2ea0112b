#pragma once
// The per-element maths of the log-likelihoods and the KL, as ops for the row driver
// (cuda/rows.cuh), and how each is filled from its arguments (common/kernels.h).
// Shared by the single ops and the fused elbo. Each op computes
// in the accumulation type; a gradient is written only where its pointer is set and
// is scaled by `scale` times the row's weight (the incoming per-row gradient) when
// `row_weight` is set. The formulas are those of vae_fast/reference.py.

#include "common/kernels.h"
#include "cuda/rows.cuh"

namespace vae_fast::cuda {
// The ops live in an anonymous namespace, so every .cu that includes this gets its
// own kernels (rows_kernel<V, Op> takes internal linkage from Op): no kernel is
// shared between translation units, whose device code is compiled separately.
namespace {

template <typename scalar_t>
struct RowWeight {
  using acc = acc_t<scalar_t>;
  const scalar_t* row_weight = nullptr;  // (rows) or null
  acc scale = acc(1);
  const acc* scale_ptr = nullptr;  // multiplies scale when set: a beta that stays on the device

  __device__ __forceinline__ acc operator()(int64_t row) const {
    const acc s = scale_ptr != nullptr ? scale * *scale_ptr : scale;
    return row_weight != nullptr ? s * static_cast<acc>(row_weight[row]) : s;
  }
};

// Bernoulli(logits): x*l - softplus(l); d/dx = l, d/dl = x - sigmoid(l).
template <typename scalar_t, bool kLogProb>
struct BernoulliRows {
  using scalar = scalar_t;
  using acc = acc_t<scalar_t>;
  static constexpr int kRowSums = kLogProb ? 1 : 0;
  static constexpr int kFeatSums = 0;

  const scalar_t* x = nullptr;
  const scalar_t* logits = nullptr;
  RowWeight<scalar_t> weight;
  scalar_t* grad_x = nullptr;
  scalar_t* grad_logits = nullptr;
  acc* log_prob = nullptr;  // rows in the accumulation dtype
  int* found_outside = nullptr;  // set to 1 when an x lies outside [0, 1] (null: not checked)
  int64_t cols = 0;
  int64_t x_rows = 0;  // > 0: x broadcast over samples, row r reads x's row r % x_rows

  template <int V>
  __device__ __forceinline__ void apply(int64_t row, int64_t col, acc (&sums)[1], acc (&)[1][V]) const {
    const int64_t off = row * cols + col;
    acc xv[V], lv[V], gx[V], gl[V];
    load_vec<V>(x + (x_rows > 0 ? row % x_rows * cols + col : off), xv);
    load_vec<V>(logits + off, lv);
    if (found_outside != nullptr) {
      bool outside = false;
#pragma unroll
      for (int i = 0; i < V; ++i) outside |= (xv[i] < acc(0)) | (xv[i] > acc(1));  // NaN: false
      if (outside) *found_outside = 1;  // every writer stores the same value
    }
    const acc w = (grad_x != nullptr || grad_logits != nullptr) ? weight(row) : acc(0);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const BernoulliTerms<acc> s = bernoulli_terms(xv[i], lv[i]);
      if constexpr (kLogProb) sums[0] += s.log_prob;
      gl[i] = s.residual * w;
      // d/dx = l, but 0 where the term is its limit 0 (x = 1 at l = +inf, x = 0 at l = -inf).
      const bool at_limit = isinf(lv[i]) && xv[i] == (lv[i] > acc(0) ? acc(1) : acc(0));
      gx[i] = (at_limit ? acc(0) : lv[i]) * w;  // (times w: a NaN weight stays NaN)
    }
    if (grad_logits != nullptr) store_vec<V>(grad_logits + off, gl);
    if (grad_x != nullptr) store_vec<V>(grad_x + off, gx);
  }

  __device__ __forceinline__ acc finish_row(int64_t row, const acc (&sums)[1]) const {
    log_prob[row] = sums[0];
    return sums[0];
  }
};

// Normal(mean, exp(logvar)): -0.5*(log(2pi) + lv + (x-m)^2 exp(-lv)). The row sum
// accumulates lv + (x-m)^2 exp(-lv); finish_row adds cols*log(2pi) and scales.
// A per-element logvar gradient is written to grad_logvar; a scalar or per-feature
// one (kPerColumn) is accumulated per column by the driver.
template <typename scalar_t, bool kLogProb, bool kPerColumn>
struct GaussianRows {
  using scalar = scalar_t;
  using acc = acc_t<scalar_t>;
  static constexpr int kRowSums = kLogProb ? 1 : 0;
  static constexpr int kFeatSums = kPerColumn ? 1 : 0;

  const scalar_t* x = nullptr;
  const scalar_t* mean = nullptr;
  Operand<scalar_t> logvar;
  RowWeight<scalar_t> weight;
  scalar_t* grad_x = nullptr;
  scalar_t* grad_mean = nullptr;
  scalar_t* grad_logvar = nullptr;  // kElement logvar only: (rows, cols)
  acc* log_prob = nullptr;  // rows in the accumulation dtype
  int64_t cols = 0;
  int64_t x_rows = 0;  // > 0: x broadcast over samples, row r reads x's row r % x_rows

  template <int V>
  __device__ __forceinline__ void apply(int64_t row, int64_t col, acc (&sums)[1], acc (&feat)[1][V]) const {
    const int64_t off = row * cols + col;
    acc xv[V], mv[V], lv[V], gx[V], gm[V], gl[V];
    load_vec<V>(x + (x_rows > 0 ? row % x_rows * cols + col : off), xv);
    load_vec<V>(mean + off, mv);
    load_operand<V>(logvar, off, col, lv);
    const bool grads = kPerColumn || grad_x != nullptr || grad_mean != nullptr || grad_logvar != nullptr;
    const acc w = grads ? weight(row) : acc(0);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const acc diff = xv[i] - mv[i];
      // (x - mean) * exp(-logvar), not / exp(logvar): no inf/inf at logvar = +-80.
      const acc scaled = diff * exp_(-lv[i]);
      const acc sq = diff * scaled;
      if constexpr (kLogProb) sums[0] += lv[i] + sq;
      gm[i] = scaled * w;
      gx[i] = -gm[i];
      gl[i] = acc(0.5) * (sq - acc(1)) * w;
      if constexpr (kPerColumn) feat[0][i] += gl[i];
    }
    if (grad_mean != nullptr) store_vec<V>(grad_mean + off, gm);
    if (grad_x != nullptr) store_vec<V>(grad_x + off, gx);
    if (grad_logvar != nullptr) store_vec<V>(grad_logvar + off, gl);
  }

  __device__ __forceinline__ acc finish_row(int64_t row, const acc (&sums)[1]) const {
    const acc log_norm = static_cast<acc>(cols) * static_cast<acc>(kLog2Pi);
    const acc value = acc(-0.5) * (log_norm + sums[0]);
    log_prob[row] = value;
    return value;
  }
};

// KL(N(mu, e^lv) || N(pm, e^plv)) = 0.5*(expm1(d) - d + (mu-pm)^2 e^-plv), d = lv - plv.
// Absent priors read as 0 (the standard normal). Prior gradients of a scalar or
// per-feature prior are accumulated per column (slot 0: prior_mu, 1: prior_logvar).
template <typename scalar_t, bool kKL, bool kPerColumn>
struct KLRows {
  using scalar = scalar_t;
  using acc = acc_t<scalar_t>;
  static constexpr int kRowSums = kKL ? 1 : 0;
  static constexpr int kFeatSums = kPerColumn ? 2 : 0;

  const scalar_t* mu = nullptr;
  const scalar_t* logvar = nullptr;
  Operand<scalar_t> prior_mu, prior_logvar;
  RowWeight<scalar_t> weight;
  scalar_t* grad_mu = nullptr;
  scalar_t* grad_logvar = nullptr;
  scalar_t* grad_prior_mu = nullptr;      // kElement prior only
  scalar_t* grad_prior_logvar = nullptr;  // kElement prior only
  acc* kl = nullptr;  // rows in the accumulation dtype
  int64_t cols = 0;

  template <int V>
  __device__ __forceinline__ void apply(int64_t row, int64_t col, acc (&sums)[1],
                                        acc (&feat)[kPerColumn ? 2 : 1][V]) const {
    const int64_t off = row * cols + col;
    acc mv[V], lv[V], pm[V], pl[V];
    load_vec<V>(mu + off, mv);
    load_vec<V>(logvar + off, lv);
    load_operand<V>(prior_mu, off, col, pm);
    load_operand<V>(prior_logvar, off, col, pl);
    const bool has_prior_var = prior_logvar.ptr != nullptr;
    const bool grads = kPerColumn || grad_mu != nullptr || grad_logvar != nullptr ||
                       grad_prior_mu != nullptr || grad_prior_logvar != nullptr;
    const acc w = grads ? weight(row) : acc(0);
    acc gm[V], gl[V], gpm[V], gpl[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const acc diff = mv[i] - pm[i];
      const acc d = lv[i] - pl[i];
      const acc scaled = has_prior_var ? diff * exp_(-pl[i]) : diff;
      const acc sq = diff * scaled;
      // expm1(d) - d in one piece, not exp(d) - 1 - d: no cancellation when the
      // variances are close (d -> 0, where the term is d^2/2).
      const acc em1_minus_d = expm1_minus_x_(d);
      // expm1(d) = -1 at d = -inf (a zero variance), where (expm1(d) - d) + d is inf - inf.
      const acc em1 = isinf(d) && d < acc(0) ? acc(-1) : em1_minus_d + d;
      if constexpr (kKL) sums[0] += em1_minus_d + sq;
      gm[i] = scaled * w;
      gl[i] = acc(0.5) * em1 * w;
      gpm[i] = -gm[i];
      gpl[i] = acc(-0.5) * (em1 + sq) * w;
      if constexpr (kPerColumn) {
        feat[0][i] += gpm[i];
        feat[1][i] += gpl[i];
      }
    }
    if (grad_mu != nullptr) store_vec<V>(grad_mu + off, gm);
    if (grad_logvar != nullptr) store_vec<V>(grad_logvar + off, gl);
    if (grad_prior_mu != nullptr) store_vec<V>(grad_prior_mu + off, gpm);
    if (grad_prior_logvar != nullptr) store_vec<V>(grad_prior_logvar + off, gpl);
  }

  __device__ __forceinline__ acc finish_row(int64_t row, const acc (&sums)[1]) const {
    const acc value = acc(0.5) * sums[0];
    kl[row] = value;
    return value;
  }
};

}  // namespace

// A task for launch_rows: `op` over rows x cols, its vector mode decided by the
// rows x cols matrices it reads and writes (`ptrs`) and by x's sharing across
// samples (`x_rows`, see with_shared_x).
template <class Op>
TaskSpec<Op> task(Op op, int64_t rows, int64_t cols, std::initializer_list<const void*> ptrs,
                  int64_t x_rows = 0) {
  op.cols = cols;
  TaskSpec<Op> spec;
  spec.op = op;
  spec.rows = rows;
  spec.cols = cols;
  spec.mode = with_shared_x(vector_mode<typename Op::scalar>(cols, ptrs, Op::kFeatSums > 0), cols, x_rows);
  return spec;
}

// Calls body(std::bool_constant<flag>()).
template <class Body>
void with_bool(bool flag, const Body& body) {
  if (flag) {
    body(std::true_type());
  } else {
    body(std::false_type());
  }
}

template <typename T>
T* mutable_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------- from the args
// Each op's task filled from its device-neutral arguments (common/kernels.h): the
// pointers of the defined tensors, null for the undefined ones (neither read nor
// written). `rows` is the args' rows, or 0 for a pass that does not run (the elbo's
// pass over an empty event). Shared by the single ops and the fused elbo.
namespace {

template <typename scalar_t>
RowWeight<scalar_t> row_weight_of(const at::Tensor& row_weight, double scale) {
  RowWeight<scalar_t> weight;
  weight.row_weight = ptr_or_null<scalar_t>(row_weight);
  weight.scale = static_cast<acc_t<scalar_t>>(scale);
  return weight;
}

template <typename scalar_t, bool kLogProb>
TaskSpec<BernoulliRows<scalar_t, kLogProb>> bernoulli_task(const BernoulliArgs& a, int64_t rows) {
  BernoulliRows<scalar_t, kLogProb> op;
  op.x = a.x.const_data_ptr<scalar_t>();
  op.logits = a.logits.const_data_ptr<scalar_t>();
  op.x_rows = a.x_rows;
  op.weight = row_weight_of<scalar_t>(a.row_weight, a.scale);
  op.grad_x = mutable_ptr_or_null<scalar_t>(a.grad_x);
  op.grad_logits = mutable_ptr_or_null<scalar_t>(a.grad_logits);
  op.log_prob = mutable_ptr_or_null<acc_t<scalar_t>>(a.log_prob);
  return task(op, rows, a.logits.size(1), {op.x, op.logits, op.grad_x, op.grad_logits}, a.x_rows);
}

// A scalar or per-feature logvar's gradient is summed per column by the driver
// (kPerColumn); a per-element one is written per element.
inline bool per_column(const GaussianArgs& a) {
  return a.grad_logvar.defined() && reduced_over_rows(a.logvar_kind);
}

template <typename scalar_t, bool kLogProb, bool kPerColumn>
TaskSpec<GaussianRows<scalar_t, kLogProb, kPerColumn>> gaussian_task(const GaussianArgs& a,
                                                                     int64_t rows) {
  GaussianRows<scalar_t, kLogProb, kPerColumn> op;
  op.x = a.x.const_data_ptr<scalar_t>();
  op.mean = a.mean.const_data_ptr<scalar_t>();
  op.x_rows = a.x_rows;
  op.logvar = make_operand<scalar_t>(a.logvar_kind, a.logvar);
  op.weight = row_weight_of<scalar_t>(a.row_weight, a.scale);
  op.grad_x = mutable_ptr_or_null<scalar_t>(a.grad_x);
  op.grad_mean = mutable_ptr_or_null<scalar_t>(a.grad_mean);
  if (!reduced_over_rows(a.logvar_kind)) {
    op.grad_logvar = mutable_ptr_or_null<scalar_t>(a.grad_logvar);
  }
  op.log_prob = mutable_ptr_or_null<acc_t<scalar_t>>(a.log_prob);
  return task(op, rows, a.mean.size(1),
              {op.x, op.mean, matrix_ptr(op.logvar), op.grad_x, op.grad_mean, op.grad_logvar}, a.x_rows);
}

// The gradient of a scalar or per-feature prior is summed per column (slot 0:
// prior_mu, 1: prior_logvar); a per-element one is written per element.
inline bool per_column(const KLArgs& a) {
  return (a.grad_prior_mu.defined() && reduced_over_rows(a.prior_mu_kind)) ||
         (a.grad_prior_logvar.defined() && reduced_over_rows(a.prior_logvar_kind));
}

template <typename scalar_t, bool kKL, bool kPerColumn>
TaskSpec<KLRows<scalar_t, kKL, kPerColumn>> kl_task(const KLArgs& a, int64_t rows) {
  KLRows<scalar_t, kKL, kPerColumn> op;
  op.mu = a.mu.const_data_ptr<scalar_t>();
  op.logvar = a.logvar.const_data_ptr<scalar_t>();
  op.prior_mu = make_operand<scalar_t>(a.prior_mu_kind, a.prior_mu);
  op.prior_logvar = make_operand<scalar_t>(a.prior_logvar_kind, a.prior_logvar);
  op.weight = row_weight_of<scalar_t>(a.row_weight, a.scale);
  op.grad_mu = mutable_ptr_or_null<scalar_t>(a.grad_mu);
  op.grad_logvar = mutable_ptr_or_null<scalar_t>(a.grad_logvar);
  if (!reduced_over_rows(a.prior_mu_kind)) {
    op.grad_prior_mu = mutable_ptr_or_null<scalar_t>(a.grad_prior_mu);
  }
  if (!reduced_over_rows(a.prior_logvar_kind)) {
    op.grad_prior_logvar = mutable_ptr_or_null<scalar_t>(a.grad_prior_logvar);
  }
  op.kl = mutable_ptr_or_null<acc_t<scalar_t>>(a.kl);
  return task(op, rows, a.mu.size(1),
              {op.mu, op.logvar, matrix_ptr(op.prior_mu), matrix_ptr(op.prior_logvar), op.grad_mu,
               op.grad_logvar, op.grad_prior_mu, op.grad_prior_logvar});
}

}  // namespace

// After the launch: the gradients of a scalar or per-feature logvar or prior, from
// the task's per-column sums (`columns`, (kFeatSums, cols)), in the args' layout.
inline void write_column_gradients(const GaussianArgs& a, const at::Tensor& columns) {
  if (per_column(a)) write_column_gradient(a.logvar_kind, columns[0], a.grad_logvar);
}

inline void write_column_gradients(const KLArgs& a, const at::Tensor& columns) {
  if (a.grad_prior_mu.defined() && reduced_over_rows(a.prior_mu_kind)) {
    write_column_gradient(a.prior_mu_kind, columns[0], a.grad_prior_mu);
  }
  if (a.grad_prior_logvar.defined() && reduced_over_rows(a.prior_logvar_kind)) {
    write_column_gradient(a.prior_logvar_kind, columns[1], a.grad_prior_logvar);
  }
}

}  // namespace vae_fast::cuda
