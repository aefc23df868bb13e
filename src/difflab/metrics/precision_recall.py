"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", Sec. 3, Eqs. 1-3) over any features.

Each set's manifold is estimated as the union of hyperspheres around its points, the radius of each being
the distance to its k-th nearest neighbour within the set (itself excluded). Precision is the fraction of
generated points inside the real manifold; recall the fraction of real points inside the generated one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.errors import DifflabError
from difflab.metrics.frechet import as_feature_matrix

DEFAULT_K = 3            # Kynkäänniemi et al. 2019, Sec. 3: k = 3 gives the most stable estimates
CHUNK = 1024             # rows of the distance matrix computed at a time (memory ~ CHUNK * N floats)


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def _distances(a: torch.Tensor, b: torch.Tensor):
    """Rows of the Euclidean distance matrix between ``a`` and ``b``, CHUNK rows at a time."""
    for start in range(0, len(a), CHUNK):
        yield start, torch.cdist(a[start:start + CHUNK], b)


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour among the others (Eq. 2's NND_k)."""
    radii = torch.empty(len(points), dtype=points.dtype)
    for start, d in _distances(points, points):
        # the smallest distance in a row is the point itself (0), so the k-th neighbour is at index k
        radii[start:start + len(d)] = d.kthvalue(k + 1, dim=1).values
    return radii


def coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """Fraction of ``queries`` within the radius of at least one manifold point (Eq. 1's f)."""
    inside = torch.zeros(len(queries), dtype=torch.bool)
    for start, d in _distances(queries, manifold):
        inside[start:start + len(d)] = (d <= radii[None]).any(dim=1)
    return inside.double().mean().item()


def precision_recall(real, fake, k: int = DEFAULT_K) -> PrecisionRecall:
    """Precision and recall of ``fake`` features with respect to ``real`` features, both (N, D)."""
    real_t = torch.from_numpy(as_feature_matrix(real, "real features"))
    fake_t = torch.from_numpy(as_feature_matrix(fake, "generated features"))
    if real_t.shape[1] != fake_t.shape[1]:
        raise DifflabError(f"cannot compare {real_t.shape[1]}- and {fake_t.shape[1]}-dimensional features")
    if not 1 <= k < min(len(real_t), len(fake_t)):
        raise DifflabError(f"precision/recall k={k} must be at least 1 and below both set sizes "
                           f"({len(real_t)}, {len(fake_t)})")
    precision = coverage(real_t, knn_radii(real_t, k), fake_t)
    recall = coverage(fake_t, knn_radii(fake_t, k), real_t)
    return PrecisionRecall(precision, recall, k)
