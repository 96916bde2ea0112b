"""What a run optimizes: the model of --model and its loss in one module (`Objective`),
with the objective of --bound and --num-samples (the ELBO, the multi-sample ELBO or the
importance-weighted bound)."""

from __future__ import annotations

import math

import torch
from torch import nn

import vae_fast
from vae_fast.data import Dataset
from vae_fast.nn import VAE, ConvVAE, ELBOLoss
from vae_fast.train.config import ACTIVATIONS, Config


class Objective(nn.Module):
    """Model and loss in one module, so that DDP averages the gradients of both (the
    Gaussian observation log-variance is a parameter of the loss).

    `bound` "elbo" with one sample is the model's forward and `loss`; with K samples
    the multi-sample ELBO (`ELBOLoss` over recon of shape (K, B, ...)); "iwae" the
    importance-weighted bound of K samples (`vae_fast.iwae`, with `estimator`'s
    gradients; z from `vae_fast.iwae_sample`, which DReG needs)."""

    def __init__(
        self,
        model: nn.Module,
        loss: ELBOLoss,
        *,
        bound: str = "elbo",
        num_samples: int = 1,
        estimator: str | None = None,
    ) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.bound, self.num_samples, self.estimator = bound, num_samples, estimator

    def forward(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.bound == "elbo" and self.num_samples == 1:
            out = self.model(x, generator=generator)
            return self.loss(out.recon, x, out.mu, out.logvar)
        k = self.num_samples
        mu, logvar = self.model.encode(x)
        if self.bound == "iwae":
            z = vae_fast.iwae_sample(mu, logvar, k, generator=generator)
        else:
            z = vae_fast.reparameterize(mu, logvar, num_samples=k, generator=generator)
        recon = self.model.decode(z.flatten(0, 1)).reshape(k, *x.shape)
        if self.bound == "elbo":
            return self.loss(recon, x, mu, logvar, num_samples=k)
        loss, log_weights = vae_fast.iwae(
            recon,
            x,
            z,
            mu,
            logvar,
            likelihood=self.loss.likelihood,
            obs_logvar=self.loss.obs_logvar_for(recon),
            estimator=self.estimator,
        )
        return loss, log_weights, None


def build_objective(cfg: Config, data: Dataset, likelihood: str) -> Objective:
    """The model of --model and its loss (on the CPU, initialized from torch's generator)."""
    activation = ACTIVATIONS[cfg.activation]
    if cfg.model == "conv":  # the config checked that the rows are images
        model: nn.Module = ConvVAE(
            data.image_shape, cfg.latent_dim, cfg.channels, cfg.hidden[0], likelihood, activation
        )
    else:
        model = VAE(math.prod(data.event_shape), cfg.latent_dim, cfg.hidden, likelihood, activation)
    loss = ELBOLoss(
        likelihood,
        cfg.obs_logvar if likelihood == "gaussian" else "fixed",
        beta=cfg.beta,
        event_shape=data.event_shape,
        inplace_grad=cfg.inplace_grad,
    )
    return Objective(
        model, loss, bound=cfg.bound, num_samples=cfg.num_samples, estimator=cfg.estimator
    )
