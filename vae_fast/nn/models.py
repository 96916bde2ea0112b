"""The VAE models: `VAE` (MLP encoder and decoder) and `ConvVAE` (strided convolutions),
sharing encode / reparameterize / decode, sampling, reconstruction and the
importance-weighted log-likelihood."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

import vae_fast
from vae_fast import _validate as V
from vae_fast.nn.importance import importance_log_likelihood


class VAEOutput(NamedTuple):
    """What a VAE's forward returns (a NamedTuple, so DistributedDataParallel passes it on)."""

    recon: torch.Tensor  # decoder output in x's shape: logits (bernoulli) or means (gaussian)
    mu: torch.Tensor  # (B, latent_dim) posterior mean
    logvar: torch.Tensor  # (B, latent_dim) posterior log-variance
    z: torch.Tensor  # (B, latent_dim) the reparameterized sample that was decoded


class _VAEBase(nn.Module):
    """What VAE and ConvVAE share. A subclass builds `encoder` (rows of `event_shape` to
    2 * latent_dim features: mu, then logvar) and `decoder` (z to logits or means), and
    names its constructor arguments in `_config`, which `extra_repr` shows."""

    _config: tuple[str, ...]
    latent_dim: int
    event_shape: tuple[int, ...]
    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, likelihood: str) -> None:
        super().__init__()
        V.check_option(type(self).__name__, "likelihood", likelihood, V.LIKELIHOODS)
        self.likelihood = likelihood

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), each (B, latent_dim)."""
        h = self.encoder(x.reshape(x.shape[0], *self.event_shape))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder outputs (logits or means) of shape (N, *event_shape) for z of (N, L)."""
        return self.decoder(z)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._config)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> VAEOutput:
        """Encode x (B, *event_shape), draw z ~ q(z|x) and decode it."""
        mu, logvar = self.encode(x)
        z = vae_fast.reparameterize(mu, logvar, generator=generator)
        return VAEOutput(self.decode(z).reshape(x.shape), mu, logvar, z)

    def _mean(self, recon: torch.Tensor) -> torch.Tensor:
        # The mean of p(x|z): the decoder's means, or the Bernoulli probabilities.
        return torch.sigmoid(recon) if self.likelihood == "bernoulli" else recon

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws z ~ N(0, I) decoded to the mean of p(x|z), shape (n, *event_shape)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self._mean(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z) at z = the posterior mean of x: x's shape, in data space."""
        mu, _ = self.encode(x)
        return self._mean(self.decode(mu)).reshape(x.shape)

    @torch.no_grad()
    def log_likelihood(
        self,
        x: torch.Tensor,
        num_samples: int = 1000,
        *,
        obs_logvar: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        max_rows: int = 1 << 16,
    ) -> torch.Tensor:
        """The importance-weighted estimate of log p(x) per row, shape (B,), in nats.

        An evaluation metric (no gradients); see `importance_log_likelihood`.
        `obs_logvar` is the Gaussian observation log-variance (e.g. ``ELBOLoss.obs_logvar``).
        """
        mu, logvar = self.encode(x)
        return importance_log_likelihood(
            x,
            mu.to(x.dtype),
            logvar.to(x.dtype),
            self.decode,
            num_samples=num_samples,
            likelihood=self.likelihood,
            obs_logvar=obs_logvar,
            max_rows=max_rows,
            generator=generator,
        )


