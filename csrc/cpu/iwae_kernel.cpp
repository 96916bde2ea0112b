// The importance-weighted bound on the CPU (vae_fast::iwae). One task per data row b
// handles its K samples together:
//
// 1. for each sample k, one pass over (x[b], recon[k, b]) gives the row's
//    log-likelihood and, when gradients are wanted, writes the unweighted residual
//    d log p(x|z_k)/d recon into grad_recon[k, b]; a pass over the Z latents adds
//    log N(z_k; 0, I) - log N(z_k; mu, exp(logvar)) (log 2pi cancels);
// 2. the K log weights give the bound logsumexp_k - log K (max-shifted, in float64)
//    and the normalized weights w_k;
// 3. each residual row is scaled in place by d(loss)/d(log w_k) = scale * w_k while
//    it is still in cache (K rows of one b are 157 KB at K = 50, D = 784 in float32),
//    and the latent gradients are written.
//
// x, mu and logvar are read once per sample from the same row (no K-fold copy).
// Compiled once per CPU capability.

#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace vae_fast::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr double kLog2Pi = 1.8378770664093454835606594728112;

// One Bernoulli row: returns sum(x*l - softplus(l)) and, with kGrad, writes
// x - sigmoid(l) (the math of bernoulli_kernel.cpp).
template <typename scalar_t, bool kGrad>
inline double bernoulli_row(const scalar_t* x, const scalar_t* logits, scalar_t* grad,
                            int64_t cols, BernoulliRowSum<OpVec<scalar_t>>& sum,
                            TargetRange<OpVec<scalar_t>>& range) {
  using Vec = OpVec<scalar_t>;
  constexpr int64_t W = Vec::size();
  const auto columns = [&](int64_t j, int64_t n) {
    const Vec xv = load_n(x + j, n);  // lanes past n are 0, inside [0, 1]
    const Vec l = load_n(logits + j, n);
    range.add(xv);
    const Vec residual = bernoulli_columns<true, kGrad>(xv, l, n, sum);
    if constexpr (kGrad) store_n(grad + j, residual, n);
  };
  int64_t j = 0;
  for (; j + W <= cols; j += W) columns(j, W);
  if (j < cols) columns(j, cols - j);
  return sum.take();
}

// One Gaussian row: returns sum(-0.5*(log 2pi + lv + (x-m)^2 exp(-lv))) and, with
// kGrad, writes (x-m) exp(-lv). The log-variance is per element (`lv_elem`) or shared
// (`lv_shared`, `inv_shared`: one value per column, precomputed).
template <typename scalar_t, bool kGrad>
inline double gaussian_row(const scalar_t* x, const scalar_t* mean, const scalar_t* lv_elem,
                           const opmath_t<scalar_t>* lv_shared,
                           const opmath_t<scalar_t>* inv_shared, scalar_t* grad, int64_t cols,
                           BlockedSum<OpVec<scalar_t>>& sum) {
  using Vec = OpVec<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < cols; j += W) {
    const int64_t n = std::min<int64_t>(W, cols - j);
    const Vec diff = load_n(x + j, n) - load_n(mean + j, n);
    Vec lv, inv_var;
    if (lv_elem != nullptr) {
      lv = load_n(lv_elem + j, n);
      inv_var = fast_exp(lv.neg());
    } else {
      lv = load_n(lv_shared + j, n);
      inv_var = load_n(inv_shared + j, n);
    }
    const Vec scaled = diff * inv_var;
    sum.add(keep_first(Vec(-0.5) * (Vec(static_cast<opmath>(kLog2Pi)) + lv + diff * scaled), n));
    if constexpr (kGrad) store_n(grad + j, scaled, n);
  }
  return sum.take();
}

