"""Exponential moving average of weights, with the decay given as a half-life in training images.

Karras et al. 2024 ("Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2) and
Karras et al. 2022 (EDM, ``ema_rampup_ratio``): beta = 0.5 ** (batch_size / half_life), so the average
does not depend on the batch size; with a ramp-up the half-life is at most ``rampup_ratio`` times the
images seen so far, so a short run is not dominated by its random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, halflife_images: float, rampup_ratio: float | None = None):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_images = halflife_images
        self.rampup_ratio = rampup_ratio

    def decay(self, images_seen: int, batch_size: int) -> float:
        halflife = self.halflife_images
        if self.rampup_ratio is not None:
            halflife = min(halflife, images_seen * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, batch_size: int) -> None:
        beta = self.decay(images_seen, batch_size)
        for ema_param, param in zip(self.model.parameters(), model.parameters()):
            if param.requires_grad:                  # frozen parameters (a ControlNet's base) stay as they are
                ema_param.lerp_(param.detach(), 1 - beta)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