def _mlp(sizes: Sequence[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    """Linear layers through `sizes` with an activation after each but the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class VAE(_VAEBase):
    """A VAE with MLP encoder and decoder and a diagonal Gaussian posterior.

    Args:
        in_features: the size of one (flattened) data row.
        latent_dim: L, the size of z.
        hidden: encoder layer widths; the decoder mirrors them.
        likelihood: ``"bernoulli"`` (decoder outputs logits) or ``"gaussian"`` (means).
        activation: the nonlinearity between layers (a module class).

    Inputs of any shape (B, ...) with ``prod(...) == in_features`` are flattened;
    `forward` returns `recon` in the input's shape, `decode` and `sample` give (N, in_features).
    """

    _config = ("in_features", "latent_dim", "hidden", "likelihood")

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        hidden: Sequence[int] = (512, 256),
        likelihood: str = "bernoulli",
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(likelihood)
        self.in_features = V.positive_int("VAE", "in_features", in_features)
        self.latent_dim = V.positive_int("VAE", "latent_dim", latent_dim)
        self.hidden = tuple(V.positive_int("VAE", "hidden", h) for h in hidden)
        self.event_shape = (self.in_features,)
        self.encoder = _mlp((self.in_features, *self.hidden, 2 * self.latent_dim), activation)
        self.decoder = _mlp((self.latent_dim, *reversed(self.hidden), self.in_features), activation)


class ConvVAE(_VAEBase):
    """A VAE for images: strided 3x3 convolutions down, transposed convolutions up.

    Each conv halves H and W (rounding up); the decoder undoes them exactly (the
    output padding is chosen per level), so any H and W work, e.g. 8x8 digits or 28x28.

    Args:
        in_shape: (C, H, W) of one image.
        latent_dim: L, the size of z.
        channels: conv widths, one stride-2 level each.
        hidden: width of the fully connected layer between the convs and z.
        likelihood: ``"bernoulli"`` (decoder outputs logits) or ``"gaussian"`` (means).
        activation: the nonlinearity between layers (a module class).
    """

    _config = ("in_shape", "latent_dim", "channels", "hidden", "likelihood")

    def __init__(
        self,
        in_shape: Sequence[int],
        latent_dim: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 256,
        likelihood: str = "bernoulli",
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(likelihood)
        in_shape, channels = tuple(in_shape), tuple(channels)
        if len(in_shape) != 3:
            raise ValueError(f"ConvVAE: `in_shape` must be (C, H, W), got {in_shape}")
        if not channels:
            raise ValueError(
                "ConvVAE: `channels` must give at least one conv width (one per level)"
            )
        self.in_shape = self.event_shape = tuple(
            V.positive_int("ConvVAE", "in_shape", s) for s in in_shape
        )
        self.channels = tuple(V.positive_int("ConvVAE", "channels", c) for c in channels)
        self.latent_dim = V.positive_int("ConvVAE", "latent_dim", latent_dim)
        self.hidden = V.positive_int("ConvVAE", "hidden", hidden)
        c, h, w = self.in_shape
        sizes = [(h, w)]
        down: list[nn.Module] = []
        for c_in, c_out in zip((c, *self.channels[:-1]), self.channels):
            down += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), activation()]
            h, w = (h + 1) // 2, (w + 1) // 2
            sizes.append((h, w))
        self._bottom = (self.channels[-1], h, w)
        flat = self.channels[-1] * h * w
        self.encoder = nn.Sequential(
            *down,
            nn.Flatten(),
            nn.Linear(flat, self.hidden),
            activation(),
            nn.Linear(self.hidden, 2 * self.latent_dim),
        )
        up: list[nn.Module] = [
            nn.Linear(self.latent_dim, self.hidden),
            activation(),
            nn.Linear(self.hidden, flat),
            activation(),
            nn.Unflatten(1, self._bottom),
        ]
        outs = (c, *self.channels[:-1])
        for level in reversed(range(len(self.channels))):
            (h_out, w_out), (h_in, w_in) = sizes[level], sizes[level + 1]
            # a stride-2, pad-1, 3x3 transposed conv gives 2n-1; output_padding adds the rest
            pad = (h_out - (2 * h_in - 1), w_out - (2 * w_in - 1))
            up.append(
                nn.ConvTranspose2d(
                    self.channels[level], outs[level], 3, stride=2, padding=1, output_padding=pad
                )
            )
            if level > 0:
                up.append(activation())
        self.decoder = nn.Sequential(*up)
