"""Ancestral sampling of DDPM: Ho et al. 2020, Algorithm 2.

x_{t-1} = mu-tilde_t(x_t, x0_hat) + sigma_t z, with sigma_t^2 = beta_t or beta-tilde_t (Sec. 3.2).
Writing the mean through the posterior q(x_{t-1} | x_t, x0_hat) equals Eq. 11 when x0_hat is not
clipped; clipping x0_hat to the data range [-1, 1] is what the paper's code does.
On a respaced schedule (Nichol & Dhariwal 2021, Sec. 4) this is strided sampling. A learned-variance
model's sigma_t^2 interpolates the respaced beta_t and beta-tilde_t (their Eq. 15), whatever ``variance`` says.

Classifier guidance (Dhariwal & Nichol 2021, Alg. 1) shifts the mean by sigma_t^2 s grad log p(y | x_t):
``classifier_grad(x_t, t, y)`` returns s grad log p(y | x_t, t) at the network timesteps t.
"""

from __future__ import annotations

from typing import Callable

import torch

from difflab import diffusion
from difflab.denoiser import Denoiser
from difflab.samplers.noise import PerSampleNoise
from difflab.schedules import NoiseSchedule

VARIANCES = ("beta", "beta_tilde")


@torch.no_grad()
def sample_ancestral(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, noise: PerSampleNoise,
                     y: torch.Tensor | None = None, variance: str = "beta_tilde", clip_x0: bool = True,
                     classifier_grad: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the reverse chain from x = x_T over every step of ``schedule``; returns x_0."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown reverse variance {variance!r}; choose one of {VARIANCES}")
    fixed_variance = schedule.betas if variance == "beta" else schedule.posterior_variance
    batch = x.shape[0]
    for i in reversed(range(len(schedule))):
        index = torch.full((batch,), i, dtype=torch.long, device=x.device)
        t = schedule.timesteps[index].to(x.device)
        pred = denoiser(x, t, y)
        x0 = pred.x0.clamp(-1, 1) if clip_x0 else pred.x0
        mean, _, _ = diffusion.q_posterior(schedule, x0, x, index)
        var = (diffusion.learned_log_variance(schedule, index, pred.variance).exp() if pred.variance is not None
               else diffusion.extract(fixed_variance, index, x))
        if classifier_grad is not None:
            mean = mean + var * classifier_grad(x, t, y)
        x = mean + var.sqrt() * noise.randn_like(x) if i > 0 else mean
        if callback is not None:
            callback(i, x)
    return x
