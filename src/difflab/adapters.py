"""Adapters that turn outside models into difflab's ``Denoiser`` (the idea of k-diffusion's ``external.py``).

Any callable ``net(x_t, t[, y])`` that predicts eps, x0 or v on a discrete schedule of betas becomes a
``Denoiser`` (and, through ``difflab.denoiser.SigmaDenoiser``, the D(x; sigma) of every sigma-space
sampler). ``from_diffusers`` does this for a ``diffusers.UNet2DModel`` and its scheduler's betas; diffusers
itself is not imported here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule

# diffusers' ``prediction_type`` names -> difflab's
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def from_callable(net: Callable, betas: torch.Tensor, prediction: str = "eps") -> Denoiser:
    """A ``Denoiser`` for ``net(x_t, t[, y])`` trained on the discrete schedule ``betas`` to predict
    ``prediction`` (eps, x0 or v); t may be fractional when driven through ``SigmaDenoiser``."""
    return Denoiser(net, NoiseSchedule.from_betas(betas), prediction)


class DiffusersNet(nn.Module):
    """``net(x, t, y=None)`` returning a tensor, from a diffusers model returning ``.sample``
    (``UNet2DModel(sample, timestep, class_labels=None)``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(x.to(dtype), t, class_labels=y) if y is not None else self.model(x.to(dtype), t)
        return out.sample


def from_diffusers(model: nn.Module, scheduler) -> Denoiser:
    """A ``Denoiser`` for a diffusers U-Net with the betas and ``prediction_type`` of ``scheduler``
    (any diffusers scheduler with ``betas`` and ``config.prediction_type``)."""
    prediction = scheduler.config.prediction_type
    if prediction not in DIFFUSERS_PREDICTIONS:
        raise DifflabError(f"unsupported diffusers prediction_type {prediction!r}; "
                           f"choose one of {sorted(DIFFUSERS_PREDICTIONS)}")
    return from_callable(DiffusersNet(model), scheduler.betas, DIFFUSERS_PREDICTIONS[prediction])
