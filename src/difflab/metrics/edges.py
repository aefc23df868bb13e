"""Agreement of a generated image with its control hint (ControlNet, Zhang et al. 2023): the F1 score of two
binary maps, e.g. the hint's Canny edges and the Canny edges of the sample made from it (as ControlNet++, Li
et al. 2024, scores edge control).

Per image: precision = the fraction of the sample's edge pixels that lie within ``tolerance`` pixels
(Chebyshev distance) of a hint edge pixel, recall = the fraction of hint edge pixels within ``tolerance`` of a
sample edge pixel, F1 their harmonic mean; 0 tolerance is exact pixel agreement, 1 allows a one-pixel shift (as
boundary benchmarks do, Martin et al. 2004). Two empty maps agree (F1 = 1); one empty map scores 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary (B, 1, H, W) masks grown by ``radius`` pixels in every direction (a square neighbourhood)."""
    if radius == 0:
        return masks
    return F.max_pool2d(masks, 2 * radius + 1, stride=1, padding=radius)


def binary_f1(reference: torch.Tensor, predicted: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """(B,) F1 scores of the binary maps ``predicted`` against ``reference`` (both (B, 1, H, W) in {0, 1})."""
    if reference.shape != predicted.shape:
        raise ValueError(f"maps of different shapes: {tuple(reference.shape)} and {tuple(predicted.shape)}")
    reference, predicted = (reference > 0.5).float(), (predicted > 0.5).float()
    near_reference, near_predicted = dilate(reference, tolerance), dilate(predicted, tolerance)
    n_pred, n_ref = predicted.sum((1, 2, 3)), reference.sum((1, 2, 3))
    precision = (predicted * near_reference).sum((1, 2, 3)) / n_pred.clamp(min=1)
    recall = (reference * near_predicted).sum((1, 2, 3)) / n_ref.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    both_empty = (n_pred == 0) & (n_ref == 0)
    return torch.where(both_empty, torch.ones_like(f1), f1)
