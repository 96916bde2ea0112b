"""The vae_fast functions in plain torch: the readable definition of the maths.

Used by the tests and the benchmarks as the eager baseline, and by
`with vae_fast.backend("reference"):`. Half-precision inputs are computed in
float32 and the result is cast back, exactly as the fused kernels accumulate.
"""

from __future__ import annotations

import math

import torch

from vae_fast import _random
from vae_fast import _validate as V

LOG_2PI = math.log(2.0 * math.pi)


def _opmath(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.to(V.opmath_dtype(t.dtype)) if t is not None else t for t in tensors]


def _sum_event(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    if event_dims == 0:
        return t
    return t.sum(dim=tuple(range(t.dim() - event_dims, t.dim())))


def bernoulli_log_prob(
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    event_dims: int | None = None,
    validate_args: bool | None = None,
) -> torch.Tensor:
    """Sum over the event dims of x*logits - softplus(logits)."""
    k = V.check_bernoulli_log_prob(x, logits, event_dims)
    if V.resolve_validate_args("vae_fast.bernoulli_log_prob", validate_args):
        V.check_targets_in_unit_interval("vae_fast.bernoulli_log_prob", x)
    xf, lf = _opmath(x, logits)
    # x*l - softplus(l) = (x - [l >= 0])*l - log1p(exp(-|l|)): exp never sees a positive
    # argument, and the linear part is formed first, so that a tiny loss at large |l| is
    # not lost in l + log1p(...) rounding back to l.
    coef = xf - (lf >= 0).to(lf.dtype)
    # coef*l is 0 (the limit, not 0*inf = nan) where coef = 0 at l = +-inf; the logit
    # is zeroed before the product so that no nan reaches the gradient either.
    limit = (coef == 0) & lf.isinf()
    linear = coef * torch.where(limit, 0.0, lf)
    # |l| as where(l >= 0, l, -l), whose derivative at l = 0 is 1 (abs's is 0): with the
    # indicator above, d/dl = x - 1 + 1/2 = x - sigmoid(0) there, to every order.
    magnitude = torch.where(lf >= 0, lf, -lf)
    log_p = linear - torch.log1p(torch.exp(-magnitude))
    return _sum_event(log_p, k).to(x.dtype)


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, *, event_dims: int | None = None
) -> torch.Tensor:
    """Sum over the event dims of -0.5*(log(2pi) + logvar + (x-mean)^2 exp(-logvar))."""
    k = V.check_gaussian_log_prob(x, mean, logvar, event_dims)
    xf, mf, lvf = _opmath(x, mean, logvar)
    # (x-mean)^2 * exp(-logvar) rather than / exp(logvar): no overflow to inf/inf at logvar=+-80.
    log_p = -0.5 * (LOG_2PI + lvf + (xf - mf).square() * torch.exp(-lvf))
    return _sum_event(log_p, k).to(x.dtype)


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    *,
    event_dims: int | None = None,
) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)), summed over the event dims."""
    k = V.check_gaussian_kl(mu, logvar, prior_mu, prior_logvar, event_dims)
    muf, lvf, pmf, plvf = _opmath(mu, logvar, prior_mu, prior_logvar)
    diff = muf if pmf is None else muf - pmf
    dlv = lvf if plvf is None else lvf - plvf
    scaled_sq = diff.square() if plvf is None else diff.square() * torch.exp(-plvf)
    kl = 0.5 * (_expm1_minus_x(dlv) + scaled_sq)
    return _sum_event(kl, k).to(mu.dtype)


def _expm1_minus_x(d: torch.Tensor) -> torch.Tensor:
    """exp(d) - 1 - d, the KL's variance term, to rounding for every d, with the
    derivative expm1(d) wherever that is finite (inf where exp(d) overflows)."""
    # Near 0, expm1(d) - d cancels (relative error ~2 eps/|d|): the Taylor series
    # d^2/2! + ... + d^n/n! there, with the kernels' cutoff and length per precision.
    cutoff, last = (0.01, 7) if d.dtype == torch.float64 else (0.5, 9)
    small = d.abs() < cutoff
    ds = torch.where(small, d, 0.0)
    series = torch.full_like(ds, 1 / math.factorial(last))
    for k in range(last - 1, 1, -1):
        series = series * ds + 1 / math.factorial(k)
    series = series * ds * ds
    # Each other branch sees only its own d (masked lanes read 1 or 0), so that no 0 * inf
    # from an overflowing exp reaches the gradient; at d = +inf (an infinite variance)
    # exp(d) gives inf with the gradient inf, where expm1(d) - d is inf - inf.
    infinite = d == math.inf
    dl = torch.where(small | infinite, 1.0, d)
    infinite_value = torch.exp(torch.where(infinite, d, 0.0))
    return torch.where(small, series, torch.where(infinite, infinite_value, torch.expm1(dl) - dl))


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    eps: torch.Tensor | None = None,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """mu + exp(logvar/2) * eps with eps ~ N(0, 1); shape (num_samples, *mu.shape) if given.

    A given `eps` is used as it is (a constant). Otherwise eps is torch.randn's draw
    (never the fused op's: the reference does not depend on the code it checks), so
    compare the backends with a given eps.
    """
    num_samples = V.check_reparameterize(mu, logvar, num_samples, eps)
    muf, lvf = _opmath(mu, logvar)
    if eps is None:
        eps = _random.standard_normal(mu, num_samples, generator)
    eps = eps.detach().to(muf.dtype)
    return (muf + torch.exp(0.5 * lvf) * eps).to(mu.dtype)


def elbo(
    recon: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    obs_logvar: torch.Tensor | None = None,
    beta: float | torch.Tensor = 1.0,
    reduction: str = "mean",
    inplace_grad: bool = False,
    num_samples: int | None = None,
    validate_args: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(beta*KL - log-likelihood reduced, per-sample log-likelihood, per-sample KL).

    With `num_samples` K, recon is (K, *x.shape) and the log-likelihood is the mean of
    the K samples' (x broadcast over them); the analytic KL is computed once.
    `inplace_grad` is accepted for the fused function's signature; the reference
    never writes over `recon`.
    """
    V.check_elbo(x, recon, mu, logvar, likelihood, obs_logvar, reduction)
    V.check_elbo_samples(x, recon, num_samples)
    V.check_flag("vae_fast.elbo", "inplace_grad", inplace_grad)
    beta = V.check_beta(beta, x)
    validate = V.resolve_validate_args("vae_fast.elbo", validate_args)
    if likelihood == "bernoulli" and validate:
        V.check_targets_in_unit_interval("vae_fast.elbo", x)
    # Every term in the accumulation dtype until the loss is formed: beta*kl - ll from
    # half-precision rows would lose a loss where the two nearly cancel.
    xf, rf, muf, lvf, obsf = _opmath(x, recon, mu, logvar, obs_logvar)
    ll = _sample_log_likelihood(xf, rf, likelihood, obsf)
    if num_samples is not None:  # the mean over the samples
        ll = ll.mean(0)
    kl = gaussian_kl(muf, lvf)
    loss = _reduce(beta * kl - ll, reduction)
    return loss.to(x.dtype), ll.to(x.dtype), kl.to(x.dtype)


def _sample_log_likelihood(
    x: torch.Tensor, recon: torch.Tensor, likelihood: str, obs_logvar: torch.Tensor | None
) -> torch.Tensor:
    """log p(x | recon) per row of recon, which is x's shape or (K, *x.shape): x is
    broadcast over the samples as a view, as the ops read it."""
    event_dims = x.dim() - 1
    x_k = x.expand(recon.shape)
    if likelihood == "bernoulli":
        return bernoulli_log_prob(x_k, recon, event_dims=event_dims, validate_args=False)
    obs = obs_logvar if obs_logvar is not None else x.new_zeros(())
    return gaussian_log_prob(x_k, recon, obs, event_dims=event_dims)


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    return per_row.sum() if reduction == "sum" else per_row


def iwae(
    recon: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    likelihood: str = "bernoulli",
    obs_logvar: torch.Tensor | None = None,
    estimator: str = "iwae",
    reduction: str = "mean",
    validate_args: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The negative importance-weighted bound of K samples, `vae_fast.iwae`:
    (loss, log_weights), with the op's own gradients.

    For "stl" and "dreg" log q is evaluated at stop-gradient (mu, logvar). The DReG
    reweighting of the path through z is not part of this function (nor of the op):
    `iwae` records it for `iwae_sample`'s backward, on either backend.
    """
    V.check_iwae(recon, x, z, mu, logvar, likelihood, obs_logvar, estimator, reduction)
    validate = V.resolve_validate_args(V.IWAE_FN, validate_args)
    if likelihood == "bernoulli" and validate:
        V.check_targets_in_unit_interval(V.IWAE_FN, x)
    xf, rf, zf, muf, lvf, obsf = _opmath(x, recon, z, mu, logvar, obs_logvar)
    ll = _sample_log_likelihood(xf, rf, likelihood, obsf)
    if estimator != "iwae":  # STL / DReG: no score term
        muf, lvf = muf.detach(), lvf.detach()
    # log N(z; 0, I) - log N(z; mu, exp(logvar)); log 2pi cancels.
    latent = 0.5 * (lvf + (zf - muf).square() * torch.exp(-lvf) - zf.square())
    if latent.dim() > 2:
        latent = latent.sum(dim=tuple(range(2, latent.dim())))
    log_weights = ll + latent
    # Shifted by the (constant) largest weight first: logsumexp's backward,
    # exp(w - result), sums to 1 only if result is not rounded at |log w|'s magnitude.
    peak = log_weights.detach().amax(dim=0)
    peak = torch.where(peak.isfinite(), peak, torch.zeros_like(peak))  # all -inf, or +inf
    bound = torch.logsumexp(log_weights - peak, dim=0) + peak - math.log(recon.shape[0])
    return _reduce(-bound, reduction).to(x.dtype), log_weights
