"""VAE modules over the public vae_fast functions: ELBOLoss, VAE (MLP) and ConvVAE.

The modules hold configuration and parameters; the maths is in the functions
(`vae_fast.elbo`, `vae_fast.reparameterize`, the log-densities and
`importance_log_likelihood` below). They call only the public functions, so
``with vae_fast.backend("reference"):`` runs the same model on plain torch.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

import vae_fast

LIKELIHOODS = ("bernoulli", "gaussian")
OBS_LOGVARS = ("fixed", "scalar", "feature")

__all__ = [
    "ConvVAE",
    "ELBOLoss",
    "VAE",
    "VAEOutput",
    "importance_log_likelihood",
]


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, valid))}")


# --------------------------------------------------------------------------- functions


_LOG_LIKELIHOOD_FN = "vae_fast.nn.importance_log_likelihood"


def positive_int(fn: str, name: str, value: object) -> int:
    """`value` as an int >= 1: an int or a numpy integer, not a bool or a float."""
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        n = 0
    if n < 1:
        raise ValueError(f"{fn}: `{name}` must be a positive int, got {value!r}")
    return n


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
    _check_choice("likelihood", likelihood, LIKELIHOODS)
    num_samples = positive_int(_LOG_LIKELIHOOD_FN, "num_samples", num_samples)
    max_rows = positive_int(_LOG_LIKELIHOOD_FN, "max_rows", max_rows)
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


# --------------------------------------------------------------------------- loss


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
        _check_choice("likelihood", likelihood, LIKELIHOODS)
        _check_choice("obs_logvar", obs_logvar, OBS_LOGVARS)
        _check_choice("reduction", reduction, ("mean", "sum", "none"))
        if likelihood == "bernoulli" and (obs_logvar != "fixed" or init_obs_logvar != 0.0):
            raise ValueError("obs_logvar applies to likelihood='gaussian' only")
        if obs_logvar == "feature" and event_shape is None:
            raise ValueError("obs_logvar='feature' needs the event_shape of one data row")
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


# --------------------------------------------------------------------------- models


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
        _check_choice("likelihood", likelihood, LIKELIHOODS)
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
        self.in_features = positive_int("VAE", "in_features", in_features)
        self.latent_dim = positive_int("VAE", "latent_dim", latent_dim)
        self.hidden = tuple(positive_int("VAE", "hidden", h) for h in hidden)
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
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"in_shape must be (C, H, W) of positive sizes, got {tuple(in_shape)}")
        if len(channels) == 0:
            raise ValueError("channels must give at least one conv width (one per level), got ()")
        if min(channels) < 1:
            raise ValueError(f"channels must be positive, got {tuple(channels)}")
        if latent_dim < 1 or hidden < 1:
            raise ValueError(f"latent_dim and hidden must be >= 1, got {latent_dim} and {hidden}")
        self.in_shape = self.event_shape = tuple(int(s) for s in in_shape)
        self.latent_dim, self.channels, self.hidden = int(latent_dim), tuple(channels), int(hidden)
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
