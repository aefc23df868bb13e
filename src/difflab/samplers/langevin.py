"""Score-based samplers driven by Langevin dynamics, in sigma space.

- ``sample_langevin``: annealed Langevin dynamics, Song & Ermon 2019, "Generative Modeling by Estimating
  Gradients of the Data Distribution", Algorithm 1, followed by the final denoising step x <- D(x; sigma_L)
  of Song & Ermon 2020 ("Improved Techniques for Training Score-Based Generative Models", NCSNv2) and
  Jolicoeur-Martineau et al. 2021 ("Adversarial score matching and improved sampling for image generation").
- ``sample_pc``: the predictor-corrector sampler of Song et al. 2021, "Score-Based Generative Modeling through
  Stochastic Differential Equations", Algorithm 2 (VE SDE): Langevin corrector (App. G, Alg. 4, the VE
  one; Alg. 5 is its VP twin) and the reverse-diffusion predictor (App. E), at every noise level.

The score of the noised data p_sigma (data plus N(0, sigma^2 I), VE scaling) is Tweedie's formula
(Efron 2011; Karras et al. 2022, Eq. 3):

    s(x; sigma) = grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2 = -eps(x; sigma) / sigma,

``score`` below. For a DDPM eps-network this is the usual score = -eps / sqrt(1 - alpha-bar) of the VP
x_vp = x / sqrt(1 + sigma^2) (alpha-bar = 1 / (1 + sigma^2)), written in VE coordinates: the gradient with
respect to x = x_vp sqrt(1 + sigma^2) is that VP score times sqrt(alpha-bar), and
sqrt(alpha-bar) / sqrt(1 - alpha-bar) = 1 / sigma. Notation map: the papers' sigma_1 > ... > sigma_L are
``sigmas[:-1]``; the final 0 of ``sigmas`` stands for the denoising step. Signature as in
``difflab.samplers.ddim``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from difflab.conditioning import Cond
from difflab.samplers.noise import PerSampleNoise


def score(model: Callable, x: torch.Tensor, sigma: float, cond: Cond | None = None) -> torch.Tensor:
    """s(x; sigma) = (D(x; sigma) - x) / sigma^2, the score of p_sigma (one network evaluation)."""
    return (model(x, sigma, cond) - x) / sigma ** 2


@torch.no_grad()
def langevin_dynamics(model: Callable, x: torch.Tensor, sigma: float, alpha: float, steps: int,
                      noise: PerSampleNoise, cond: Cond | None = None) -> torch.Tensor:
    """Alg. 1, lines 3-6: ``steps`` unadjusted Langevin steps x <- x + alpha/2 s(x; sigma) + sqrt(alpha) z
    at one noise level, whose stationary law tends to p_sigma as alpha -> 0."""
    for _ in range(steps):
        x = x + alpha / 2 * score(model, x, sigma, cond) + math.sqrt(alpha) * noise.randn_like(x)
    return x


@torch.no_grad()
def sample_langevin(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                    cond: Cond | None = None, langevin_steps: int = 10, step_size: float = 2e-5,
                    callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Annealed Langevin dynamics (Alg. 1): ``langevin_steps`` (T) steps at each sigma_i of ``sigmas[:-1]``
    with step alpha_i = ``step_size`` (epsilon) * sigma_i^2 / sigma_L^2, then, if ``sigmas`` ends in 0, the
    denoising step x <- D(x; sigma_L) (``callback`` sees x after each level, the last one denoised).
    NFE = (len(sigmas) - 1) * langevin_steps + 1 (one fewer if ``sigmas`` does not end in 0).

    The step is relative to the smallest level: alpha_i / sigma_i^2 = epsilon / sigma_L^2 at every level, so
    ``step_size`` must shrink with sigma_L^2 (Song & Ermon 2019: epsilon = 2e-5 for sigma_L = 0.01).
    """
    sigmas = sigmas.tolist()
    sigma_last = sigmas[-2]
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        alpha = step_size * sigma ** 2 / sigma_last ** 2
        x = langevin_dynamics(model, x, sigma, alpha, langevin_steps, noise, cond)
        if sigma_next == 0:                                         # the denoising step, Tweedie's formula
            x = model(x, sigma, cond)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_pc(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
              cond: Cond | None = None, langevin_steps: int = 1, snr: float = 0.16,
              callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Predictor-corrector sampling (Alg. 2 with the corrector of Alg. 4, VE SDE), in the order of the
    paper's code (``pc_sampler`` of yang-song/score_sde): at each sigma_i, ``langevin_steps`` (M) corrector
    steps x <- x + e s + sqrt(2 e) z with e = 2 (``snr`` ||z|| / ||s||)^2, then the reverse-diffusion
    predictor x <- x + (sigma_i^2 - sigma_{i+1}^2) s(x; sigma_i) + sqrt(sigma_i^2 - sigma_{i+1}^2) z, without
    noise on the step to sigma = 0, where it is the denoised D(x; sigma_L). NFE = (len(sigmas) - 1) *
    (langevin_steps + 1).

    The norms in e are averaged over the batch, as App. G prescribes for batches and the paper's code does, so
    e is one step size per corrector step and a sample depends (weakly) on the batch it is drawn in, unlike
    the other samplers. Per-sample norms would keep samples batch-independent but are unstable in low
    dimension: where ||s|| is near 0 (a point near a mode, or near the centre at large sigma) e explodes; on
    the 2-D mixture that sends points thousands of units away.
    """
    sigmas = sigmas.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        for _ in range(langevin_steps):                                                  # corrector, Alg. 4
            s = score(model, x, sigma, cond)
            z = noise.randn_like(x)
            e = 2 * (snr * mean_norm(z) / mean_norm(s)) ** 2
            x = x + e * s + math.sqrt(2 * e) * z
        variance = sigma ** 2 - sigma_next ** 2                                          # predictor, Alg. 2
        x = x + variance * score(model, x, sigma, cond)
        if sigma_next > 0:
            x = x + math.sqrt(variance) * noise.randn_like(x)
        if callback is not None:
            callback(i, x)
    return x


def mean_norm(x: torch.Tensor) -> float:
    """The norm of a sample, ||x_b||, averaged over the batch."""
    return x.flatten(1).norm(dim=1).mean().item()
