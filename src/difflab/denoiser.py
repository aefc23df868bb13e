"""The one interface between networks and everything above them: the denoiser D(x; sigma, cond) -> x0.

Karras et al. 2022 ("EDM"), Eq. 7 and Table 1: a network F is turned into a denoiser by its preconditioning,

    c_skip, c_out, c_in, c_noise = precond.scalings(sigma)
    D(x; sigma, cond) = c_skip * x + c_out * F(c_in * x, c_noise, cond),

with x "VE-scaled" (x = x_0 + sigma * n) and sigma any real noise level. Every family is one preconditioning:

- ``VPPrecond``: a network trained on a discrete variance-preserving schedule (Ho et al. 2020) to predict eps,
  x0 or v (Salimans & Ho 2022). x_vp = x / sqrt(1 + sigma^2) is the network input (alpha-bar = 1 / (1 +
  sigma^2)), c_noise the fractional timestep of sigma on the schedule (``sigma_to_t``; Table 1's "VP" and
  "iDDPM" columns round it, here it is interpolated), and (c_skip, c_out) = (1, -sigma) for eps, (0, 1) for
  x0, (1 / (1 + sigma^2), -sigma / sqrt(1 + sigma^2)) for v. The discrete chain (ancestral sampling, a
  learned variance, the bits/dim bound) reads ``precond.schedule``.
- ``EDMPrecond``: Table 1's EDM column, sigma_data the data's standard deviation.
- ``ConsistencyPrecond``: Song et al. 2023, App. C: EDM's scalings shifted so that c_skip(sigma_min) = 1 and
  c_out(sigma_min) = 0, the boundary condition f(x, sigma_min) = x, exactly.

The training target of F follows from the same scalings: D = x0 exactly when F = (x0 - c_skip x) / c_out
(Eq. 8), and ||D - x0||^2 = c_out^2 ||F - target||^2, so every loss is written once on F (``losses.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from difflab.conditioning import Cond, Condition
from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v")
Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def as_sigma(sigma: float | torch.Tensor, batch: int) -> torch.Tensor:
    """sigma as a (B,) float64 tensor."""
    return torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(batch)


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast against ``like`` (B, ...), in its dtype and on its device."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


# -- continuous noise levels on a discrete schedule ---------------------------------------------------------
def sigma_to_t(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The real timestep of noise level ``sigma``: log-sigma interpolated linearly between the integer
    timesteps of the table ``log_sigmas`` (increasing), clamped to [0, T - 1]. As k-diffusion's
    ``DiscreteSchedule.sigma_to_t``; Karras et al. 2022, Table 1 ("iDDPM") rounds it to the nearest step."""
    log_sigma = sigma.to(log_sigmas).log().clamp(log_sigmas[0], log_sigmas[-1])
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = (log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])
    return low + w.clamp(0, 1)


