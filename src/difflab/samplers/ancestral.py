"""Ancestral sampling of DDPM: Ho et al. 2020, Algorithm 2.

x_{t-1} = mu-tilde_t(x_t, x0_hat) + sigma_t z, with sigma_t^2 = beta_t or beta-tilde_t (Sec. 3.2).
Writing the mean through the posterior q(x_{t-1} | x_t, x0_hat) equals Eq. 11 when x0_hat is not
clipped; clipping x0_hat to the data range [-1, 1] is what the paper's code does (pass a ``Thresholded``
denoiser). On a respaced schedule (Nichol & Dhariwal 2021, Sec. 4) this is strided sampling. A
learned-variance model's sigma_t^2 interpolates the respaced beta_t and beta-tilde_t (their Eq. 15),
whatever ``variance`` says.

The chain runs in VP coordinates (x_t ~ N(0, I) at the start); x0_hat is the denoiser D(x; sigma_t, cond)
at x = x_t / sqrt(alpha-bar_t) and sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), so any wrapper of D
(guidance, thresholding, classifier guidance) applies unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch

from difflab import diffusion
from difflab.conditioning import Cond
from difflab.samplers.noise import PerSampleNoise
from difflab.schedules import NoiseSchedule

VARIANCES = ("beta", "beta_tilde")


@torch.no_grad()
def sample_ancestral(denoiser: Callable, x: torch.Tensor, schedule: NoiseSchedule, noise: PerSampleNoise,
                     cond: Cond | None = None, variance: str = "beta_tilde",
                     callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the reverse chain from x = x_T over every step of ``schedule`` (the model's, or a respacing of
    it); ``denoiser.output(x, sigma, cond)`` gives D and a learned variance. Returns x_0."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown reverse variance {variance!r}; choose one of {VARIANCES}")
    fixed_variance = schedule.betas if variance == "beta" else schedule.posterior_variance
    batch = x.shape[0]
    for i in reversed(range(len(schedule))):
        index = torch.full((batch,), i, dtype=torch.long, device=x.device)
        abar = schedule.alphas_cumprod[i].item()
        sigma = schedule.sigmas[i].expand(batch)
        pred = denoiser.output(x / abar ** 0.5, sigma, cond)
        mean, _, _ = diffusion.q_posterior(schedule, pred.x0, x, index)
        var = (diffusion.learned_log_variance(schedule, index, pred.variance).exp() if pred.variance is not None
               else diffusion.extract(fixed_variance, index, x))
        x = mean + var.sqrt() * noise.randn_like(x) if i > 0 else mean
        if callback is not None:
            callback(i, x)
    return x
