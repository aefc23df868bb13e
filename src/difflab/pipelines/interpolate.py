"""DDIM inversion and interpolation (Song et al. 2021, Secs. 4.3 and 5.4): images -> latents x_T by the
deterministic ODE run forwards, spherical interpolation between latents, latents -> images by DDIM (eta = 0).

Latents are scaled to unit variance (x_T ~ N(0, I) for a VP model), so a latent of ``invert`` and a fresh
N(0, I) draw are interchangeable. The grid is uniform in log-sigma from the model's default sigma_max (80 at
most, Karras et al. 2022, Sec. 5), not from a cosine schedule's last level (~2e4), where one Euler step
multiplies the network's error by that much (its x0 is only usable clipped, which would break the inversion).
"""

from __future__ import annotations

import torch

from difflab.conditioning import Cond
from difflab.denoiser import Denoiser
from difflab.guidance import Thresholded
from difflab.samplers import PerSampleNoise, ddim_invert, sample_ddim, sigma_grid, slerp


def ddim_grid(denoiser: Denoiser, steps: int) -> torch.Tensor:
    return sigma_grid(denoiser.precond, steps, "logsnr")


@torch.no_grad()
def invert(denoiser: Denoiser, images: torch.Tensor, steps: int = 50, cond: Cond | None = None) -> torch.Tensor:
    """Latents x_T (unit scale) of ``images`` in [-1, 1], by DDIM inversion over ``steps`` steps."""
    sigmas = ddim_grid(denoiser, steps)
    return ddim_invert(denoiser, images, sigmas, cond) / denoiser.precond.prior_std(sigmas[0].item())


@torch.no_grad()
def decode(denoiser: Denoiser, latents: torch.Tensor, steps: int = 50, cond: Cond | None = None,
           clip_x0: bool = False) -> torch.Tensor:
    """Images of latents x_T by deterministic DDIM; ``decode(invert(x))`` reconstructs x."""
    sigmas = ddim_grid(denoiser, steps)
    noise = PerSampleNoise(range(len(latents)), latents.device)           # unused at eta = 0
    model = Thresholded(denoiser) if clip_x0 else denoiser
    return sample_ddim(model, latents * denoiser.precond.prior_std(sigmas[0].item()), sigmas, noise, cond)


def interpolate(z0: torch.Tensor, z1: torch.Tensor, frames: int) -> torch.Tensor:
    """(pairs * frames, ...) latents: for each pair, ``frames`` slerps from z0 to z1, pair-major."""
    ts = torch.linspace(0, 1, frames, dtype=torch.float64)
    rows = [slerp(z0[i:i + 1].expand(frames, *z0.shape[1:]), z1[i:i + 1].expand(frames, *z1.shape[1:]), ts)
            for i in range(len(z0))]
    return torch.cat(rows)


def random_latents(shape: tuple[int, ...], seeds: range | list[int]) -> torch.Tensor:
    return PerSampleNoise(seeds).randn(shape)
