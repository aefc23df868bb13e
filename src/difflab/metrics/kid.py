"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", Sec. 4 / Appendix D)
over any features.

KID is the unbiased estimator of the squared maximum mean discrepancy (Gretton et al. 2012, Lemma 6)
with the cubic polynomial kernel k(x, y) = (x . y / d + 1)^3, d the feature dimension:

    MMD_u^2 = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2,

averaged over random subsets of size m of both sets; the spread over subsets is reported with it.
Unlike FID its expectation does not depend on the number of samples, and it is 0 for equal distributions
(so it can come out slightly negative).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difflab.errors import DifflabError
from difflab.metrics.frechet import as_feature_matrix

KERNEL_DEGREE = 3        # Bińkowski et al. 2018: cubic polynomial kernel
KERNEL_OFFSET = 1.0      # ... with offset 1 and scale 1 / d


@dataclass(frozen=True)
class KID:
    mean: float
    std: float           # standard deviation over subsets
    subsets: int
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + KERNEL_OFFSET) ** KERNEL_DEGREE


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimate between equal-size samples ``x`` and ``y`` (Gretton et al. 2012, Eq. 3)."""
    m = x.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kid(features1, features2, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """KID between two (N, D) feature sets: mean and std of MMD_u^2 over ``subsets`` random subsets.

    The subset size is capped at the smaller set's size; subsets are drawn without replacement.
    """
    x = as_feature_matrix(features1, "first feature set")
    y = as_feature_matrix(features2, "second feature set")
    if x.shape[1] != y.shape[1]:
        raise DifflabError(f"cannot compare {x.shape[1]}- and {y.shape[1]}-dimensional features")
    if subsets < 1 or subset_size < 2:
        raise DifflabError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
              for _ in range(subsets)]
    return KID(float(np.mean(values)), float(np.std(values)), subsets, m)
