"""DDIM inversion and interpolation (Song et al. 2021, Secs. 4.3 and 5.4): images -> latents x_T by the
deterministic ODE run forwards, spherical interpolation between latents, latents -> images by DDIM (eta = 0).

Latents are VP-scaled, x_T ~ N(0, I), so a latent of ``invert`` and a fresh N(0, I) draw are interchangeable.
The grid is uniform in log-sigma up to sigma = 80 (Karras et al. 2022, Sec. 5), not to the schedule's last
level: the cosine schedule's last sigma is about 2e4, and one Euler step from there multiplies the network's
eps error by that much (its x0 prediction is only usable clipped, which would break the inversion).
"""

from __future__ import annotations

import torch

from difflab.build import build_schedule, sample_shape
from difflab.config import Config
from difflab.denoiser import Denoiser, SigmaDenoiser
from difflab.samplers import PerSampleNoise, build_sigmas, ddim_invert, prior_std, sample_ddim, slerp


LATENT_SIGMA_MAX = 80.0


def ddim_grid(config: Config, steps: int) -> torch.Tensor:
    schedule = build_schedule(config.diffusion)
    return build_sigmas(schedule, steps, "logsnr", sigma_max=min(LATENT_SIGMA_MAX, schedule.sigmas[-1].item()))


@torch.no_grad()
def invert(denoiser: Denoiser, config: Config, images: torch.Tensor, steps: int = 50,
           labels: torch.Tensor | None = None) -> torch.Tensor:
    """Latents x_T (VP scale) of ``images`` in [-1, 1], by DDIM inversion over ``steps`` steps."""
    sigmas = ddim_grid(config, steps)
    return ddim_invert(SigmaDenoiser(denoiser), images, sigmas, labels) / prior_std(sigmas)


@torch.no_grad()
def decode(denoiser: Denoiser, config: Config, latents: torch.Tensor, steps: int = 50,
           labels: torch.Tensor | None = None, clip_x0: bool = False) -> torch.Tensor:
    """Images of latents x_T by deterministic DDIM; ``decode(invert(x))`` reconstructs x."""
    sigmas = ddim_grid(config, steps)
    noise = PerSampleNoise(range(len(latents)), latents.device)           # unused at eta = 0
    return sample_ddim(SigmaDenoiser(denoiser, clip_x0=clip_x0), latents * prior_std(sigmas), sigmas, noise, labels)


def interpolate(z0: torch.Tensor, z1: torch.Tensor, frames: int) -> torch.Tensor:
    """(pairs * frames, ...) latents: for each pair, ``frames`` slerps from z0 to z1, pair-major."""
    ts = torch.linspace(0, 1, frames, dtype=torch.float64)
    rows = [slerp(z0[i:i + 1].expand(frames, *z0.shape[1:]), z1[i:i + 1].expand(frames, *z1.shape[1:]), ts)
            for i in range(len(z0))]
    return torch.cat(rows)


def random_latents(config: Config, seeds: range | list[int]) -> torch.Tensor:
    return PerSampleNoise(seeds).randn(sample_shape(config.data))
