"""One interface between networks and samplers: ``Denoiser(x_t, t) -> Prediction(eps, x0)``.

A network predicts one of eps, x0 or v (Salimans & Ho 2022); every conversion between them lives here
(``to_prediction``, on top of the alpha-bar formulas of ``difflab.diffusion``), so samplers and losses
never see which one the network was trained for. ``t`` is the timestep of the training schedule (an
integer in [0, T)); a respaced schedule passes ``schedule.timesteps[i]``.

``SigmaDenoiser`` turns a discrete ``Denoiser`` into the denoiser D(x; sigma) of Karras et al. 2022 that
the ODE/SDE solvers of ``difflab.samplers`` call: x is "VE-scaled", x = x_vp / sqrt(alpha-bar), and
sigma = sqrt((1 - alpha-bar) / alpha-bar) is any real noise level, not only one of the schedule's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab import diffusion
from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule

PREDICTIONS = ("eps", "x0", "v")


@dataclass
class Prediction:
    eps: torch.Tensor
    x0: torch.Tensor
    variance: torch.Tensor | None = None    # learned variance: the raw interpolation v (``learned_log_variance``)


def to_prediction(kind: str, xt: torch.Tensor, abar: torch.Tensor, output: torch.Tensor) -> Prediction:
    """Both eps and x0 from a network output of ``kind`` (eps, x0 or v) at x_t, for alpha-bar ``abar``
    (a tensor broadcastable against x_t): the one place where parameterisations are converted."""
    if kind == "eps":
        return Prediction(eps=output, x0=diffusion.x0_from_eps(xt, abar, output))
    if kind == "x0":
        return Prediction(eps=diffusion.eps_from_x0(xt, abar, output), x0=output)
    if kind == "v":
        return Prediction(eps=diffusion.eps_from_v(xt, abar, output), x0=diffusion.x0_from_v(xt, abar, output))
    raise DifflabError(f"unknown prediction type {kind!r}; choose one of {PREDICTIONS}")


def split_output(output: torch.Tensor, learned_variance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A network's output as (mean parameterisation, variance interpolation or None): a learned-variance
    network (Nichol & Dhariwal 2021, Sec. 3.1) outputs twice the image's channels, eps (or x0, v) first."""
    if not learned_variance:
        return output, None
    mean, variance = output.chunk(2, dim=1)
    return mean, variance


class Denoiser(nn.Module):
    """Wraps a network ``net(x, t, y=None)`` trained on ``schedule`` to predict ``prediction`` (and, with
    ``learned_variance``, the reverse variance's interpolation v in its second half of channels)."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str = "eps",
                 learned_variance: bool = False):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise DifflabError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.learned_variance = learned_variance

    def with_net(self, net: nn.Module) -> "Denoiser":
        """The same denoiser around another network (a wrapper of this one, its EMA copy, ...)."""
        return Denoiser(net, self.schedule, self.prediction, self.learned_variance)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return diffusion.v_target(self.schedule, x0, t, noise)

    def to_prediction(self, xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> Prediction:
        """eps, x0 (and the variance output) from the network's raw output at integer timesteps ``t``."""
        mean, variance = split_output(output, self.learned_variance)
        pred = to_prediction(self.prediction, xt, diffusion.extract(self.schedule.alphas_cumprod, t, xt), mean)
        pred.variance = variance
        return pred

    def forward(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Prediction:
        output = self.net(xt, t, y) if y is not None else self.net(xt, t)
        return self.to_prediction(xt, t, output.to(xt.dtype))


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


class SigmaDenoiser(nn.Module):
    """D(x; sigma) of Karras et al. 2022 (Eq. 2 and Table 1, VP column) from a discrete ``Denoiser``:

    x_vp = x / sqrt(1 + sigma^2)    (c_in; alpha-bar = 1 / (1 + sigma^2))
    t    = sigma_to_t(sigma)        (c_noise; a real timestep, the networks accept float t)
    D    = x0 of the network output converted at alpha-bar, i.e. x - sigma * eps for an eps network
           (c_skip = 1, c_out = -sigma), optionally clipped to [-1, 1] (images).

    Call ``model(x, sigma, y=None)`` with sigma a float or a (B,) tensor. Noise levels outside the
    schedule's range are clamped for the timestep only; x and alpha-bar keep the requested sigma.
    """

    def __init__(self, denoiser: Denoiser, clip_x0: bool = False):
        super().__init__()
        self.denoiser = denoiser
        self.clip_x0 = clip_x0
        self.log_sigmas = denoiser.schedule.sigmas.log()                # float64, increasing with t

    @property
    def sigma_min(self) -> float:
        return self.log_sigmas[0].exp().item()

    @property
    def sigma_max(self) -> float:
        return self.log_sigmas[-1].exp().item()

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])          # (B,)
        abar = (1 / (1 + sigma ** 2)).reshape(-1, *([1] * (x.ndim - 1))).to(x)         # (B, 1, ...)
        xt = x * abar.sqrt()                                                            # x_vp
        t = sigma_to_t(self.log_sigmas, sigma).to(x.device)
        net = self.denoiser.net
        output = (net(xt, t, y) if y is not None else net(xt, t)).to(x.dtype)
        mean, _ = split_output(output, self.denoiser.learned_variance)      # ODE solvers use the mean only
        x0 = to_prediction(self.denoiser.prediction, xt, abar, mean).x0
        return x0.clamp(-1, 1) if self.clip_x0 else x0
