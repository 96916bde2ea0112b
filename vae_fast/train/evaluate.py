"""How a trained objective is judged: the test ELBO, the importance-weighted test
log-likelihood and the pictures of samples and reconstructions.

`objective` is the training loop's model-and-loss module: `.model` (a VAE or ConvVAE)
and `.loss` (its ELBOLoss)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from vae_fast import _plots
from vae_fast.data import Dataset, Prepared

# The pictures a run writes into --out (a run started over deletes the old ones).
SAMPLES = "samples.png"
RECONSTRUCTIONS = "reconstructions.png"
PICTURES = (SAMPLES, RECONSTRUCTIONS)


@torch.no_grad()
def evaluate(
    objective: nn.Module, x: torch.Tensor, seed: int, device: torch.device, batch: int = 4096
) -> dict[str, float]:
    """The test negative ELBO (beta = 1) and its two terms, averaged over rows, in nats."""
    g = torch.Generator(device=device).manual_seed(seed)
    total_ll = total_kl = 0.0
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch].to(device)
        out = objective.model(xb, generator=g)
        _, ll, kl = objective.loss(out.recon, xb, out.mu, out.logvar)
        total_ll += float(ll.double().sum())
        total_kl += float(kl.double().sum())
    n = x.shape[0]
    return {
        "test_loss": (total_kl - total_ll) / n,
        "test_recon": -total_ll / n,
        "test_kl": total_kl / n,
    }


@torch.no_grad()
def evaluate_log_likelihood(
    objective: nn.Module,
    x: torch.Tensor,
    k: int,
    seed: int,
    device: torch.device,
    batch: int = 1024,
) -> float:
    """Mean importance-weighted log p(x) over the rows of x (k samples each), in nats."""
    g = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    obs = objective.loss.obs_logvar_for(x)
    for start in range(0, x.shape[0], batch):
        xb = x[start : start + batch].to(device)
        ll = objective.model.log_likelihood(xb, k, obs_logvar=obs, generator=g)
        total += float(ll.double().sum())
    return total / x.shape[0]


def pictures(
    objective: nn.Module,
    prep: Prepared,
    data: Dataset,
    out: Path,
    seed: int,
    device: torch.device,
) -> tuple[Path, Path]:
    """Write samples.png and reconstructions.png to `out`, in the data's units and image
    shape; returns their paths."""
    model = objective.model
    image = data.image_shape or (1, 1, math.prod(data.event_shape))
    g = torch.Generator(device=device).manual_seed(seed)

    def to_data(t: torch.Tensor) -> torch.Tensor:
        # An MLP gives flat rows: back to the data's shape before the per-feature
        # shift and scale (of that shape), then to the picture's (C, H, W).
        t = t.float().cpu().reshape(-1, *data.event_shape) * prep.scale + prep.shift
        return t.reshape(-1, *image)

    lo, hi = (
        (0.0, 1.0)
        if prep.likelihood == "bernoulli"
        else (float(data.train.min()), float(data.train.max()))
    )
    ncol = 10 if image[2] <= 64 else 4
    samples = to_data(model.sample(ncol * ncol, generator=g))
    s = _plots.save_grid(
        samples,
        out / SAMPLES,
        f"{data.name}: {ncol * ncol} samples (mean of p(x|z), z ~ N(0, I))",
        ncol=ncol,
        vmin=lo,
        vmax=hi,
    )
    # Whole rows of test images, each followed by its reconstructions (a partial row would
    # wrap into the next one); a test set smaller than a row fills one row of its size.
    available = prep.test.shape[0]
    ncol_pairs = min(ncol, available)
    n = ncol_pairs * min(ncol // 2, available // ncol_pairs)
    shown = prep.test_shown[:n]
    recon = to_data(model.reconstruct(prep.test[:n].to(device)))
    pairs = []
    for r in range(0, n, ncol_pairs):  # alternating rows: test images, their reconstructions
        pairs += [shown[r : r + ncol_pairs].reshape(-1, *image), recon[r : r + ncol_pairs]]
    r = _plots.save_grid(
        torch.cat(pairs),
        out / RECONSTRUCTIONS,
        f"{data.name}: test images{' (binarized)' if prep.likelihood == 'bernoulli' else ''} "
        "(odd rows) and reconstructions (even rows)",
        ncol=ncol_pairs,
        vmin=lo,
        vmax=hi,
    )
    return s, r
