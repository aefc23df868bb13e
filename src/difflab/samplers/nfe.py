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

    def output(self, *args, **kwargs):
        """``model.output`` (D and a learned variance, as the ancestral sampler calls it), counted too."""
        self.nfe += 1
        return self.model.output(*args, **kwargs)

    def __getattr__(self, name: str):            # precond, conditions, ...: those of the wrapped model
        if name in ("model", "nfe"):
            raise AttributeError(name)
        return getattr(self.model, name)


def steps_for_nfe(sampler: str, nfe: int, langevin_steps: int = 1) -> int:
    """The ``steps`` (noise levels) that give ``sampler`` at most ``nfe`` network evaluations: Heun takes
    2N - 1 for N steps, annealed Langevin L T + 1 for L levels of T steps, predictor-corrector L (T + 1),
    every other sampler one per step."""
    if sampler == "heun":
        return max(1, (nfe + 1) // 2)
    if sampler == "langevin":
        return max(1, (nfe - 1) // langevin_steps)
    if sampler == "pc":
        return max(1, nfe // (langevin_steps + 1))
    return max(1, nfe)
