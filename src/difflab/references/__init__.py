"""Exact references: data sets whose noised marginals, scores and likelihoods are known in closed form."""

from difflab.references.gaussian_mixture import ExactEpsNet, GaussianMixture

__all__ = ["ExactEpsNet", "GaussianMixture"]
