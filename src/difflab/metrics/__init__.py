"""Metrics of sample quality and likelihood, over any features.

- ``fid`` / ``frechet_distance`` (frechet.py), ``kid`` (kid.py), ``precision_recall`` (precision_recall.py),
  ``inception_score`` and ``class_accuracy`` (class_scores.py): two sets of features (or probabilities) in,
  numbers out.
- Feature extractors (features.py, inception.py) and cached reference statistics (reference.py).
- ``bits_per_dim`` (likelihood.py): NLL through the variational bound of Ho et al. 2020.
- ``sliced_wasserstein`` (sliced_wasserstein.py) for low-dimensional point sets.
"""

from difflab.metrics.class_scores import InceptionScore, class_accuracy, inception_score
from difflab.metrics.features import (CallableExtractor, ClassifierExtractor, FeatureExtractor, extract,
                                      load_classifier, load_fmnist_classifier)
from difflab.metrics.frechet import GaussianFit, fid, frechet_distance, gaussian_fit
from difflab.metrics.inception import InceptionExtractor
from difflab.metrics.kid import KID, kid
from difflab.metrics.likelihood import BitsPerDim, bits_per_dim, vlb_terms
from difflab.metrics.precision_recall import PrecisionRecall, precision_recall
from difflab.metrics.reference import FeatureStats, default_cache_dir, reference_stats
from difflab.metrics.sliced_wasserstein import sliced_wasserstein

__all__ = ["BitsPerDim", "CallableExtractor", "ClassifierExtractor", "FeatureExtractor", "FeatureStats",
           "GaussianFit", "InceptionExtractor", "InceptionScore", "KID", "PrecisionRecall", "bits_per_dim", "class_accuracy",
           "default_cache_dir", "extract", "fid", "frechet_distance", "gaussian_fit", "inception_score", "kid",
           "load_classifier", "load_fmnist_classifier", "precision_recall", "reference_stats",
           "sliced_wasserstein", "vlb_terms"]
