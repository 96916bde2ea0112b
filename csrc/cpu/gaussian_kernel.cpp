// Gaussian log-likelihood rows: one pass over (x, mean[, logvar]) writes the row
// sums of -0.5*(log(2pi) + logvar + (x-mean)^2 exp(-logvar)) and, in the same pass,
// the gradients w.r.t. x, mean and logvar scaled by the per-row weight. A shared
// (scalar or per-feature) logvar is read once per column and its gradient reduced
// over rows (ColumnSums). Compiled once per CPU capability.

#include <ATen/Dispatch.h>

#include <cmath>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace vae_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

template <typename scalar_t>
void gaussian_rows(const GaussianArgs& a) {
  using opmath = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t rows = a.mean.size(0), cols = a.mean.size(1);
  const int64_t x_rows = a.x_rows > 0 ? a.x_rows : rows;
  // Undefined: logvar = 0 (the elbo without obs_logvar), shared like a scalar.
  const bool shared = !a.logvar.defined() || a.logvar_kind != Broadcast::kElement;
  const bool one_value = a.logvar_kind == Broadcast::kScalar;

  // A shared logvar: precompute logvar and exp(-logvar) per column in opmath.
  std::vector<opmath> lv_shared, inv_var_shared;
  if (shared) {
    lv_shared = a.logvar.defined() ? column_values<scalar_t>(a.logvar, one_value, cols)
                                   : std::vector<opmath>(cols, opmath(0));
    inv_var_shared.resize(cols);
    for (int64_t j = 0; j < cols; ++j) {
      // exp(-logvar), not 1/exp(logvar): finite (if huge) down to logvar = -80.
      inv_var_shared[j] = std::exp(-lv_shared[j]);
    }
  }
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* mean = a.mean.const_data_ptr<scalar_t>();
  const scalar_t* lv_elem = shared ? nullptr : a.logvar.const_data_ptr<scalar_t>();
  const scalar_t* row_weight = ptr_or_null<scalar_t>(a.row_weight);
  scalar_t* log_prob = mutable_ptr_or_null<scalar_t>(a.log_prob);
  scalar_t* grad_x = mutable_ptr_or_null<scalar_t>(a.grad_x);
  scalar_t* grad_mean = mutable_ptr_or_null<scalar_t>(a.grad_mean);
  scalar_t* grad_lv = mutable_ptr_or_null<scalar_t>(a.grad_logvar);
  const opmath scale = static_cast<opmath>(a.scale);

  const int64_t chunks = num_row_chunks(rows, cols);
  ColumnSums<opmath> lv_sums(grad_lv && shared, chunks, cols);

  // The row sum is -0.5 * (cols*log(2pi) + sum(logvar) + sum((x-mean)^2/var)): the
  // constant part once (for a shared logvar its sum too), the rest per element.
  double shared_lv_sum = 0;
  if (shared) {
    for (const opmath v : lv_shared) shared_lv_sum += static_cast<double>(v);
  }
  const double row_constant = static_cast<double>(cols) * kLog2Pi + shared_lv_sum;

  for_each_row_chunk(rows, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    opmath* partial = lv_sums.partial(chunk);
    BlockedSum<Vec> sum;
    for (int64_t r = begin; r < end; ++r) {
      const opmath w = row_weight ? scale * static_cast<opmath>(row_weight[r]) : scale;
      const Vec weight(w), half_weight(opmath(0.5) * w);
      const int64_t off = r * cols, x_off = (r % x_rows) * cols;
      // Lanes past a row's end load 0 (and exp(-0) = 1): they add 0 to the sums.
      for (int64_t j = 0; j < cols; j += W) {
        const int64_t n = std::min<int64_t>(W, cols - j);
        const Vec diff = load_n(x + x_off + j, n) - load_n(mean + off + j, n);
        Vec lv, inv_var;
        if (shared) {
          inv_var = load_n(inv_var_shared.data() + j, n);
        } else {
          lv = load_n(lv_elem + off + j, n);
          inv_var = fast_exp(lv.neg());
        }
        const Vec scaled_diff = diff * inv_var;  // (x - mean) / var
        const Vec sq = diff * scaled_diff;       // (x - mean)^2 / var
        if (log_prob) sum.add(shared ? sq : lv + sq);
        if (grad_mean) store_n(grad_mean + off + j, scaled_diff * weight, n);
        if (grad_x) store_n(grad_x + off + j, scaled_diff.neg() * weight, n);
        if (grad_lv) {
          const Vec g = at::vec::fmsub(sq, half_weight, half_weight);  // 0.5 (sq - 1) weight
          if (shared) {
            store_n(partial + j, load_n(partial + j, n) + g, n);
          } else {
            store_n(grad_lv + off + j, g, n);
          }
        }
      }
      if (log_prob) log_prob[r] = static_cast<scalar_t>(-0.5 * (row_constant + sum.take()));
      lv_sums.end_row(chunk, r - begin + 1);
    }
    lv_sums.end_chunk(chunk);
  });
  if (lv_sums.active()) lv_sums.write(grad_lv, one_value);
}

}  // namespace

void gaussian_kernel(const GaussianArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(),
                                  "vae_fast::gaussian_log_prob", [&] { gaussian_rows<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast::cpu