def t_to_sigma(log_sigmas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``sigma_to_t`` on [0, T - 1]: sigma(t) with log-sigma linear between integer steps."""
    t = t.to(log_sigmas).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


# -- preconditionings ---------------------------------------------------------------------------------------
class Precond:
    """c_skip, c_out, c_in, c_noise as functions of sigma ((B,) float64 in, (B,) float64 out)."""

    kind = ""
    sigma_min: float            # the noise levels the model was trained on; sampling grids span
    sigma_max: float            # [sigma_min, default_sigma_max] unless told otherwise

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What F should output at x = x0 + sigma * noise: (x0 - c_skip x) / c_out (Karras et al. 2022, Eq. 8)."""
        c_skip, c_out, _, _ = self.scalings(sigma)
        x = x0 + per_example(sigma, x0) * noise
        return (x0 - per_example(c_skip, x0) * x) / per_example(c_out, x0)

    def prior_std(self, sigma: float) -> float:
        """Standard deviation of x at the first noise level sigma of a sampler."""
        return sigma

    @property
    def default_sigma_max(self) -> float:
        return self.sigma_max

    def to_json(self) -> dict:
        raise NotImplementedError


# Karras et al. 2022, Sec. 5 and Table 1: sigma_max = 80 for data in [-1, 1]; above it a VP model's x0 is only
# usable clipped (the cosine schedule's last sigma is ~2e4), so sampling grids start there by default.
DEFAULT_SIGMA_MAX = 80.0


class VPPrecond(Precond):
    """A discrete VP schedule and a network predicting eps, x0 or v (see the module docstring)."""

    kind = "vp"

    def __init__(self, schedule: NoiseSchedule, prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise DifflabError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
        self.schedule, self.prediction = schedule, prediction
        self.log_sigmas = schedule.sigmas.log()                      # float64, increasing with t
        self.sigma_min, self.sigma_max = schedule.sigmas[0].item(), schedule.sigmas[-1].item()

    @property
    def default_sigma_max(self) -> float:
        return min(self.sigma_max, DEFAULT_SIGMA_MAX)

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        c_in = 1 / (1 + sigma ** 2).sqrt()                           # sqrt(alpha-bar)
        c_noise = sigma_to_t(self.log_sigmas, sigma)
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, c_in, c_noise
        if self.prediction == "x0":
            return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, c_noise
        return c_in ** 2, -sigma * c_in, c_in, c_noise               # v

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """eps, x0 or v = sqrt(abar) eps - sqrt(1 - abar) x0 in closed form (Salimans & Ho 2022, Sec. 4)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        abar = per_example(1 / (1 + sigma ** 2), x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def prior_std(self, sigma: float) -> float:
        """x_T ~ N(0, I) in VP scale is x = x_T sqrt(1 + sigma^2) (diffusers' ``init_noise_sigma``)."""
        return math.sqrt(1 + sigma ** 2)

    def to_json(self) -> dict:
        return {"kind": self.kind, "prediction": self.prediction, "betas": self.schedule.betas.tolist()}


class EDMPrecond(Precond):
    """Karras et al. 2022, Table 1 (EDM): c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4."""

    kind = "edm"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not (sigma_data > 0 and 0 < sigma_min < sigma_max):
            raise DifflabError(f"EDM preconditioning needs sigma_data > 0 and 0 < sigma_min < sigma_max, got "
                               f"{sigma_data}, {sigma_min}, {sigma_max}")
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4

    def to_json(self) -> dict:
        return {"kind": self.kind, "sigma_data": self.sigma_data, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max}


class ConsistencyPrecond(EDMPrecond):
    """Song et al. 2023, App. C (openai/consistency_models ``get_scalings_for_boundary_condition``):
    c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = (s - s_min) sd / sqrt(s^2 + sd^2), EDM's c_in; so
    D(x; sigma_min) = x exactly. c_noise = 1000 ln(s) / 4 as in openai/consistency_models (``rescaled_t``):
    EDM's ln(s) / 4 stretched to the range of timesteps that a U-Net's sinusoidal embedding is built for.
    The same scalings serve training and sampling (``Denoiser`` applies them in both)."""

    kind = "consistency"

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        sd2 = self.sigma_data ** 2
        shifted = sigma - self.sigma_min
        c_skip = sd2 / (shifted ** 2 + sd2)
        c_out = shifted * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        return c_skip, c_out, c_in, 250 * sigma.log()


def precond_from_json(values: dict) -> Precond:
    kind = values.get("kind")
    options = {k: v for k, v in values.items() if k != "kind"}
    if kind == "vp":
        return VPPrecond(NoiseSchedule.from_betas(torch.tensor(options["betas"], dtype=torch.float64)),
                         options.get("prediction", "eps"))
    if kind in ("edm", "consistency"):
        return (EDMPrecond if kind == "edm" else ConsistencyPrecond)(**options)
    raise DifflabError(f"unknown preconditioning {kind!r}; choose vp, edm or consistency")


# -- the denoiser -------------------------------------------------------------------------------------------
@dataclass
class DenoiserOutput:
    x0: torch.Tensor                       # D(x; sigma, cond)
    variance: torch.Tensor | None = None   # a learned-variance network's interpolation v (Nichol & Dhariwal 2021)


def split_output(output: torch.Tensor, learned_variance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A network's output as (F, variance interpolation or None): a learned-variance network (Nichol &
    Dhariwal 2021, Sec. 3.1) outputs twice the data's channels, F first."""
    if not learned_variance:
        return output, None
    mean, variance = output.chunk(2, dim=1)
    return mean, variance


class Denoiser(nn.Module):
    """D(x; sigma, cond) = c_skip x + c_out net(c_in x, c_noise, cond), for any ``precond``.

    ``conditions`` describe the fields of the condition record the model was trained with (their null values
    and dropout); ``learned_variance`` networks output a second half of channels, passed on in
    ``DenoiserOutput.variance``. Call ``D(x, sigma, cond)`` with sigma a float or a (B,) tensor.
    """

    def __init__(self, net: nn.Module, precond: Precond, conditions: dict[str, Condition] | None = None,
                 learned_variance: bool = False):
        super().__init__()
        if learned_variance and not isinstance(precond, VPPrecond):
            raise DifflabError("a learned variance needs a discrete schedule (diffusion.precond: vp)")
        self.net, self.precond = net, precond
        self.conditions = dict(conditions or {})
        self.learned_variance = learned_variance

    def with_net(self, net: nn.Module) -> "Denoiser":
        """The same denoiser around another network (its EMA copy, a compiled or parallel wrapper, ...)."""
        return Denoiser(net, self.precond, self.conditions, self.learned_variance)

    def network_output(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """F(c_in x, c_noise, cond): the network's raw output (both halves for a learned variance)."""
        _, _, c_in, c_noise = self.precond.scalings(sigma)
        return self.net(x * per_example(c_in, x), c_noise.to(x.device), cond)       # c_noise float64, as t was

    def output(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond | None = None) -> DenoiserOutput:
        sigma = as_sigma(sigma, x.shape[0])
        c_skip, c_out, _, _ = self.precond.scalings(sigma)
        output = self.network_output(x, sigma, cond).to(x.dtype)
        expected = x.shape[1] * (2 if self.learned_variance else 1)
        if output.shape[:2] != (x.shape[0], expected):
            raise DifflabError(f"network output has shape {tuple(output.shape)}: expected {expected} channels for "
                               f"{x.shape[1]}-channel inputs" + (" (a learned variance doubles them)"
                                                                 if self.learned_variance else ""))
        mean, variance = split_output(output, self.learned_variance)
        return DenoiserOutput(per_example(c_skip, x) * x + per_example(c_out, x) * mean, variance)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        return self.output(x, sigma, cond).x0
