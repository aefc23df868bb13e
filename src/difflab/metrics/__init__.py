"""Metrics of sample quality and likelihood."""

from difflab.metrics.sliced_wasserstein import sliced_wasserstein

__all__ = ["sliced_wasserstein"]
