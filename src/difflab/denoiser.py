"""One interface between networks and samplers: ``Denoiser(x_t, t) -> Prediction(eps, x0)``.

A network predicts one of eps, x0 or v (Salimans & Ho 2022); every conversion between them lives here,
so samplers and losses never see which one the network was trained for. ``t`` is the timestep of the
training schedule (an integer in [0, T)); a respaced schedule passes ``schedule.timesteps[i]``.
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


class Denoiser(nn.Module):
    """Wraps a network ``net(x, t, y=None)`` trained on ``schedule`` to predict ``prediction``."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise DifflabError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = q_sample(x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        return diffusion.v_target(self.schedule, x0, t, noise)

    def to_prediction(self, xt: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> Prediction:
        """Both eps and x0 from the network's raw output."""
        s = self.schedule
        if self.prediction == "eps":
            return Prediction(eps=output, x0=diffusion.predict_x0_from_eps(s, xt, t, output))
        if self.prediction == "x0":
            return Prediction(eps=diffusion.predict_eps_from_x0(s, xt, t, output), x0=output)
        return Prediction(eps=diffusion.predict_eps_from_v(s, xt, t, output),
                          x0=diffusion.predict_x0_from_v(s, xt, t, output))

    def forward(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> Prediction:
        output = self.net(xt, t, y) if y is not None else self.net(xt, t)
        return self.to_prediction(xt, t, output.to(xt.dtype))
