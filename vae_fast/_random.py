"""The eps of `reparameterize`, one draw for both backends.

The fused op draws eps from a Philox stream keyed by torch's generator (see
`vae_fast.reparameterize`). The reference backend takes that very draw whenever the
compiled op can run on the tensor's device, so the two backends agree draw for draw
under the same seed (and a model gives the same numbers on either); elsewhere (a
checkout that was never built, a device without kernels) it draws with torch.randn.
"""

from __future__ import annotations

import torch

from vae_fast import _validate as V


def _fused_op_runs_on(device: torch.device) -> bool:
    try:
        from vae_fast import _C  # noqa: F401  (registers the operators)
    except ImportError:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "vae_fast::reparameterize", device.type.upper()
    )


def standard_normal(
    mu: torch.Tensor, num_samples: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """eps ~ N(0, 1) of shape mu.shape (or (num_samples, *mu.shape)) in the dtype the
    fused op accumulates in (float32 for half inputs), as the fused op draws it."""
    # Inside torch.func transforms torch.randn follows vmap's randomness modes.
    if _fused_op_runs_on(mu.device) and not torch._C._are_functorch_transforms_active():
        zeros = torch.zeros(mu.shape, dtype=mu.dtype, device=mu.device)
        _, eps = torch.ops.vae_fast.reparameterize(zeros, zeros, num_samples, generator=generator)
        return eps
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    return torch.randn(shape, dtype=V.opmath_dtype(mu.dtype), device=mu.device, generator=generator)
