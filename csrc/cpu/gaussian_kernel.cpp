// Gaussian log-likelihood rows: one pass over (x, mean[, logvar]) writes the row
// sums of -0.5*(log(2pi) + logvar + (x-mean)^2 exp(-logvar)) and, in the same pass,
// the gradients w.r.t. x, mean and logvar scaled by the per-row weight. A shared
// (scalar or per-feature) logvar is read once per column and its gradient reduced
// over rows (ColumnSums). Compiled once per CPU capability.

#include <ATen/Dispatch.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace vae_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

// What one launch computes: the operands and outputs as the rows read them.
template <typename scalar_t>
struct GaussianRows {
  using opmath = opmath_t<scalar_t>;
  const scalar_t* x;
  const scalar_t* mean;
  const scalar_t* lv_elem;      // per-element logvar, or null (shared)
  const opmath* inv_var_shared;  // exp(-logvar) per column when shared
  scalar_t* grad_x;
  scalar_t* grad_mean;
  scalar_t* grad_lv;  // per-element logvar's gradient (a shared one sums into `partial`)
  bool stream;        // the gradients are written past the caches (vec_math.h: streams)
};

// Columns [j, j + n) of row `off` (x's row at `x_off`): adds logvar + (x-mean)^2/var
// (kLogProb; its shared logvar part is added once per row instead) to `sum` and
// writes the gradients times `weight`. The outputs computed in the fused elbo and the
// forward are template flags, so that their loop carries no dead work or branch;
// grad_x (x requiring grad: rare) is tested at run time.
template <typename scalar_t, bool kShared, bool kLogProb, bool kGradMean, bool kGradLv>
inline void columns(const GaussianRows<scalar_t>& p, int64_t off, int64_t x_off, int64_t j,
                    int64_t n, const OpVec<scalar_t>& weight, const OpVec<scalar_t>& half_weight,
                    BlockedSum<OpVec<scalar_t>>& sum, opmath_t<scalar_t>* partial) {
  using Vec = OpVec<scalar_t>;
  // Lanes past a row's end load 0 (and exp(-0) = 1): they add 0 to the sums.
  const Vec diff = load_n(p.x + x_off + j, n) - load_n(p.mean + off + j, n);
  Vec lv, inv_var;
  if constexpr (kShared) {
    inv_var = load_n(p.inv_var_shared + j, n);
  } else {
    lv = load_n(p.lv_elem + off + j, n);
    inv_var = fast_exp(lv.neg());
  }
  const Vec scaled_diff = diff * inv_var;  // (x - mean) / var
  const Vec sq = diff * scaled_diff;       // (x - mean)^2 / var
  if constexpr (kLogProb) sum.add(kShared ? sq : lv + sq);
  if constexpr (kGradMean) store_out(p.grad_mean + off + j, scaled_diff * weight, n, p.stream);
  if (p.grad_x != nullptr) store_out(p.grad_x + off + j, scaled_diff.neg() * weight, n, p.stream);
  if constexpr (kGradLv) {
    const Vec g = at::vec::fmsub(sq, half_weight, half_weight);  // 0.5 (sq - 1) weight
    if constexpr (kShared) {
      store_n(partial + j, load_n(partial + j, n) + g, n);
    } else {
      store_out(p.grad_lv + off + j, g, n, p.stream);
    }
  }
}

template <typename scalar_t, bool kShared, bool kLogProb, bool kGradMean, bool kGradLv>
void gaussian_rows(const GaussianArgs& a, const GaussianRows<scalar_t>& p, double row_constant,
                   ColumnSums<opmath_t<scalar_t>>& lv_sums, int64_t chunks) {
  using opmath = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t rows = a.mean.size(0);
  const int64_t x_rows = a.x_rows > 0 ? a.x_rows : rows;
  const scalar_t* row_weight = ptr_or_null<scalar_t>(a.row_weight);
  opmath* log_prob = mutable_ptr_or_null<opmath>(a.log_prob);  // rows in opmath
  const opmath scale = static_cast<opmath>(a.scale);

  for_each_row_chunk(rows, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    // Locals, not captures: the stores below may alias a captured reference.
    const GaussianRows<scalar_t> rows_of = p;
    const int64_t cols = a.mean.size(1);
    opmath* partial = lv_sums.partial(chunk);
    BlockedSum<Vec> sum;
    for (int64_t r = begin; r < end; ++r) {
      const opmath w = row_weight ? scale * static_cast<opmath>(row_weight[r]) : scale;
      const Vec weight(w), half_weight(opmath(0.5) * w);
      const int64_t off = r * cols, x_off = (r % x_rows) * cols;
      int64_t j = 0;
      for (; j + W <= cols; j += W) {
        columns<scalar_t, kShared, kLogProb, kGradMean, kGradLv>(rows_of, off, x_off, j, W, weight,
                                                                 half_weight, sum, partial);
      }
      if (j < cols) {
        columns<scalar_t, kShared, kLogProb, kGradMean, kGradLv>(
            rows_of, off, x_off, j, cols - j, weight, half_weight, sum, partial);
      }
      if constexpr (kLogProb) {
        log_prob[r] = static_cast<opmath>(-0.5 * (row_constant + sum.take()));
      }
      lv_sums.end_row(chunk, r - begin + 1);
    }
    lv_sums.end_chunk(chunk);
    end_streaming(rows_of.stream);
  });
}

