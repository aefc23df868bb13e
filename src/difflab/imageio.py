"""Writing samples: PNG grids and .npz arrays of uint8 images, both atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.files import atomic_write


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) to one uint8 (rows*H', cols*W', C) image, tiles separated by ``padding``."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images.cpu().numpy()):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image.transpose(1, 2, 0)
    return grid


def grid_picture(images: torch.Tensor, columns: int | None = None, scale: int = 1, padding: int = 2) -> Image.Image:
    """``make_grid`` as a PIL image (grey or RGB), its pixels enlarged ``scale`` times."""
    grid = make_grid(images, columns, padding)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    return picture


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 1,
              padding: int = 2) -> Path:
    picture = grid_picture(images, columns, scale, padding)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def density_image(points: torch.Tensor, size: int = 256, extent: float = 3.0) -> torch.Tensor:
    """A 2-D point set drawn as a uint8 (1, 1, size, size) density image (for the toy data sets): dark where
    points are dense, over the square [-extent, extent]^2."""
    xy = points.cpu().numpy()
    hist, _, _ = np.histogram2d(xy[:, 1], xy[:, 0], bins=size, range=[[-extent, extent], [-extent, extent]])
    image = (255 * (1 - np.clip(hist / max(hist.max() * 0.5, 1), 0, 1)))[::-1].astype(np.uint8)
    return torch.from_numpy(image.copy())[None, None]


def save_scatter(points: torch.Tensor, path: str | Path, size: int = 256, extent: float = 3.0) -> Path:
    """A 2-D point set drawn as a density image (``density_image``)."""
    return save_grid(density_image(points, size, extent), path, padding=0)


def save_npz(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return atomic_write(path, write)

