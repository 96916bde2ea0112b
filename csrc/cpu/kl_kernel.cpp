// KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) rows: one pass writes the row
// sums and, in the same pass, the gradients of all four inputs scaled by the
// per-row weight. An undefined prior is the standard normal; a scalar or per-feature
// prior is read per column (never expanded) and its gradient summed over rows
// (ColumnSums). Compiled once per CPU capability.

#include <ATen/Dispatch.h>

#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace vae_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

// A prior as the rows read it: absent (the standard normal's 0), one matrix element
// per (row, column), or shared (a scalar or per-feature prior) as one opmath value per
// column, precomputed; with its gradient, written per element or summed over rows.
template <typename scalar_t>
struct Prior {
  using opmath = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  const scalar_t* elements = nullptr;
  std::vector<opmath> shared;  // cols values when the prior is shared
  scalar_t* grad = nullptr;    // kElement prior: (rows, cols)
  ColumnSums<opmath> sums;     // shared prior with a gradient

  Prior(const at::Tensor& data, Broadcast kind, const at::Tensor& grad_out, int64_t chunks,
        int64_t cols)
      : sums(grad_out.defined() && kind != Broadcast::kElement, chunks, cols) {
    if (!data.defined()) return;
    if (kind == Broadcast::kElement) {
      elements = data.const_data_ptr<scalar_t>();
      grad = mutable_ptr_or_null<scalar_t>(grad_out);
    } else {
      shared = column_values<scalar_t>(data, kind == Broadcast::kScalar, cols);
    }
  }

  bool present() const { return elements != nullptr || !shared.empty(); }
  bool has_grad() const { return grad != nullptr || sums.active(); }

  Vec load(int64_t off, int64_t j, int64_t n) const {
    return elements != nullptr ? load_n(elements + off + j, n) : load_n(shared.data() + j, n);
  }

  void store_grad(opmath* partial, int64_t off, int64_t j, const Vec& g, int64_t n) const {
    if (grad != nullptr) {
      store_n(grad + off + j, g, n);
    } else {
      store_n(partial + j, load_n(partial + j, n) + g, n);
    }
  }
};

template <typename scalar_t>
void kl_rows(const KLArgs& a) {
  using opmath = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t rows = a.mu.size(0), cols = a.mu.size(1);
  const int64_t chunks = num_row_chunks(rows, cols);
  const scalar_t* mu = a.mu.const_data_ptr<scalar_t>();
  const scalar_t* logvar = a.logvar.const_data_ptr<scalar_t>();
  Prior<scalar_t> prior_mu(a.prior_mu, a.prior_mu_kind, a.grad_prior_mu, chunks, cols);
  Prior<scalar_t> prior_lv(a.prior_logvar, a.prior_logvar_kind, a.grad_prior_logvar, chunks, cols);
  const scalar_t* row_weight = ptr_or_null<scalar_t>(a.row_weight);
  opmath* kl = mutable_ptr_or_null<opmath>(a.kl);  // rows in opmath
  scalar_t* g_mu = mutable_ptr_or_null<scalar_t>(a.grad_mu);
  scalar_t* g_lv = mutable_ptr_or_null<scalar_t>(a.grad_logvar);
  const bool g_pmu = prior_mu.has_grad(), g_plv = prior_lv.has_grad();
  const bool has_pm = prior_mu.present(), has_plv = prior_lv.present();
  const opmath scale = static_cast<opmath>(a.scale);
  const bool stream = streams(a.grad_mu) || streams(a.grad_logvar);

  for_each_row_chunk(rows, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    opmath* pm_partial = prior_mu.sums.partial(chunk);
    opmath* plv_partial = prior_lv.sums.partial(chunk);
    BlockedSum<Vec> sum;
    for (int64_t r = begin; r < end; ++r) {
      const opmath w = row_weight ? scale * static_cast<opmath>(row_weight[r]) : scale;
      const Vec weight(w), half_weight(opmath(0.5) * w);
      const int64_t off = r * cols;
      // Lanes past a row's end load 0 (d = 0, diff = 0): they add 0 to the sum.
      for (int64_t j = 0; j < cols; j += W) {
        const int64_t n = std::min<int64_t>(W, cols - j);
        const Vec m = load_n(mu + off + j, n);
        const Vec lv = load_n(logvar + off + j, n);
        const Vec diff = has_pm ? m - prior_mu.load(off, j, n) : m;
        const Vec plv = has_plv ? prior_lv.load(off, j, n) : Vec(0);
        const Vec inv_prior_var = has_plv ? fast_exp(plv.neg()) : Vec(1);
        const Vec dlv = lv - plv;
        // expm1(d) - d in one piece rather than exp(d) - 1 - d: exact when the
        // variances are close (d -> 0), where the KL term is d^2/2.
        const Vec em1_minus_d = expm1_minus_x(dlv);
        // expm1(d) = -1 at d = -inf (a zero variance), where (expm1(d) - d) + d is inf - inf.
        const Vec zero_variance = dlv == Vec(-std::numeric_limits<opmath>::infinity());
        const Vec em1 = Vec::blendv(em1_minus_d + dlv, Vec(-1), zero_variance);
        const Vec scaled_diff = diff * inv_prior_var;
        // Twice the KL term; the row's sum is halved once.
        if (kl) sum.add(at::vec::fmadd(diff, scaled_diff, em1_minus_d));
        if (g_mu) store_out(g_mu + off + j, scaled_diff * weight, n, stream);
        if (g_pmu) prior_mu.store_grad(pm_partial, off, j, scaled_diff.neg() * weight, n);
        if (g_lv) store_out(g_lv + off + j, em1 * half_weight, n, stream);
        if (g_plv) {
          const Vec g = at::vec::fmadd(diff, scaled_diff, em1) * half_weight.neg();
          prior_lv.store_grad(plv_partial, off, j, g, n);
        }
      }
      if (kl) kl[r] = static_cast<opmath>(0.5 * sum.take());
      prior_mu.sums.end_row(chunk, r - begin + 1);
      prior_lv.sums.end_row(chunk, r - begin + 1);
    }
    prior_mu.sums.end_chunk(chunk);
    prior_lv.sums.end_chunk(chunk);
    end_streaming(stream);
  });
  if (prior_mu.sums.active()) {
    prior_mu.sums.write(a.grad_prior_mu.mutable_data_ptr<scalar_t>(),
                        a.prior_mu_kind == Broadcast::kScalar);
  }
  if (prior_lv.sums.active()) {
    prior_lv.sums.write(a.grad_prior_logvar.mutable_data_ptr<scalar_t>(),
                        a.prior_logvar_kind == Broadcast::kScalar);
  }
}

}  // namespace

void kl_kernel(const KLArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.mu.scalar_type(),
                                  "vae_fast::gaussian_kl", [&] { kl_rows<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast::cpu
