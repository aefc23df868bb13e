"""Time-step grids for the sigma-space samplers: decreasing noise levels sigma_0 > ... > sigma_{N-1} > 0,
followed by a final 0 (a sampler's last step lands on the denoised x_0).

sigma is the noise-to-signal ratio sqrt((1 - alpha-bar) / alpha-bar) of Karras et al. 2022, so a discrete
schedule's timestep t has noise level ``schedule.sigmas[t]``. Spacings:

- ``karras``: Karras et al. 2022, Eq. 5, sigma_i = (sigma_max^(1/rho) + i / (N-1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho (rho = 7);
- ``logsnr``: uniform in log-SNR, i.e. in lambda = -log sigma, the "logSNR" time steps that Lu et al. 2022
  (DPM-Solver, Sec. 3.4 and App. D.1) recommend for their solvers (the limit rho -> infinity of ``karras``);
  both span the schedule's smallest to largest sigma unless ``sigma_min`` / ``sigma_max`` are given:
  a larger sigma_min makes the last step (from sigma_min to 0, the denoised x_0) a bigger final jump;
- ``uniform``, ``leading``, ``trailing``: N of the training timesteps, as diffusers' ``timestep_spacing``
  "linspace" (rounded; = ``difflab.schedules.space_timesteps``, which also takes sections "10,10,20"),
  "leading" and "trailing" (Lin et al. 2024, Table 2), mapped to their sigmas.
"""

from __future__ import annotations

import math

import torch

from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule, space_timesteps

SPACINGS = ("karras", "logsnr", "uniform", "leading", "trailing")
KARRAS_RHO = 7.0          # Karras et al. 2022, Sec. 3 ("we set rho = 7 for the remainder of the paper")


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: n noise levels from sigma_max down to sigma_min, then 0."""
    if n < 1:
        raise DifflabError(f"steps must be at least 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise DifflabError(f"need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    if math.isinf(rho):                                 # the limit: linear in log sigma
        return append_zero((math.log(sigma_max) + ramp * math.log(sigma_min / sigma_max)).exp())
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return append_zero((inv_max + ramp * (inv_min - inv_max)) ** rho)


def logsnr_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n noise levels uniform in log sigma from sigma_max down to sigma_min (Lu et al. 2022, App. D.1), then 0."""
    return karras_sigmas(n, sigma_min, sigma_max, rho=math.inf)


def discrete_timesteps(num_timesteps: int, steps: int | str, spacing: str) -> list[int]:
    """Which training timesteps a discrete spacing keeps, in increasing order (diffusers' DDIMScheduler
    ``set_timesteps`` with ``steps_offset = 0`` for "leading" and "trailing")."""
    if spacing == "uniform":
        return space_timesteps(num_timesteps, steps)
    if isinstance(steps, str):
        if not steps.isdigit():
            raise DifflabError(f"sections like {steps!r} are only supported by the 'uniform' spacing")
        steps = int(steps)
    if not 1 <= steps <= num_timesteps:
        raise DifflabError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    if spacing == "leading":
        return [i * (num_timesteps // steps) for i in range(steps)]
    if spacing == "trailing":
        stride = num_timesteps / steps
        return sorted(round(num_timesteps - i * stride) - 1 for i in range(steps))
    raise DifflabError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")


def build_sigmas(schedule: NoiseSchedule, steps: int | str, spacing: str = "karras", rho: float = KARRAS_RHO,
                 sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """The sigma grid (decreasing, ending in 0, float64) of ``steps`` steps on ``schedule``; ``sigma_min``
    and ``sigma_max`` (default: the schedule's range) only for the continuous spacings karras and logsnr."""
    sigmas = schedule.sigmas
    if spacing in ("karras", "logsnr"):
        if isinstance(steps, str) and not steps.isdigit():
            raise DifflabError(f"sections like {steps!r} are only supported by the 'uniform' spacing")
        low = sigmas[0].item() if sigma_min is None else sigma_min
        high = sigmas[-1].item() if sigma_max is None else sigma_max
        return karras_sigmas(int(steps), low, high, rho if spacing == "karras" else math.inf)
    if sigma_min is not None or sigma_max is not None:
        raise DifflabError(f"sigma_min and sigma_max apply to the karras and logsnr spacings, not {spacing!r}")
    keep = discrete_timesteps(len(schedule), steps, spacing)
    return append_zero(sigmas[keep].flip(0))


def prior_std(sigmas: torch.Tensor) -> float:
    """Standard deviation of x at sigmas[0] in VE scaling for a VP model: x_T ~ N(0, I) becomes
    x = x_T / sqrt(alpha-bar) = x_T sqrt(1 + sigma^2) (diffusers' ``init_noise_sigma``)."""
    return math.sqrt(1 + sigmas[0].item() ** 2)


def sigma_grid(precond, steps: int | str, spacing: str = "karras", rho: float = KARRAS_RHO,
               sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """The sigma grid of ``steps`` steps for a model with preconditioning ``precond``. Continuous spacings
    span [precond.sigma_min, precond.default_sigma_max] unless told otherwise (a VP model's grid starts at
    sigma 80 at most: Karras et al. 2022's sigma_max for data in [-1, 1], where the cosine schedule would start
    at ~2e4); the discrete spacings take the training timesteps of a VP model's schedule."""
    schedule = getattr(precond, "schedule", None)
    if spacing in ("karras", "logsnr"):
        if isinstance(steps, str) and not steps.isdigit():
            raise DifflabError(f"sections like {steps!r} are only supported by the 'uniform' spacing")
        low = precond.sigma_min if sigma_min is None else sigma_min
        high = precond.default_sigma_max if sigma_max is None else sigma_max
        return karras_sigmas(int(steps), low, high, rho if spacing == "karras" else math.inf)
    if schedule is None:
        raise DifflabError(f"spacing {spacing!r} takes a discrete schedule's timesteps; a {precond.kind} model "
                           f"has none (use karras or logsnr)")
    return build_sigmas(schedule, steps, spacing, rho, sigma_min, sigma_max)
