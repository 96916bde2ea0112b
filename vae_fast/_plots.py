"""PNG grids of samples and reconstructions for the training command (matplotlib, no display).

Each data pixel becomes a block of `zoom` x `zoom` screen pixels (nearest neighbour: no
smoothing) and the cells are parted by one screen pixel of neutral grey, so the
separators stay thin however small the images are (8x8 digits included). The grid is
written pixel for pixel (no resampling), under a one-line title.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SEPARATOR = (0.6, 0.6, 0.6)  # neutral grey: visible next to black and to white pixels
INVALID = (1.0, 0.0, 1.0)  # magenta: nan/inf pixels, which no data value maps to
TARGET_PX = 600  # about this many screen pixels across the grid's longer side
TITLE_PX = 24
DPI = 100


def image_grid(
    images: torch.Tensor, ncol: int, pad: int = 1, zoom: int = 1, fill: float = float("nan")
) -> np.ndarray:
    """Tile (N, C, H, W) images into one (rows*(zoom*H+pad)-pad, ncol*(zoom*W+pad)-pad[, C])
    array: each pixel repeated `zoom` times along H and W, `fill` between the cells."""
    x = images.detach().float().cpu().numpy()
    if zoom > 1:
        x = x.repeat(zoom, axis=2).repeat(zoom, axis=3)
    n, c, h, w = x.shape
    nrow = max(1, -(-n // ncol))
    grid = np.full((nrow * (h + pad) - pad, ncol * (w + pad) - pad, c), fill, dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = r * (h + pad), q * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = x[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def grid_rgb(
    images: torch.Tensor, ncol: int = 10, *, vmin: float = 0.0, vmax: float = 1.0
) -> np.ndarray:
    """The picture `save_grid` writes, as an (H, W, 3) float array in [0, 1]: grey levels
    (one channel) or colours (three; four are composited over white) mapped from
    [vmin, vmax], one-pixel SEPARATOR lines between the cells, INVALID for nan/inf."""
    x = images.detach().float().cpu()
    n, c, h, w = x.shape
    if c not in (1, 3, 4):  # channels that make no picture: show the first one
        x, c = x[:, :1], 1
    nrow = max(1, -(-n // ncol))
    zoom = max(1, TARGET_PX // max(nrow * h, min(n, ncol) * w))
    values = image_grid(x, ncol, 1, zoom, fill=0.0)
    if values.ndim == 2:
        values = values[..., None]
    cells = image_grid(torch.ones(n, 1, h, w), ncol, 1, zoom, fill=0.0) > 0
    bad = image_grid((~torch.isfinite(x).all(1, keepdim=True)).float(), ncol, 1, zoom, 0.0) > 0
    v = np.clip((np.nan_to_num(values) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    if c == 1:
        rgb = np.repeat(v, 3, axis=-1)
    elif c == 3:
        rgb = v
    else:
        rgb = v[..., :3] * v[..., 3:] + (1.0 - v[..., 3:])
    rgb[~cells] = SEPARATOR
    rgb[bad] = INVALID
    return rgb


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

    rgb = grid_rgb(images, ncol, vmin=vmin, vmax=vmax)
    height, width = rgb.shape[:2]
    fig_width = max(width, 6 * len(title) + 20)  # room for the title at 9 points
    fig = plt.figure(figsize=(fig_width / DPI, (height + TITLE_PX) / DPI), dpi=DPI)
    # figimage puts array pixels on screen pixels one to one: no resampling, so the
    # one-pixel separators stay one pixel.
    fig.figimage(rgb, xo=(fig_width - width) // 2, yo=0, origin="upper")
    top = 1.0 - TITLE_PX / 2 / (height + TITLE_PX)
    fig.text(0.5, top, title, ha="center", va="center", fontsize=9)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
