"""Sliced Wasserstein-1 distance between two point sets (Rabin et al. 2011; Bonneel et al. 2015).

Both sets are projected on random unit directions; in 1-D the Wasserstein-1 distance between equal-size
empirical distributions is the mean absolute difference of their sorted values.
"""

from __future__ import annotations

import torch


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Mean over random directions of W1 between the projections of ``a`` and ``b`` (both (N, D))."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) point sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(len(a), generator=g)[:n]].double()
    b = b[torch.randperm(len(b), generator=g)[:n]].double()
    directions = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    # (projections, n) row-major, so each projection sorts a contiguous row
    pa, pb = (directions.T @ a.T).sort(dim=1).values, (directions.T @ b.T).sort(dim=1).values
    return (pa - pb).abs().mean().item()
