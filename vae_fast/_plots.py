"""PNG grids of samples and reconstructions for the training command (matplotlib, no display)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, ncol: int, pad: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images into one (rows*(H+pad)-pad, ncol*(W+pad)-pad[, C]) array."""
    images = images.detach().float().cpu()
    n, c, h, w = images.shape
    nrow = -(-n // ncol)
    grid = torch.full((c, nrow * (h + pad) - pad, ncol * (w + pad) - pad), float("nan"))
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = images[i]
    out = grid.permute(1, 2, 0).numpy()
    return out[..., 0] if c == 1 else out


def save_grid(
    images: torch.Tensor,
    path: Path,
    title: str,
    *,
    ncol: int = 10,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> Path:
    """Write images (N, C, H, W) as a titled PNG grid at `path` (atomically) and return it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    grid = image_grid(images, ncol)
    if grid.ndim == 3:  # colour: imshow wants [0, 1]
        grid = np.clip((grid - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    height, width = grid.shape[:2]
    scale = 6.0 / max(height, width)
    fig, ax = plt.subplots(figsize=(max(width * scale, 3.0), max(height * scale, 1.0) + 0.4))
    cmap = plt.get_cmap("gray").with_extremes(bad="#4060a0")  # bad (nan): the padding
    ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
