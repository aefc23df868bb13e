"""Reference statistics of a data set (features, their Gaussian fit, class probabilities), computed once
per (data set, split, image size, extractor) and cached as .npz.

The cache folder is ``$DIFFLAB_CACHE/stats``, else ``$XDG_CACHE_HOME/difflab/stats`` (``~/.cache``);
``default_cache_dir`` reads the environment once, and every function takes the folder explicitly.
Files are written to a temporary name and renamed, so concurrent runs never see a partial file.
An extractor's name carries a digest of its weights, so retrained weights never meet stale statistics.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from difflab.errors import DifflabError
from difflab.files import atomic_write
from difflab.metrics.features import FeatureExtractor, extract
from difflab.metrics.frechet import GaussianFit, gaussian_fit


@dataclass
class FeatureStats:
    features: np.ndarray                 # (N, D) float64
    fit: GaussianFit
    probs: np.ndarray | None = None      # (N, classes) when the extractor is a classifier

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray]) -> "FeatureStats":
        return cls(outputs["features"], gaussian_fit(outputs["features"]), outputs.get("probs"))

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {"features": self.features, "mean": self.fit.mean, "cov": self.fit.cov}
        return arrays if self.probs is None else {**arrays, "probs": self.probs}


def default_cache_dir() -> Path:
    if os.environ.get("DIFFLAB_CACHE"):
        return Path(os.environ["DIFFLAB_CACHE"]) / "stats"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflab" / "stats"


def cache_key(dataset: str, split: str, image_size: int, extractor_name: str) -> str:
    raw = f"{dataset}-{split}-{image_size}px-{extractor_name}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def save_stats(stats: FeatureStats, path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **stats.arrays())
    return atomic_write(path, write)


def load_stats(path: Path) -> FeatureStats:
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        return FeatureStats(arrays["features"], GaussianFit(arrays["mean"], arrays["cov"]), arrays.get("probs"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise DifflabError(f"{path}: corrupt cached statistics ({e}); delete the file to recompute") from None


def reference_stats(dataset: str, split: str, image_size: int, extractor: FeatureExtractor,
                    load_images: Callable[[], torch.Tensor], cache_dir: str | Path | None = None,
                    batch_size: int = 500, progress: bool = False) -> FeatureStats:
    """Cached statistics of a data set; ``load_images`` (uint8 (N, C, H, W)) is only called on a miss."""
    path = Path(cache_dir or default_cache_dir()) / (cache_key(dataset, split, image_size, extractor.name) + ".npz")
    if path.is_file():
        return load_stats(path)
    stats = FeatureStats.from_outputs(extract(extractor, load_images(), batch_size, progress,
                                              what=f"{dataset} {split} images"))
    save_stats(stats, path)
    return stats
