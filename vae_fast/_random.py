"""The eps that plain-torch code draws for `reparameterize` when none is given.

The reference backend and the torch.func paths draw with torch.randn, never with the
fused op: the reference must not depend on the kernels it checks. So the two
backends agree value for value only for a given eps (`reparameterize(..., eps=...)`);
under the same seed their own draws differ (the fused op's stream is Philox, keyed by
the same generator, but not torch.randn's sequence).
"""

from __future__ import annotations

import torch

from vae_fast import _validate as V


def standard_normal(
    mu: torch.Tensor, num_samples: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """eps ~ N(0, 1) of shape mu.shape (or (num_samples, *mu.shape)) in the dtype the
    fused op accumulates in (float32 for half inputs). torch.randn follows vmap's
    randomness modes inside torch.func transforms."""
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    return torch.randn(shape, dtype=V.opmath_dtype(mu.dtype), device=mu.device, generator=generator)
