"""Data augmentation drawn from a step's generator, so that a step stays a pure function of (seed, step)."""

from __future__ import annotations

import torch


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Each image of the batch (B, C, H, W) mirrored left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
