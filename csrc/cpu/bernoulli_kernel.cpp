// Bernoulli log-likelihood rows: one pass over (x, logits) writes the row sums of
// x*l - softplus(l) and, in the same pass, the gradients d/dl = x - sigmoid(l) and
// d/dx = l (0 at the limits), scaled by the per-row weight. Compiled once per CPU
// capability.

#include <ATen/Dispatch.h>

#include <limits>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace vae_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

// Columns [j, j + n) of one row (n is the vector width but at the row's tail): adds
// x*l - softplus(l) to `sum` and writes the gradients d/dl = x - sigmoid(l) and
// d/dx = l (0 at the limits), times `weight`. The outputs wanted are template flags, so the hot loop
// carries no dead work; the pointers are parameters, not captures, so that the
// compiler keeps them in registers across the (may-alias) vector stores.
template <typename scalar_t, bool kLogProb, bool kGradLogits, bool kGradX>
inline void columns(const scalar_t* x, const scalar_t* logits, scalar_t* grad_x,
                    scalar_t* grad_logits, int64_t j, int64_t n, const OpVec<scalar_t>& weight,
                    BernoulliRowSum<OpVec<scalar_t>>& sum, TargetRange<OpVec<scalar_t>>& range,
                    bool stream) {
  using Vec = OpVec<scalar_t>;
  const Vec xv = load_n(x + j, n);  // lanes past n are 0, inside [0, 1]
  const Vec l = load_n(logits + j, n);
  if constexpr (kLogProb) range.add(xv);
  if constexpr (kLogProb || kGradLogits) {
    const Vec residual = bernoulli_columns<kLogProb, kGradLogits>(xv, l, n, sum);
    if constexpr (kGradLogits) store_out(grad_logits + j, residual * weight, n, stream);
  }
  if constexpr (kGradX) {
    // d/dx = l, but 0 where the term is its limit 0 (x = 1 at l = +inf, x = 0 at
    // l = -inf), as the reference differentiates it.
    constexpr auto inf = std::numeric_limits<typename Vec::value_type>::infinity();
    const Vec at_limit = ((l == Vec(inf)) & (xv == Vec(1))) | ((l == Vec(-inf)) & (xv == Vec(0)));
    store_out(grad_x + j, Vec::blendv(l, Vec(0), at_limit) * weight, n, stream);
  }
}

template <typename scalar_t, bool kLogProb, bool kGradLogits, bool kGradX>
void bernoulli_rows(const BernoulliArgs& a) {
  using opmath = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t rows = a.logits.size(0);
  const int64_t x_rows = a.x_rows > 0 ? a.x_rows : rows;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* logits = a.logits.const_data_ptr<scalar_t>();
  const scalar_t* row_weight = ptr_or_null<scalar_t>(a.row_weight);
  opmath* log_prob = mutable_ptr_or_null<opmath>(a.log_prob);  // rows in opmath
  scalar_t* grad_x = mutable_ptr_or_null<scalar_t>(a.grad_x);
  scalar_t* grad_logits = mutable_ptr_or_null<scalar_t>(a.grad_logits);
  const opmath scale = static_cast<opmath>(a.scale);
  const bool stream = streams(a.grad_logits);  // (grad_x alone: a rare backward)

  at::parallel_for(0, rows, row_grain(a.logits.size(1)), [&](int64_t begin, int64_t end) {
    // Locals, not captures: the stores below may alias a captured reference.
    const int64_t cols = a.logits.size(1);
    const scalar_t* x_data = x;
    const scalar_t* logits_data = logits;
    TargetRange<Vec> range;
    BernoulliRowSum<Vec> sum;
    for (int64_t r = begin; r < end; ++r) {
      const Vec weight(row_weight ? scale * static_cast<opmath>(row_weight[r]) : scale);
      const int64_t off = r * cols;
      const scalar_t* x_row = x_data + (r % x_rows) * cols;
      scalar_t* grad_x_row = kGradX ? grad_x + off : nullptr;
      scalar_t* grad_logits_row = kGradLogits ? grad_logits + off : nullptr;
      int64_t j = 0;
      for (; j + W <= cols; j += W) {
        columns<scalar_t, kLogProb, kGradLogits, kGradX>(x_row, logits_data + off, grad_x_row,
                                                         grad_logits_row, j, W, weight, sum, range,
                                                         stream);
      }
      if (j < cols) {
        columns<scalar_t, kLogProb, kGradLogits, kGradX>(x_row, logits_data + off, grad_x_row,
                                                         grad_logits_row, j, cols - j, weight, sum,
                                                         range, stream);
      }
      if constexpr (kLogProb) {
        log_prob[r] = static_cast<opmath>(sum.take());
      }
    }
    end_streaming(stream);
    const auto x_row_of = [&](int64_t r) { return x_data + (r % x_rows) * cols; };
    if (kLogProb && a.found_outside != nullptr &&
        range.rows_outside_unit_interval(begin, end, cols, x_row_of)) {
      a.found_outside->store(true, std::memory_order_relaxed);
    }
  });
}

template <typename scalar_t>
void bernoulli_dispatch_outputs(const BernoulliArgs& a) {
  const bool ll = a.log_prob.defined(), gl = a.grad_logits.defined(), gx = a.grad_x.defined();
  if (ll && gl && !gx) return bernoulli_rows<scalar_t, true, true, false>(a);  // fused elbo
  if (ll && !gl && !gx) return bernoulli_rows<scalar_t, true, false, false>(a);  // forward
  if (!ll && gl && !gx) return bernoulli_rows<scalar_t, false, true, false>(a);  // backward
  if (!ll && gl && gx) return bernoulli_rows<scalar_t, false, true, true>(a);
  if (!ll && !gl && gx) return bernoulli_rows<scalar_t, false, false, true>(a);
  TORCH_CHECK(false, "vae_fast: unsupported bernoulli kernel outputs");
}

}  // namespace

void bernoulli_kernel(const BernoulliArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(),
                                  "vae_fast::bernoulli_log_prob",
                                  [&] { bernoulli_dispatch_outputs<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast::cpu
