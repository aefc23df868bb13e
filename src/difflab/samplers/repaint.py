"""RePaint: Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models", Alg. 1,
in sigma space.

At every step the unknown region takes an ancestral step of the model (DDIM with eta = 1, which is DDPM's
sampler on the respaced chain, ``sample_ddim``), and the known region is the known image noised to the next
level, x0 + sigma' n (the forward process q, VE scaling); the two are joined by the mask. Resampling
("jump length" 1, ``resample`` = U of the paper): the joined x is noised back up to the step's level,
x + sqrt(sigma^2 - sigma'^2) z, and the step is taken again, U times in all, which harmonises the regions.
The final step lands on sigma = 0, where the known pixels are the known image exactly.
Signature as in ``difflab.samplers.ddim`` plus ``known`` (images in the data's range) and ``mask`` (1 where
known, broadcastable against x). NFE = resample * (len(sigmas) - 1).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from difflab.conditioning import Cond
from difflab.samplers.ddim import ddim_step
from difflab.samplers.noise import PerSampleNoise


@torch.no_grad()
def sample_repaint(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                   cond: Cond | None = None, known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   resample: int = 1, callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    if known is None or mask is None:
        raise ValueError("sample_repaint needs the known image and its mask")
    if resample < 1:
        raise ValueError(f"resample must be at least 1, got {resample}")
    known, mask = known.to(x), mask.to(x)
    sigmas = sigmas.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        for u in range(resample):
            unknown = ddim_step(model, x, sigma, sigma_next, noise, cond, eta=1.0)          # ancestral
            seen = known + sigma_next * noise.randn_like(x) if sigma_next > 0 else known
            x = mask * seen + (1 - mask) * unknown
            if u < resample - 1:                                                        # back up to sigma
                x = x + math.sqrt(sigma ** 2 - sigma_next ** 2) * noise.randn_like(x)
        if callback is not None:
            callback(i, x)
    return x
