"""DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12, written in sigma space.

Every sigma-space sampler has the signature ``sample_X(model, x, sigmas, noise, cond=None, ...) -> x_0``:
``model(x, sigma, cond)`` is the denoiser D(x; sigma) (``difflab.denoiser.Denoiser`` or a wrapper of it), x is VE-scaled
(x = x_vp / sqrt(alpha-bar)) at noise level sigmas[0], and ``sigmas`` decrease to a final 0.

Notation map: alpha-bar = 1 / (1 + sigma^2) (the paper's alpha_t is our alpha-bar). Dividing Eq. 12,
x_{t-1} = sqrt(abar') x0 + sqrt(1 - abar' - s_eta^2) eps + s_eta z, by sqrt(abar') gives, with
sigma' the next noise level and s_up = s_eta / sqrt(abar'),

    x' = x0 + sqrt(sigma'^2 - s_up^2) eps + s_up z,    s_up = eta sigma' sqrt(1 - sigma'^2 / sigma^2),

the last form being Eq. 16's s_eta. eta = 0 is the deterministic DDIM (Euler on the probability-flow ODE,
Karras et al. 2022, Sec. 3); eta = 1 has s_eta^2 = beta-tilde of the (respaced) chain, i.e. it is
DDPM's ancestral sampler (Ho et al. 2020, Alg. 2).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from difflab.conditioning import Cond
from difflab.samplers.noise import PerSampleNoise


def ddim_step(model: Callable, x: torch.Tensor, sigma: float, sigma_next: float, noise: PerSampleNoise,
              cond: Cond | None = None, eta: float = 0.0) -> torch.Tensor:
    """One step of Eq. 12 from sigma to sigma_next: x' = x0 + sqrt(sigma'^2 - s_up^2) eps + s_up z."""
    x0 = model(x, sigma, cond)
    eps = (x - x0) / sigma
    s_up = eta * sigma_next * math.sqrt(max(0.0, 1 - sigma_next ** 2 / sigma ** 2))
    x = x0 + math.sqrt(sigma_next ** 2 - s_up ** 2) * eps
    return x + s_up * noise.randn_like(x) if s_up > 0 else x


@torch.no_grad()
def sample_ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                cond: Cond | None = None, eta: float = 0.0,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDIM with noise ``eta`` in [0, 1] (Eqs. 12 and 16); one network evaluation per step."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    sigmas = sigmas.tolist()
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = ddim_step(model, x, sigma, sigma_next, noise, cond, eta)
        if callback is not None:
            callback(i, x)
    return x


def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                           cond: Cond | None = None, eta: float = 1.0,
                           callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``): an Euler step of the ODE to sigma_down,
    then fresh noise of std sigma_up. Its sigma_up = eta sigma' sqrt(1 - sigma'^2/sigma^2) and sigma_down =
    sqrt(sigma'^2 - sigma_up^2) are DDIM's s_up and the coefficient of eps above, and the Euler step
    x + (sigma_down - sigma)(x - x0)/sigma equals x0 + sigma_down eps: it is DDIM with eta (default 1)."""
    return sample_ddim(model, x, sigmas, noise, cond, eta=eta, callback=callback)


@torch.no_grad()
def ddim_invert(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, cond: Cond | None = None,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """DDIM inversion: x_0 -> x at sigmas[0], Euler steps of the ODE run forwards (Song et al. 2021, Eq. 13
    from t to t + dt, Sec. 4.3) over the grid that ``sample_ddim`` runs backwards: x' = x + (sigma' - sigma)
    eps(x, sigma). eps is undefined at sigma = 0, so the first step evaluates it at (x_0, sigma'), as DDIM
    inversion is done in practice (diffusers' ``DDIMInverseScheduler``). Divide the result by
    ``prior_std(sigmas)`` for the VP latent x_T."""
    sigmas = sigmas.tolist()
    for i in reversed(range(len(sigmas) - 1)):
        sigma, sigma_next = sigmas[i + 1], sigmas[i]                  # increasing noise
        at = sigma if sigma > 0 else sigma_next
        eps = (x - model(x, at, cond)) / at
        x = x + (sigma_next - sigma) * eps
        if callback is not None:
            callback(i, x)
    return x


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation between latents (Shoemake 1985), per sample, as DDIM interpolates
    x_T (Song et al. 2021, Sec. 5.4 and App. D.5): sin((1-t) theta)/sin(theta) z0 + sin(t theta)/sin(theta) z1,
    theta the angle between z0 and z1. ``t`` is a float or a (B,) tensor; (nearly) parallel latents fall
    back to linear interpolation."""
    a, b = z0.flatten(1).double(), z1.flatten(1).double()                         # (B, D)
    t = torch.as_tensor(t, dtype=torch.float64, device=z0.device).reshape(-1, 1)   # (B or 1, 1)
    cos = ((a * b).sum(1, keepdim=True) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))).clamp(-1, 1)
    theta = cos.acos()
    sin = theta.sin()
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, 1 - t, ((1 - t) * theta).sin() / safe)
    w1 = torch.where(parallel, t.expand_as(sin), (t * theta).sin() / safe)
    return (w0 * a + w1 * b).reshape(z0.shape).to(z0.dtype)
