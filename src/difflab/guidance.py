"""Guidance and thresholding as wrappers of a network ``net(x, t, y)``, so every sampler can use them.

Classifier-free guidance (Ho & Salimans 2021, Eq. 6): eps~ = (1 + w) eps(x, c) - w eps(x, null). The
conversions from eps to x0 or v are affine in the network output at fixed (x_t, t), so the same
combination of raw outputs is exact for x0- and v-predicting networks too. Other libraries' guidance
scale is ``guidance_scale = 1 + w`` (diffusers, Imagen): w = 0 is the plain conditional model.

Thresholding of the x0 prediction (Saharia et al. 2022, "Imagen", Sec. 2.3): static clips to [-1, 1];
dynamic takes s = the p-th percentile of |x0| per sample, s = max(s, 1), and maps x0 to clip(x0, -s, s) / s.

A learned-variance network (Nichol & Dhariwal 2021) outputs eps (or x0, v) in its first ``mean_channels``
channels and the variance interpolation after them: the wrappers then act on the first part only and pass
the conditional variance through, as GLIDE does (Nichol et al. 2022, Sec. 3).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from difflab import diffusion
from difflab.denoiser import t_to_sigma, to_prediction
from difflab.schedules import NoiseSchedule


class ClassifierFreeGuidance(nn.Module):
    """(1 + w) net(x, t, y) - w net(x, t, null), both halves in one batched forward pass."""

    def __init__(self, net: nn.Module, w: float, null_label: int, mean_channels: int | None = None):
        super().__init__()
        self.net, self.w, self.null_label, self.mean_channels = net, w, null_label, mean_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None or self.w == 0:
            return self.net(x, t, y) if y is not None else self.net(x, t)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        null = torch.full_like(y, self.null_label)
        both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))   # (2B, ...)
        conditional, unconditional = both.chunk(2)
        c = self.mean_channels or conditional.shape[1]
        guided = conditional[:, :c] + self.w * (conditional[:, :c] - unconditional[:, :c])
        return torch.cat([guided, conditional[:, c:]], dim=1) if c < conditional.shape[1] else guided


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    return x0.clamp(-1, 1)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Saharia et al. 2022, Sec. 2.3: per sample, s = max(1, quantile(|x0|, p)); x0 -> clip(x0, -s, s) / s."""
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class ThresholdedNet(nn.Module):
    """A network whose implied x0 prediction is thresholded, returned in its own parameterisation.

    Works at integer and real timesteps: alpha-bar comes from the schedule's sigma at ``t``.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str,
                 threshold: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.net, self.prediction, self.threshold = net, prediction, threshold
        self.log_sigmas = schedule.sigmas.log()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        output = self.net(x, t, y) if y is not None else self.net(x, t)
        mean, rest = output[:, :x.shape[1]], output[:, x.shape[1]:]              # rest: a learned variance
        sigma = t_to_sigma(self.log_sigmas, torch.as_tensor(t).expand(x.shape[0]))
        abar = (1 / (1 + sigma ** 2)).reshape(-1, *([1] * (x.ndim - 1))).to(x)
        x0 = self.threshold(to_prediction(self.prediction, x, abar, mean).x0)
        eps = diffusion.eps_from_x0(x, abar, x0)
        out = {"eps": eps, "x0": x0}.get(self.prediction)
        if out is None:
            out = diffusion.v_from_eps(x0, abar, eps)
        return torch.cat([out, rest], dim=1) if rest.shape[1] else out
