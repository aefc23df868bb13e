"""Multistep consistency sampling: Song et al. 2023, "Consistency Models", Alg. 1.

``model`` is a consistency function f(x, sigma) (a ``Denoiser`` with ``ConsistencyPrecond``), ``sigmas`` =
[sigma_max, tau_1, ..., tau_{k-1}, 0]: x0 = f(x, sigma_max) from x ~ N(0, sigma_max^2 I), then for each
intermediate level tau: x = x0 + sqrt(tau^2 - sigma_min^2) z and x0 = f(x, tau). k network evaluations; one
step is the grid [sigma_max, 0].
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from difflab.conditioning import Cond
from difflab.samplers.noise import PerSampleNoise


@torch.no_grad()
def sample_consistency(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                       cond: Cond | None = None,
                       callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    sigma_min = getattr(model.precond, "sigma_min", 0.0) if hasattr(model, "precond") else 0.0
    levels = [s for s in sigmas.tolist() if s > 0]
    x0 = model(x, levels[0], cond)
    if callback is not None:
        callback(0, x0)
    for i, tau in enumerate(levels[1:], start=1):
        x = x0 + math.sqrt(max(tau ** 2 - sigma_min ** 2, 0.0)) * noise.randn_like(x0)
        x0 = model(x, tau, cond)
        if callback is not None:
            callback(i, x0)
    return x0
