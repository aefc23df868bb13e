"""Scores from a classifier's class probabilities p(y | x) of generated images.

- ``inception_score``: Salimans et al. 2016 ("Improved Techniques for Training GANs", Sec. 4),
  IS = exp(E_x KL(p(y | x) || p(y))), with p(y) the mean of p(y | x) over the split; computed over
  ``splits`` disjoint splits, mean and std reported as in the paper's code. With a Fashion-MNIST
  classifier instead of Inception it ranges from 1 to the number of classes (10).
- ``class_accuracy``: how often the classifier agrees with the label a conditional sample was drawn for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from difflab.errors import DifflabError

PROBABILITY_FLOOR = 1e-12    # log(0) guard; p log p -> 0 as p -> 0


@dataclass(frozen=True)
class InceptionScore:
    mean: float
    std: float
    splits: int


def as_probabilities(probs) -> np.ndarray:
    p = np.asarray(probs.detach().cpu() if hasattr(probs, "detach") else probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise DifflabError(f"class probabilities: expected an (N, classes) array, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise DifflabError("class probabilities: rows must be non-negative and sum to 1 (pass softmax outputs)")
    return p


def inception_score(probs, splits: int = 10) -> InceptionScore:
    p = as_probabilities(probs)
    if not 1 <= splits <= len(p):
        raise DifflabError(f"inception score: splits must be in [1, {len(p)}], got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        log_ratio = np.log(np.maximum(part, PROBABILITY_FLOOR)) - np.log(np.maximum(marginal, PROBABILITY_FLOOR))
        scores.append(np.exp((part * log_ratio).sum(axis=1).mean()))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)), splits)


def class_accuracy(probs, labels) -> float:
    """Fraction of samples whose most probable class is their label."""
    p = as_probabilities(probs)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).reshape(-1)
    if labels.shape[0] != p.shape[0]:
        raise DifflabError(f"class accuracy: {p.shape[0]} probability rows but {labels.shape[0]} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= p.shape[1]):
        raise DifflabError(f"class accuracy: labels must lie in [0, {p.shape[1] - 1}], got {labels.min()} .. "
                           f"{labels.max()}")
    return float((p.argmax(axis=1) == labels).mean())
