"""Noise schedules of discrete-time Gaussian diffusion.

Notation follows Ho et al. 2020 ("DDPM"): ``betas`` are beta_t, ``alphas`` are alpha_t = 1 - beta_t and
``alphas_cumprod`` is alpha-bar_t = prod_{s<=t} alpha_s. Index 0 is the first noising step (t = 1 in the
paper). All quantities are float64 tensors so that derived terms (posterior variances, log-variances,
bits/dim) stay accurate; cast to the model's dtype only where they meet the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from difflab.errors import DifflabError

# Nichol & Dhariwal 2021, Sec. 3.2: betas are clipped to at most 0.999 to avoid singularities near t = T.
COSINE_MAX_BETA = 0.999
# Nichol & Dhariwal 2021, Eq. 17: small offset s so that beta_t is not too small near t = 0.
COSINE_OFFSET = 0.008


def linear_betas(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, Sec. 4: betas increasing linearly from 1e-4 to 0.02 over T = 1000 steps.

    For T != 1000 the end points are rescaled by 1000 / T so that the total noise stays comparable
    (as in Nichol & Dhariwal's code).
    """
    scale = 1000.0 / timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, offset: float = COSINE_OFFSET) -> torch.Tensor:
    """f(t) / f(0) of Nichol & Dhariwal 2021, Eq. 17, with t in [0, 1]."""
    f = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    f0 = math.cos(offset / (1 + offset) * math.pi / 2) ** 2
    return f / f0


def cosine_betas(timesteps: int = 1000, offset: float = COSINE_OFFSET,
                 max_beta: float = COSINE_MAX_BETA) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: beta_t = 1 - alpha-bar_t / alpha-bar_{t-1}, clipped at ``max_beta``."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = cosine_alpha_bar(t, offset)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def geometric_betas(timesteps: int = 10, sigma_min: float = 0.01, sigma_max: float = 50.0) -> torch.Tensor:
    """The noise levels of a noise-conditional score network (Song & Ermon 2019, Sec. 4.2): L = ``timesteps``
    sigmas in geometric progression from ``sigma_min`` to ``sigma_max``, x_sigma = x_0 + sigma z (VE).

    Written as a VP schedule with alpha-bar_i = 1 / (1 + sigma_i^2), i.e. x_t = x_sigma / sqrt(1 + sigma_i^2):
    the network sees its input at unit scale, and L_simple with eps targets is denoising score matching
    with the weighting lambda(sigma) = sigma^2 of Song & Ermon (Eq. 6), since the score is -eps / sigma.
    Every sampler then serves, and ``sigmas`` of the schedule are these sigma_i exactly.
    """
    if not 0 < sigma_min < sigma_max:
        raise DifflabError(f"geometric schedule: need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    sigmas = torch.logspace(math.log10(sigma_min), math.log10(sigma_max), timesteps, dtype=torch.float64)
    alpha_bar = 1 / (1 + sigmas ** 2)
    return 1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "geometric": geometric_betas}


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete schedule beta_1..beta_T and everything derived from it.

    ``timesteps`` maps each index of this schedule to the timestep of the network's training schedule;
    it is ``arange(T)`` for a full schedule and a subsequence for a respaced one (Nichol & Dhariwal 2021,
    Sec. 4), so that the network is always called with the timestep it was trained on. Derived tensors
    are computed once, on first use (the sampler loops read them every step).
    """

    betas: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise DifflabError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise DifflabError("betas must lie in (0, 1]")
        return cls(betas=betas, timesteps=torch.arange(len(betas)))

    @classmethod
    def from_name(cls, name: str, timesteps: int = 1000, **options: float) -> "NoiseSchedule":
        """A named schedule; ``options`` are its keyword arguments (sigma_min, sigma_max for geometric)."""
        if name not in BETA_SCHEDULES:
            raise DifflabError(f"unknown beta schedule {name!r}; choose one of {sorted(BETA_SCHEDULES)}")
        return cls.from_betas(BETA_SCHEDULES[name](timesteps, **options))

    # -- derived quantities (Ho et al. 2020, Eqs. 4, 6, 7) -------------------------------------------------
    def __len__(self) -> int:
        return len(self.betas)

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """Noise-to-signal ratio sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) (Karras et al. 2022)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """beta-tilde_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) * beta_t (Ho et al. 2020, Eq. 7)."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @cached_property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta-tilde_t with the t = 1 value (which is 0) replaced by that of t = 2, as in ADM."""
        var = self.posterior_variance
        if len(var) == 1:
            return self.betas.log()
        return torch.cat([var[1:2], var[1:]]).log()

    @cached_property
    def posterior_mean_coef_x0(self) -> torch.Tensor:
        """Coefficient of x_0 in mu-tilde_t (Ho et al. 2020, Eq. 7)."""
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)

    @cached_property
    def posterior_mean_coef_xt(self) -> torch.Tensor:
        """Coefficient of x_t in mu-tilde_t (Ho et al. 2020, Eq. 7)."""
        return (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    # -- respacing (Nichol & Dhariwal 2021, Sec. 4) --------------------------------------------------------
    def respace(self, use_timesteps: Sequence[int]) -> "NoiseSchedule":
        """The schedule restricted to ``use_timesteps``, with betas recomputed so that the kept
        alpha-bars are unchanged: beta_i = 1 - alpha-bar_{t_i} / alpha-bar_{t_{i-1}}."""
        keep = sorted(set(int(t) for t in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= len(self):
            raise DifflabError(f"respaced timesteps must lie in [0, {len(self) - 1}], got {keep[:3]}...")
        alpha_bar = self.alphas_cumprod[keep]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        betas = 1 - alpha_bar / prev
        return NoiseSchedule(betas=betas, timesteps=self.timesteps[keep])


def space_timesteps(num_timesteps: int, spacing: str | int) -> list[int]:
    """Which of ``num_timesteps`` steps to keep.

    ``spacing`` is an int K (K evenly strided steps, always including the first and last), or the
    section string of Nichol & Dhariwal's code, e.g. "10,10,20": split the chain into equal sections
    and take that many evenly spaced steps from each.
    """
    if isinstance(spacing, int) or (isinstance(spacing, str) and spacing.isdigit()):
        count = int(spacing)
        if not 1 <= count <= num_timesteps:
            raise DifflabError(f"steps must be between 1 and {num_timesteps}, got {count}")
        if count == 1:
            return [num_timesteps - 1]
        return sorted({round(i * (num_timesteps - 1) / (count - 1)) for i in range(count)})
    try:
        counts = [int(part) for part in str(spacing).split(",")]
    except ValueError:
        raise DifflabError(f"timestep spacing {spacing!r} is neither an integer nor a list like '10,10,20'")
    size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise DifflabError(f"cannot take {count} steps from a section of {section} in spacing {spacing!r}")
        stride = (section - 1) / (count - 1) if count > 1 else 0.0
        kept += [start + round(j * stride) for j in range(count)]
        start += section
    return sorted(set(kept))
