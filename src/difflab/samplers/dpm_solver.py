"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2 (multistep, second order, data prediction), in sigma space.

Notation map: with VE-scaled x (alpha = 1) the paper's lambda_t = log(alpha_t / sigma_t) is -log sigma,
its x_theta is D(x; sigma), and the update x_{t_i} = (sigma_i / sigma_{i-1}) x_{t_{i-1}} - alpha_{t_i}
(e^{-h_i} - 1) D_i becomes x' = (sigma' / sigma) x - expm1(-h) D with h = log(sigma / sigma'). As in
k-diffusion's ``sample_dpmpp_2m``, the first step is first order (DPM-Solver++(1) = DDIM) and so is the
last one to sigma = 0, where the update is the denoised x_0. Signature as in ``difflab.samplers.ddim``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from difflab.conditioning import Cond
from difflab.samplers.noise import PerSampleNoise


def dpmpp_2m_step(x: torch.Tensor, sigma: float, sigma_next: float, x0: torch.Tensor,
                  x0_prev: torch.Tensor | None, h_prev: float | None) -> tuple[torch.Tensor, float]:
    """One step of Alg. 2 from sigma to sigma_next > 0 with D_i = x0 (and D_{i-1} = x0_prev from the step
    of length h_prev before, if any); returns (x', h)."""
    h = math.log(sigma / sigma_next)                                            # lambda_{t_i} - lambda_{t_{i-1}}
    d = x0
    if x0_prev is not None:                                                     # Alg. 2, D_i with r_i = h_{i-1} / h_i
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    return (sigma_next / sigma) * x - math.expm1(-h) * d, h


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                    cond: Cond | None = None,
                    callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """N network evaluations for N steps; ``noise`` is unused (the solver is deterministic)."""
    sigmas = sigmas.tolist()
    x0_prev, h_prev = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = model(x, sigma, cond)
        if sigma_next == 0:
            x = x0
        else:
            x, h_prev = dpmpp_2m_step(x, sigma, sigma_next, x0, x0_prev, h_prev)
        x0_prev = x0
        if callback is not None:
            callback(i, x)
    return x