template <typename scalar_t>
void gaussian_dispatch(const GaussianArgs& a) {
  using opmath = opmath_t<scalar_t>;
  const int64_t rows = a.mean.size(0), cols = a.mean.size(1);
  // Undefined: logvar = 0 (the elbo without obs_logvar), shared like a scalar.
  const bool shared = !a.logvar.defined() || a.logvar_kind != Broadcast::kElement;
  const bool one_value = a.logvar_kind == Broadcast::kScalar;

  // A shared logvar: exp(-logvar) per column in opmath, and the sum of its values,
  // which is part of every row's sum.
  std::vector<opmath> inv_var_shared;
  double shared_lv_sum = 0;
  if (shared) {
    const std::vector<opmath> lv_shared =
        a.logvar.defined() ? column_values<scalar_t>(a.logvar, one_value, cols)
                           : std::vector<opmath>(cols, opmath(0));
    inv_var_shared.resize(cols);
    for (int64_t j = 0; j < cols; ++j) {
      // exp(-logvar), not 1/exp(logvar): finite (if huge) down to logvar = -80.
      inv_var_shared[j] = std::exp(-lv_shared[j]);
      shared_lv_sum += static_cast<double>(lv_shared[j]);
    }
  }
  // The row sum is -0.5 * (cols*log(2pi) + sum(logvar) + sum((x-mean)^2/var)).
  const double row_constant = static_cast<double>(cols) * kLog2Pi + shared_lv_sum;
  const GaussianRows<scalar_t> p{a.x.const_data_ptr<scalar_t>(),
                                 a.mean.const_data_ptr<scalar_t>(),
                                 shared ? nullptr : a.logvar.const_data_ptr<scalar_t>(),
                                 inv_var_shared.data(),
                                 mutable_ptr_or_null<scalar_t>(a.grad_x),
                                 mutable_ptr_or_null<scalar_t>(a.grad_mean),
                                 mutable_ptr_or_null<scalar_t>(a.grad_logvar),
                                 streams(a.grad_mean) || streams(a.grad_x)};
  const bool log_prob = a.log_prob.defined(), grad_mean = p.grad_mean != nullptr;
  const bool grad_lv = p.grad_lv != nullptr;
  const int64_t chunks = num_row_chunks(rows, cols);
  ColumnSums<opmath> lv_sums(grad_lv && shared, chunks, cols);

  // Each flag as a template argument (16 loops per dtype and capability, each small).
  const auto run = [&](auto shared_flag, auto log_prob_flag, auto grad_mean_flag,
                       auto grad_lv_flag) {
    gaussian_rows<scalar_t, decltype(shared_flag)::value, decltype(log_prob_flag)::value,
                  decltype(grad_mean_flag)::value, decltype(grad_lv_flag)::value>(
        a, p, row_constant, lv_sums, chunks);
  };
  const auto with_grad_lv = [&](auto... flags) {
    grad_lv ? run(flags..., std::true_type{}) : run(flags..., std::false_type{});
  };
  const auto with_grad_mean = [&](auto... flags) {
    grad_mean ? with_grad_lv(flags..., std::true_type{})
              : with_grad_lv(flags..., std::false_type{});
  };
  const auto with_log_prob = [&](auto... flags) {
    log_prob ? with_grad_mean(flags..., std::true_type{})
             : with_grad_mean(flags..., std::false_type{});
  };
  shared ? with_log_prob(std::true_type{}) : with_log_prob(std::false_type{});
  if (lv_sums.active()) lv_sums.write(p.grad_lv, one_value);
}

}  // namespace

void gaussian_kernel(const GaussianArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(),
                                  "vae_fast::gaussian_log_prob",
                                  [&] { gaussian_dispatch<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast::cpu
