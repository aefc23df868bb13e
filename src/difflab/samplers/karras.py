"""Euler and Heun samplers of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", Algorithms 1 and 2, in sigma space (sigma(t) = t, s(t) = 1).

The probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma (Eq. 3 with Eq. 4 and Table 1). Alg. 2
adds "churn": before each step x is pushed up to sigma_hat = sigma (1 + gamma) with fresh noise, gamma =
min(S_churn / N, sqrt(2) - 1) for sigma in [S_tmin, S_tmax], else 0; S_churn = 0 is the deterministic
Alg. 1. Signature as in ``difflab.samplers.ddim``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from difflab.conditioning import Cond
from difflab.samplers.noise import PerSampleNoise


def churn(x: torch.Tensor, sigma: float, steps: int, noise: PerSampleNoise, s_churn: float, s_tmin: float,
          s_tmax: float, s_noise: float) -> tuple[torch.Tensor, float]:
    """Alg. 2, lines 4-6: (x_hat, sigma_hat), drawing noise only when gamma > 0."""
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma == 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * s_noise * noise.randn_like(x), sigma_hat


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                 cond: Cond | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0,
                 callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Alg. 2 without the second-order correction (lines 9-11): N network evaluations for N steps."""
    steps = len(sigmas) - 1
    sigmas = sigmas.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x, sigma_hat = churn(x, sigma, steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        d = (x - model(x, sigma_hat, cond)) / sigma_hat                                 # line 7
        x = x + (sigma_next - sigma_hat) * d                                         # line 8
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                cond: Cond | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = math.inf, s_noise: float = 1.0,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Alg. 2 (Alg. 1 when s_churn = 0): Heun's method, Euler on the last step to sigma = 0, so
    2N - 1 network evaluations for N steps."""
    steps = len(sigmas) - 1
    sigmas = sigmas.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x, sigma_hat = churn(x, sigma, steps, noise, s_churn, s_tmin, s_tmax, s_noise)
        d = (x - model(x, sigma_hat, cond)) / sigma_hat                                 # line 7
        x_next = x + (sigma_next - sigma_hat) * d                                    # line 8
        if sigma_next > 0:                                                           # lines 9-11
            d_next = (x_next - model(x_next, sigma_next, cond)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
        if callback is not None:
            callback(i, x)
    return x