template <typename scalar_t, bool kBernoulli, bool kGrad>
void iwae_rows(const IWAEArgs& a) {
  using opmath = opmath_t<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t K = a.samples, B = a.batch;
  const int64_t cols = a.x.size(1), latent = a.mu.size(1);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* recon = a.recon.const_data_ptr<scalar_t>();
  const scalar_t* z = a.z.const_data_ptr<scalar_t>();
  const scalar_t* mu = a.mu.const_data_ptr<scalar_t>();
  const scalar_t* logvar = a.logvar.const_data_ptr<scalar_t>();
  opmath* log_weights = a.log_weights.mutable_data_ptr<opmath>();
  double* bound = a.bound.mutable_data_ptr<double>();
  scalar_t* grad_recon = kGrad ? a.grad_recon.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* grad_z = kGrad ? a.grad_z.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* grad_mu = kGrad ? mutable_ptr_or_null<scalar_t>(a.grad_mu) : nullptr;
  scalar_t* grad_lv = kGrad ? mutable_ptr_or_null<scalar_t>(a.grad_logvar) : nullptr;
  const double log_k = std::log(static_cast<double>(K));

  // The observation log-variance: shared (none, scalar, per feature) as per-column
  // values precomputed in opmath, or per element (of x's rows, or of recon's).
  const IWAEObs obs_kind = a.obs_kind;
  const bool obs_shared = obs_kind == IWAEObs::kNone || obs_kind == IWAEObs::kScalar ||
                          obs_kind == IWAEObs::kFeature;
  std::vector<opmath> lv_shared, inv_shared;
  if (!kBernoulli && obs_shared) {
    lv_shared.assign(cols, opmath(0));
    inv_shared.assign(cols, opmath(1));
    if (obs_kind != IWAEObs::kNone) {
      const scalar_t* lv = a.obs.const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < cols; ++j) {
        lv_shared[j] = static_cast<opmath>(lv[obs_kind == IWAEObs::kScalar ? 0 : j]);
        // exp(-logvar), not 1/exp(logvar): finite (if huge) down to logvar = -80.
        inv_shared[j] = std::exp(-lv_shared[j]);
      }
    }
  }
  const scalar_t* obs_elem =
      !kBernoulli && !obs_shared ? a.obs.const_data_ptr<scalar_t>() : nullptr;
  // Row `row` (= k*B + b) of a per-element obs_logvar; nullptr when it is shared.
  const auto obs_row = [&](int64_t b, int64_t row) -> const scalar_t* {
    if (obs_elem == nullptr) return nullptr;
    return obs_elem + (obs_kind == IWAEObs::kData ? b : row) * cols;
  };
  const bool grad_obs = kGrad && !kBernoulli && a.grad_obs.defined();
  const bool obs_reduce =
      grad_obs && (obs_kind == IWAEObs::kScalar || obs_kind == IWAEObs::kFeature);

  const int64_t chunks = num_row_chunks(B, K * (cols + latent));
  std::vector<double> obs_totals(obs_reduce ? chunks * cols : 0, 0.0);
  std::atomic<bool> found_outside{false};

  for_each_row_chunk(B, chunks, [&](int64_t chunk, int64_t begin, int64_t end) {
    BlockedSum<Vec> sum;                 // Gaussian rows
    BernoulliRowSum<Vec> bernoulli_sum;  // Bernoulli rows
    TargetRange<Vec> range;
    std::vector<double> lw(K);
    std::vector<double> inv_z(latent), mu_b(latent), lv_b(latent);
    std::vector<double> score_mu(grad_mu ? latent : 0), score_lv(grad_lv ? latent : 0);
    std::vector<opmath> obs_acc(grad_obs && obs_kind != IWAEObs::kSample ? cols : 0);
    double* totals = obs_reduce ? obs_totals.data() + chunk * cols : nullptr;

    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* x_row = x + b * cols;
      for (int64_t j = 0; j < latent; ++j) {
        mu_b[j] = static_cast<double>(mu[b * latent + j]);
        lv_b[j] = static_cast<double>(logvar[b * latent + j]);
        inv_z[j] = std::exp(-lv_b[j]);
      }
      // 1. log w_k = log p(x|z_k) + log p(z_k) - log q(z_k), residuals unweighted.
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = k * B + b;
        scalar_t* g_row = kGrad ? grad_recon + row * cols : nullptr;
        double ll;
        if constexpr (kBernoulli) {
          ll = bernoulli_row<scalar_t, kGrad>(x_row, recon + row * cols, g_row, cols, bernoulli_sum,
                                              range);
        } else {
          ll = gaussian_row<scalar_t, kGrad>(x_row, recon + row * cols, obs_row(b, row),
                                             lv_shared.data(), inv_shared.data(), g_row, cols,
                                             sum);
        }
        double latent_term = 0;  // sum of 0.5*(lv + (z-mu)^2 exp(-lv) - z^2)
        const scalar_t* z_row = z + row * latent;
        for (int64_t j = 0; j < latent; ++j) {
          const double zj = static_cast<double>(z_row[j]), d = zj - mu_b[j];
          latent_term += 0.5 * (lv_b[j] + d * d * inv_z[j] - zj * zj);
        }
        lw[k] = ll + latent_term;
      }
      // 2. The bound, max-shifted. A NaN log weight makes it NaN; all -inf gives -inf
      //    (as torch.logsumexp) with NaN weights (as its gradient).
      double m = -std::numeric_limits<double>::infinity();
      bool any_nan = false;
      for (int64_t k = 0; k < K; ++k) {
        any_nan |= std::isnan(lw[k]);
        m = std::max(m, lw[k]);
      }
      if (any_nan) m = std::numeric_limits<double>::quiet_NaN();
      double s = 0;
      if (std::isfinite(m)) {
        for (int64_t k = 0; k < K; ++k) s += std::exp(lw[k] - m);
        bound[b] = m + std::log(s) - log_k;
      } else {
        s = std::numeric_limits<double>::quiet_NaN();
        bound[b] = m;
      }
      for (int64_t k = 0; k < K; ++k) log_weights[k * B + b] = static_cast<opmath>(lw[k]);
      if constexpr (!kGrad) continue;

      // 3. d(loss)/d(log w_k) = scale * w_k on every path out of log w_k.
      std::fill(score_mu.begin(), score_mu.end(), 0.0);
      std::fill(score_lv.begin(), score_lv.end(), 0.0);
      std::fill(obs_acc.begin(), obs_acc.end(), opmath(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t row = k * B + b;
        const double c = a.scale * (std::exp(lw[k] - m) / s);
        const Vec cv(static_cast<opmath>(c));
        scalar_t* g_row = grad_recon + row * cols;
        if (grad_obs) {
          // d log p / d obs_logvar = 0.5*((x-m) * residual - 1), from the residual
          // before it is scaled.
          const scalar_t* m_row = recon + row * cols;
          const scalar_t* lv_row = obs_row(b, row);
          scalar_t* go_row = obs_kind == IWAEObs::kSample
                                 ? a.grad_obs.mutable_data_ptr<scalar_t>() + row * cols
                                 : nullptr;
          for (int64_t j = 0; j < cols; j += W) {
            const int64_t n = std::min<int64_t>(W, cols - j);
            const Vec diff = load_n(x_row + j, n) - load_n(m_row + j, n);
            Vec r;
            if constexpr (std::is_same_v<scalar_t, opmath>) {
              r = load_n(g_row + j, n);
            } else {
              // The stored residual was rounded to bf16/fp16, and (x-m)*r - 1 cancels
              // where the fit is good: form it again in opmath.
              r = diff * (lv_row != nullptr ? fast_exp(load_n(lv_row + j, n).neg())
                                            : load_n(inv_shared.data() + j, n));
            }
            const Vec q = Vec(0.5) * (diff * r - Vec(1)) * cv;
            store_n(g_row + j, r * cv, n);
            if (go_row != nullptr) {
              store_n(go_row + j, q, n);
            } else {
              store_n(obs_acc.data() + j, load_n(obs_acc.data() + j, n) + q, n);
            }
          }
        } else {
          int64_t j = 0;
          for (; j + W <= cols; j += W) store_n(g_row + j, load_n(g_row + j, W) * cv, W);
          if (j < cols) store_n(g_row + j, load_n(g_row + j, cols - j) * cv, cols - j);
        }
        const scalar_t* z_row = z + row * latent;
        scalar_t* gz_row = grad_z + row * latent;
        for (int64_t j = 0; j < latent; ++j) {
          const double zj = static_cast<double>(z_row[j]), d = zj - mu_b[j];
          const double scaled = d * inv_z[j];
          gz_row[j] = static_cast<scalar_t>(c * (scaled - zj));
          if (grad_mu) score_mu[j] -= c * scaled;
          if (grad_lv) score_lv[j] += c * 0.5 * (1.0 - d * scaled);
        }
      }
      for (int64_t j = 0; j < (grad_mu ? latent : 0); ++j) {
        grad_mu[b * latent + j] = static_cast<scalar_t>(score_mu[j]);
      }
      for (int64_t j = 0; j < (grad_lv ? latent : 0); ++j) {
        grad_lv[b * latent + j] = static_cast<scalar_t>(score_lv[j]);
      }
      if (grad_obs && obs_kind == IWAEObs::kData) {
        opmath* go = a.grad_obs.mutable_data_ptr<opmath>() + b * cols;
        std::copy(obs_acc.begin(), obs_acc.end(), go);
      } else if (obs_reduce) {
        for (int64_t j = 0; j < cols; ++j) totals[j] += static_cast<double>(obs_acc[j]);
      }
    }
    const auto x_row_of = [&](int64_t b) { return x + b * cols; };
    if (a.found_outside != nullptr &&
        range.rows_outside_unit_interval(begin, end, cols, x_row_of)) {
      found_outside.store(true, std::memory_order_relaxed);
    }
  });
  if (a.found_outside != nullptr && found_outside.load()) a.found_outside->store(true);

  if (obs_reduce) {
    // The chunks in a fixed order: run-to-run deterministic.
    double* out = a.grad_obs.mutable_data_ptr<double>();
    std::vector<double> total(cols, 0.0);
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t j = 0; j < cols; ++j) total[j] += obs_totals[c * cols + j];
    }
    if (obs_kind == IWAEObs::kScalar) {
      double s = 0;
      for (int64_t j = 0; j < cols; ++j) s += total[j];
      out[0] = s;
    } else {
      std::copy(total.begin(), total.end(), out);
    }
  }
}

template <typename scalar_t>
void iwae_dispatch(const IWAEArgs& a) {
  const bool grad = a.grad_recon.defined();
  if (a.bernoulli) {
    return grad ? iwae_rows<scalar_t, true, true>(a) : iwae_rows<scalar_t, true, false>(a);
  }
  return grad ? iwae_rows<scalar_t, false, true>(a) : iwae_rows<scalar_t, false, false>(a);
}

}  // namespace

void iwae_kernel(const IWAEArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.x.scalar_type(), "vae_fast::iwae",
                                  [&] { iwae_dispatch<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace vae_fast::cpu
