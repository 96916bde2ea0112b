"""`ELBOLoss`: the negative ELBO as a module over `vae_fast.elbo`, owning beta and,
for the Gaussian likelihood, the observation log-variance."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

import vae_fast
from vae_fast import _validate as V

OBS_LOGVARS = ("fixed", "scalar", "feature")


class ELBOLoss(nn.Module):
    """The negative ELBO, ``beta * KL(q(z|x) || N(0, I)) - log p(x|z)``, over `vae_fast.elbo`.

    For the Gaussian likelihood the module owns the observation log-variance:
    ``"fixed"`` keeps it at `init_obs_logvar` (a buffer), ``"scalar"`` learns one value
    and ``"feature"`` one per feature (of shape `event_shape`), by gradient descent
    along with the model.

    Args:
        likelihood: ``"bernoulli"`` (decoder outputs logits) or ``"gaussian"`` (means).
        obs_logvar: ``"fixed"``, ``"scalar"`` or ``"feature"`` (Gaussian only).
        beta: weight of the KL term, a number; an attribute, so a KL warm-up can change
            it (a learnable beta is `vae_fast.elbo`'s, which takes a tensor).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.
        event_shape: the shape of one data row, required for ``obs_logvar="feature"``;
            when given, x's rows are checked against it.
        init_obs_logvar: the initial (or fixed) observation log-variance.
        inplace_grad: write d(loss)/d(recon) over the decoder output instead of a fresh
            tensor (see `vae_fast.elbo`); `recon` holds the gradient after the call.

    Shape:
        forward(recon (B, *event), x (B, *event), mu (B, L), logvar (B, L)) returns
        ``(loss, log_likelihood (B,), kl (B,))`` with loss reduced as asked; with
        ``num_samples=K``, recon is (K, B, *event) (the multi-sample ELBO).
    """

    def __init__(
        self,
        likelihood: str = "bernoulli",
        obs_logvar: str = "fixed",
        beta: float = 1.0,
        reduction: str = "mean",
        *,
        event_shape: Sequence[int] | None = None,
        init_obs_logvar: float = 0.0,
        inplace_grad: bool = False,
    ) -> None:
        super().__init__()
        V.check_option("ELBOLoss", "likelihood", likelihood, V.LIKELIHOODS)
        V.check_option("ELBOLoss", "obs_logvar", obs_logvar, OBS_LOGVARS)
        V.check_option("ELBOLoss", "reduction", reduction, V.REDUCTIONS)
        if likelihood == "bernoulli" and (obs_logvar != "fixed" or init_obs_logvar != 0.0):
            raise ValueError("ELBOLoss: `obs_logvar` applies to likelihood='gaussian' only")
        if obs_logvar == "feature" and event_shape is None:
            raise ValueError("ELBOLoss: obs_logvar='feature' needs the event_shape of one data row")
        self.likelihood = likelihood
        self.obs_logvar_mode = obs_logvar
        # A 0-d buffer: a compiled loss sees a new value, not a new constant, so a KL
        # warm-up does not recompile it.
        self.register_buffer(
            "_beta", torch.tensor(_beta_value(beta), dtype=torch.float64), persistent=False
        )
        self.reduction = reduction
        self.inplace_grad = bool(inplace_grad)
        self.event_shape = tuple(event_shape) if event_shape is not None else None
        self.obs_logvar: torch.Tensor | None
        if likelihood == "bernoulli":
            self.obs_logvar = None
        elif obs_logvar == "fixed":
            self.register_buffer("obs_logvar", torch.tensor(float(init_obs_logvar)))
        else:
            shape = () if obs_logvar == "scalar" else self.event_shape
            self.obs_logvar = nn.Parameter(torch.full(shape, float(init_obs_logvar)))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating buffers; beta keeps its float64 value (0.3 in
        # bfloat16 is 0.30078125) and only follows the module's device.
        beta = self._beta
        super()._apply(fn, recurse)
        self._beta = beta.to(self._beta.device)
        return self

    @property
    def beta(self) -> float:
        """The weight of the KL term."""
        return float(self._beta)

    @beta.setter
    def beta(self, value: float) -> None:
        # A new tensor, not the old one changed in place: a graph built with the old
        # value saved that one for its backward.
        self._beta = torch.tensor(_beta_value(value), dtype=torch.float64, device=self._beta.device)

    def forward(
        self,
        recon: torch.Tensor,
        x: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        *,
        num_samples: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`vae_fast.elbo` with this module's options; `num_samples` K takes recon of shape
        (K, *x.shape), the multi-sample ELBO."""
        # x is taken as it is: integer data is refused by vae_fast.elbo, never scaled
        # here (uint8 pixels of 0..255 are not Bernoulli targets). Under autocast the
        # half decoder output runs in float32 there, as torch's own losses do.
        if self.event_shape is not None and tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(
                f"ELBOLoss: `x` has rows of shape {tuple(x.shape[1:])}, but this loss was "
                f"built for event_shape {self.event_shape}"
            )
        obs = self.obs_logvar_for(recon)
        return vae_fast.elbo(
            recon,
            x,
            mu,
            logvar,
            likelihood=self.likelihood,
            obs_logvar=obs,
            beta=self._beta,
            reduction=self.reduction,
            inplace_grad=self.inplace_grad,
            num_samples=num_samples,
        )

    def obs_logvar_for(self, recon: torch.Tensor) -> torch.Tensor | None:
        """The observation log-variance in the dtype a loss of `recon` runs in: recon's
        (a model cast to bfloat16 as a whole, or to float64), except for a half recon
        under autocast, where the loss runs in float32 and a float32 parameter is passed
        as it is (not rounded to bf16)."""
        obs = self.obs_logvar
        if obs is None or not recon.is_floating_point():
            return obs
        dtype = recon.dtype
        if dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(
            recon.device.type
        ):
            dtype = torch.float32
        return obs.to(dtype)

    def extra_repr(self) -> str:
        s = f"likelihood={self.likelihood!r}"
        if self.likelihood == "gaussian":
            s += f", obs_logvar={self.obs_logvar_mode!r}"
            if self.event_shape is not None:
                s += f", event_shape={self.event_shape}"
        s += f", beta={self.beta}, reduction={self.reduction!r}"
        return s + (", inplace_grad=True" if self.inplace_grad else "")


def _beta_value(value: float) -> float:
    """ELBOLoss's beta: a number. (A learnable beta is vae_fast.elbo's: a module that
    holds a warm-up weight would drop its gradient.)"""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(
                "ELBOLoss: `beta` requires grad, but the module keeps beta as a constant "
                "weight; for a learnable beta call vae_fast.elbo(..., beta=tensor)"
            )
        if value.numel() != 1:
            raise ValueError(f"ELBOLoss: `beta` must be a number, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # (numpy's too)
        raise TypeError(f"ELBOLoss: `beta` must be a number, got {value!r}")
    return float(value)
