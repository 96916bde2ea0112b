"""`importance_log_likelihood`: the importance-weighted estimate of log p(x), streamed
over chunks of samples through the fused iwae op (the evaluation metric of
`VAE.log_likelihood` and the training command)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import vae_fast
from vae_fast import _validate as V

_FN = "vae_fast.nn.importance_log_likelihood"


def importance_log_likelihood(
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_samples: int,
    likelihood: str = "bernoulli",
    obs_logvar: torch.Tensor | None = None,
    max_rows: int = 1 << 16,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The importance-weighted estimate of log p(x) with q(z|x) as the proposal.

    ``log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K`` with
    ``z_k ~ q(z|x)``; a lower bound whose gap closes as K grows (Burda et al., 2016).
    The K samples are drawn and decoded in chunks of at most `max_rows` decoder rows
    (one sample per row of x, B rows, when B alone exceeds it), and the mean over K is
    taken in log space, so nothing overflows for any K.

    Args:
        x: data, shape (B, *event).
        mu, logvar: the encoder's posterior for x, shape (B, L).
        decode: maps z of shape (N, L) to decoder outputs of shape (N, *event) or
            (N, prod(event)): logits for ``"bernoulli"``, means for ``"gaussian"``.
        num_samples: K, the number of importance samples per row.
        likelihood: ``"bernoulli"`` or ``"gaussian"``.
        obs_logvar: the Gaussian observation log-variance, broadcastable to one row
            of x; None means 0.
        max_rows: the most decoder rows (K_chunk * B) evaluated at once (memory bound;
            at least one sample per row of x, B rows, is always evaluated).
        generator: where the samples come from (default: torch's global generator).

    Returns:
        The estimate for each row of x, shape (B,), in x's dtype (nats).
    """
    V.check_option(_FN, "likelihood", likelihood, V.LIKELIHOODS)
    num_samples = V.positive_int(_FN, "num_samples", num_samples)
    max_rows = V.positive_int(_FN, "max_rows", max_rows)
    batch = x.shape[0]
    chunk = max(1, min(num_samples, max_rows // max(batch, 1)))
    # Streaming over chunks of samples: each chunk's log weights come from the fused
    # iwae op (x broadcast over the samples, never repeated), and their logsumexp is
    # folded into a running one, so memory stays at one chunk for any K.
    total = None
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        z = vae_fast.reparameterize(mu, logvar, num_samples=k, generator=generator)  # (k, B, L)
        recon = decode(z.flatten(0, 1)).reshape(k, *x.shape).to(x.dtype)
        _, log_w = vae_fast.iwae(
            recon, x, z, mu, logvar, likelihood=likelihood, obs_logvar=obs_logvar, reduction="none"
        )
        part = torch.logsumexp(log_w, dim=0)
        total = part if total is None else torch.logaddexp(total, part)
    return (total - math.log(num_samples)).to(x.dtype)
