"""Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule", Eq. 6)
over any features.

Both feature sets are fitted with a Gaussian; the Fréchet (Wasserstein-2) distance between
N(mu_1, S_1) and N(mu_2, S_2) is (Dowson & Landau 1982)

    d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2}).

tr (S_1 S_2)^{1/2} is computed without a general matrix square root: S_1 S_2 is similar to the symmetric
PSD matrix M = S_1^{1/2} S_2 S_1^{1/2}, so tr (S_1 S_2)^{1/2} = sum_i sqrt(lambda_i(M)), with both
factorisations symmetric eigen-decompositions in float64 (no complex round-off as with ``sqrtm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difflab.errors import DifflabError


@dataclass(frozen=True)
class GaussianFit:
    mean: np.ndarray        # (D,) float64
    cov: np.ndarray         # (D, D) float64, unbiased (divided by N - 1)


def as_feature_matrix(features, what: str = "features") -> np.ndarray:
    """(N, D) float64 array from a tensor or array; an error naming ``what`` otherwise."""
    array = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise DifflabError(f"{what}: expected an (N, D) array with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise DifflabError(f"{what}: contains NaN or infinite values")
    return array


def gaussian_fit(features, what: str = "features") -> GaussianFit:
    x = as_feature_matrix(features, what)
    return GaussianFit(x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr (S_1 S_2)^{1/2} for symmetric PSD S_1, S_2."""
    root1 = _psd_sqrt(cov1)
    values = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(fit1: GaussianFit, fit2: GaussianFit) -> float:
    """Squared Fréchet distance between two Gaussians (the FID when they are fits to features)."""
    if fit1.mean.shape != fit2.mean.shape:
        raise DifflabError(f"cannot compare Gaussian fits of {fit1.mean.shape[0]}- and "
                           f"{fit2.mean.shape[0]}-dimensional features")
    mean_term = float(((fit1.mean - fit2.mean) ** 2).sum())
    cov_term = float(np.trace(fit1.cov) + np.trace(fit2.cov)) - 2 * trace_sqrt_product(fit1.cov, fit2.cov)
    return max(mean_term + cov_term, 0.0)


def fid(features1, features2) -> float:
    """FID between two feature sets, each (N, D)."""
    return frechet_distance(gaussian_fit(features1, "first feature set"),
                            gaussian_fit(features2, "second feature set"))
