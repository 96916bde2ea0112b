"""What bench/ops.py times vae_fast against: eager torch, torch.distributions, torch.compile, and
the memory-bandwidth roofs.

The peers are written the way a user would write them, not tuned: this is what vae_fast
replaces. Each elbo is its likelihood's log-density and the KL term of the same family, so
the two ways of writing a term are written once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- eager torch


def eager_gaussian_kl(mu, logvar):
    return 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(-1)


def eager_reparameterize(mu, logvar):
    std = torch.exp(0.5 * logvar)
    return mu + std * torch.randn_like(std)


def eager_bernoulli_log_prob(x, logits):
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def eager_gaussian_log_prob(x, mean, logvar):
    return (-0.5 * (LOG_2PI + logvar + (x - mean).pow(2) / logvar.exp())).sum(-1)


# --------------------------------------------------------------------------- torch.distributions


def dist_gaussian_kl(mu, logvar):
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    return kl_divergence(Normal(mu, (0.5 * logvar).exp()), prior).sum(-1)


def dist_reparameterize(mu, logvar):
    return Normal(mu, (0.5 * logvar).exp()).rsample()


def dist_bernoulli_log_prob(x, logits):
    return Bernoulli(logits=logits).log_prob(x).sum(-1)


def dist_gaussian_log_prob(x, mean, logvar):
    return Normal(mean, (0.5 * logvar).exp()).log_prob(x).sum(-1)


# --------------------------------------------------------------------------- the elbos


def _elbo(log_prob: Callable, kl: Callable) -> Callable:
    """The negative ELBO (mean over the batch), log-likelihood and KL, as vae_fast.elbo
    returns them, from one log-density and one KL; `obs` is the Gaussian's obs_logvar."""

    def elbo(recon, x, mu, logvar, *obs):
        ll = log_prob(x, recon, *obs)
        kl_ = kl(mu, logvar)
        return (kl_ - ll).mean(), ll, kl_

    return elbo


eager_elbo_bernoulli = _elbo(eager_bernoulli_log_prob, eager_gaussian_kl)
eager_elbo_gaussian = _elbo(eager_gaussian_log_prob, eager_gaussian_kl)
dist_elbo_bernoulli = _elbo(dist_bernoulli_log_prob, dist_gaussian_kl)
dist_elbo_gaussian = _elbo(dist_gaussian_log_prob, dist_gaussian_kl)


# --------------------------------------------------------------------------- torch.compile


def compiled(eager: Callable) -> Callable:
    """torch.compile of an eager peer: one static graph per shape and grad mode, compiled
    by the first call (the runner's warm-up), never inside the timing."""
    return torch.compile(eager, dynamic=False)


# --------------------------------------------------------------------------- the roofs


class Roofs(NamedTuple):
    """The bandwidth roof on n elements, into a reused output ("roof") and into a fresh
    one ("roof_alloc": its time less the roof's is what allocating the output costs)."""

    fns: dict[str, Callable[[], object]]
    bytes: int  # what one call moves
    kind: str  # "triad" (CPU) or "copy" (CUDA)


def make_roofs(n: int, dtype: torch.dtype, device: str) -> Roofs:
    """A triad torch.add(p, q, out=r) on the CPU (3 arrays moved), a device-to-device copy
    on CUDA (2 arrays)."""
    p = torch.rand(n, dtype=dtype, device=device)
    q = torch.rand(n, dtype=dtype, device=device)
    r = torch.empty(n, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    if device == "cuda":
        return Roofs(
            {"roof": lambda: r.copy_(p), "roof_alloc": lambda: p.clone()}, 2 * n * size, "copy"
        )
    fns = {"roof": lambda: torch.add(p, q, out=r), "roof_alloc": lambda: torch.add(p, q)}
    return Roofs(fns, 3 * n * size, "triad")
