"""Counting network evaluations (NFE): wrap any model and read ``.nfe`` after sampling."""

from __future__ import annotations

from typing import Callable


class CountingModel:
    """Calls ``model`` and counts the calls: one per evaluation of a whole batch, so the NFE of a sampler
    run on one batch (Karras et al. 2022, Sec. 3: "neural function evaluations")."""

    def __init__(self, model: Callable):
        self.model = model
        self.nfe = 0

    def __call__(self, *args, **kwargs):
        self.nfe += 1
        return self.model(*args, **kwargs)
