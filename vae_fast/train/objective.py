"""What a run optimizes: the model of --model and its loss in one module (`Objective`),
with the objective of --bound and --num-samples (the ELBO, the multi-sample ELBO or the
importance-weighted bound)."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

import vae_fast
from vae_fast.data import Dataset
from vae_fast.nn import VAE, ConvVAE, ELBOLoss
from vae_fast.train.config import ACTIVATIONS, Config, ConfigError


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


def build_objective(cfg: Config, data: Dataset, likelihood: str, device: torch.device) -> Objective:
    """The model of --model and its loss (on the CPU, initialized from torch's generator);
    a model too large to train on `device` is refused before any of it is allocated."""
    activation = ACTIVATIONS[cfg.activation]

    def make_model() -> nn.Module:
        if cfg.model == "conv":  # the config checked that the rows are images
            return ConvVAE(
                data.image_shape,
                cfg.latent_dim,
                cfg.channels,
                cfg.hidden[0],
                likelihood,
                activation,
            )
        return VAE(math.prod(data.event_shape), cfg.latent_dim, cfg.hidden, likelihood, activation)

    with torch.device("meta"):  # shapes only: no memory, no draw from the generator
        parameters = sum(p.numel() for p in make_model().parameters())
    _check_fits(parameters, device)
    loss = ELBOLoss(
        likelihood,
        cfg.obs_logvar if likelihood == "gaussian" else "fixed",
        beta=cfg.beta,
        event_shape=data.event_shape,
        inplace_grad=cfg.inplace_grad,
    )
    return Objective(
        make_model(), loss, bound=cfg.bound, num_samples=cfg.num_samples, estimator=cfg.estimator
    )


# float32 bytes per parameter while training with AdamW: the value, its gradient and
# the two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def _check_fits(parameters: int, device: torch.device) -> None:
    """A model whose parameters alone (with their gradients and AdamW's moments) exceed
    the device's memory is a bad option, not an allocation traceback mid-set-up."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = parameters * TRAINING_BYTES_PER_PARAMETER
    if need > memory:
        raise ConfigError(
            f"--hidden/--latent-dim/--channels: the model has {parameters:,} parameters, "
            f"{need / 2**30:.3g} GiB to train (values, gradients and AdamW's two moments), "
            f"more than the {memory / 2**30:.3g} GiB of {device.type} memory"
        )
