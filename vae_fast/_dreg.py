"""`iwae_sample`: K reparameterized samples for `vae_fast.iwae`, whose backward applies
DReG's reweighting (Tucker et al. 2019) of the gradient that reaches z.

`iwae(estimator="dreg")` leaves the normalized weights in the slot of the z it is given
(`dreg_slot`); the backward of the `iwae_sample` call that drew z multiplies every
gradient arriving at z by them, so that the path through z carries w~_k^2 while the
decoder keeps w~_k.
"""

from __future__ import annotations

import weakref

import torch

from vae_fast import _autograd, _random, reference
from vae_fast import _validate as V
from vae_fast._extension import LOAD_ERROR, ops
from vae_fast.ops import reparameterize, reparameterize_vjp

_SAMPLE_FN = "vae_fast.iwae_sample"
# The attribute by which a z drawn by `iwae_sample` names the slot its backward reads.
_SLOT = "_vae_fast_iwae_slot"


class DRegSlot:
    """What `iwae(estimator="dreg")` leaves for the backward of the `iwae_sample` call
    that drew z: the normalized weights (K, B), and which (mu, logvar) z came from."""

    __slots__ = ("mu", "logvar", "weights")

    def __init__(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mu = weakref.ref(mu)
        self.logvar = weakref.ref(logvar)
        self.weights: torch.Tensor | None = None


class _IWAESample(torch.autograd.Function):
    """z = mu + exp(logvar/2) * eps, whose backward multiplies the gradient arriving at z
    by the normalized weights that `iwae(estimator="dreg")` recorded (if any) before the
    reparameterization's own vector-Jacobian product. Every gradient reaching z from
    `iwae` (directly and through the decoder) carries w~_k once; this makes it w~_k^2.

    With the compiled sampler (`fused`), forward is vae_fast.reparameterize's op (z and
    eps in one pass) and an ordinary backward its backward kernel; otherwise, and in a
    recorded backward, plain torch on the saved tensors (differentiable again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(mu, logvar, slot, num_samples, generator, fused):
        if fused:
            return ops.reparameterize(mu, logvar, num_samples, generator=generator)
        eps = _random.standard_normal(mu, num_samples, generator)
        return reference.reparameterize(mu, logvar, eps=eps, num_samples=num_samples), eps

    @staticmethod
    def setup_context(ctx, inputs, output):
        mu, logvar, slot, _, _, fused = inputs
        _, eps = output
        ctx.mark_non_differentiable(eps)
        ctx.save_for_backward(mu, logvar, eps)
        ctx.slot, ctx.fused = slot, fused

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(
            "vae_fast.iwae_sample has no forward-mode derivative (forward AD, torch.func.jvp, "
            "jacfwd): its reweighting is of reverse-mode gradients, for estimator='dreg'; draw z "
            "with vae_fast.reparameterize(mu, logvar, num_samples=K) there"
        )

    @staticmethod
    def backward(ctx, grad_z, _grad_eps):
        mu, logvar, eps = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        weights = ctx.slot.weights
        if weights is not None:
            shape = weights.shape + (1,) * (grad_z.dim() - 2)
            grad_z = (grad_z.to(weights.dtype) * weights.reshape(shape)).to(grad_z.dtype)
        grad_mu, grad_logvar = reparameterize_vjp(
            mu, logvar, eps, eps.shape[0], needs, grad_z, fused=ctx.fused
        )
        return grad_mu, grad_logvar, None, None, None, None


def _fused_sampler(mu: torch.Tensor, logvar: torch.Tensor) -> bool:
    """Whether iwae_sample draws with the compiled reparameterize op (the reference
    backend, torch.func transforms and devices without its kernel draw in torch)."""
    return (
        LOAD_ERROR is None
        and not _autograd.runs_reference(mu, logvar)
        and torch._C._dispatch_has_kernel_for_dispatch_key(
            "vae_fast::reparameterize", mu.device.type.upper()
        )
    )


def iwae_sample(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """K reparameterized samples z_k = mu + exp(logvar/2) * eps_k for `iwae`.

    Required for ``iwae(..., estimator="dreg")`` and usable with every estimator. z is
    an ordinary differentiable tensor; in addition, its backward applies DReG's
    reweighting when (and only when) `iwae(estimator="dreg")` was called with this z.

    What the user must do for DReG:
        z = vae_fast.iwae_sample(mu, logvar, K)
        recon = decoder(z)                      # any function of z, shape (K, B, ...)
        loss, log_w = vae_fast.iwae(recon, x, z, mu, logvar, estimator="dreg")
    i.e. pass this very tensor (not a view, copy, ``.detach()`` or slice of it: iwae
    raises a ValueError then) and the very `mu`, `logvar` it was drawn from, one
    iwae(estimator="dreg") call per draw (a second one raises).

    What the user must not do: let z reach the loss by another way than the decoder
    and iwae (a regularizer on z, a second loss), because every gradient arriving at z
    is reweighted; compute such terms from a separate draw or from ``z.detach()``.
    ``estimator="dreg"`` does not run inside torch.compile (the weights are handed over
    at run time); compile the encoder and decoder, or use "stl". Here, under
    torch.compile, iwae_sample returns a plain reparameterized z.

    eps is vae_fast.reparameterize's stream with the fused backend (the same draw under
    the same seed), torch.randn's with the reference backend.

    Args:
        mu, logvar: the encoder's diagonal Gaussian, shape (B, ...).
        num_samples: K >= 1.
        generator: an explicit torch.Generator for eps.

    Returns:
        z of shape (K, *mu.shape), in mu's dtype.
    """
    V.check_tensors(_SAMPLE_FN, mu=mu, logvar=logvar)
    V.check_same_shape(_SAMPLE_FN, "mu", mu, "logvar", logvar)
    num_samples = V.positive_int(_SAMPLE_FN, "num_samples", num_samples)
    if mu.dim() < 1:
        raise ValueError(
            f"{_SAMPLE_FN}: `mu` needs a leading batch dim, got shape {tuple(mu.shape)}"
        )
    if torch.compiler.is_compiling():  # no DReG there: a plain reparameterized z
        return reparameterize(mu, logvar, num_samples=num_samples, generator=generator)
    slot = DRegSlot(mu, logvar)
    fused = _fused_sampler(mu, logvar)
    z, _ = _IWAESample.apply(mu, logvar, slot, num_samples, generator, fused)
    setattr(z, _SLOT, slot)
    return z


def dreg_slot(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> DRegSlot:
    """The slot of a z drawn by `iwae_sample` from these (mu, logvar); raises otherwise."""
    fn = f"{V.IWAE_FN}(estimator='dreg')"
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"{fn} cannot run inside torch.compile: the normalized weights are handed to "
            "iwae_sample's backward at run time. Compile the encoder and decoder and call "
            "iwae_sample and iwae outside, or use estimator='stl'"
        )
    slot = getattr(z, _SLOT, None) if isinstance(z, torch.Tensor) else None
    if slot is None:
        raise ValueError(
            f"{fn}: `z` must be the tensor returned by vae_fast.iwae_sample(mu, logvar, K), "
            "as it is (not a view, copy, slice or detached version): DReG reweights the "
            "gradient that reaches z through the decoder, which only iwae_sample's backward "
            "can do. With z = mu + sigma*eps built by hand, use estimator='stl' or 'iwae'. "
            "(Inside torch.compile iwae_sample returns a plain z, so a z drawn in a "
            "compiled region cannot take DReG either)"
        )
    if slot.mu() is not mu or slot.logvar() is not logvar:
        raise ValueError(
            f"{fn}: `mu` and `logvar` must be the very tensors z was drawn from "
            "(vae_fast.iwae_sample(mu, logvar, K))"
        )
    if slot.weights is not None and torch.is_grad_enabled():
        raise ValueError(
            f"{fn}: this z was already used by an iwae(estimator='dreg') call that records "
            "gradients; its backward can reweight z's gradient for one call only. Draw "
            "fresh samples with vae_fast.iwae_sample for each loss"
        )
    return slot
