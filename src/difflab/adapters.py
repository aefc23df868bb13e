"""Adapters that turn outside models into difflab's ``Denoiser`` D(x; sigma, cond) (the idea of
k-diffusion's ``external.py``).

Any callable ``net(x_t, t)`` that predicts eps, x0 or v on a discrete schedule of betas becomes a
``Denoiser`` with a ``VPPrecond``, which every sampler drives (at fractional timesteps between the schedule's).
``from_diffusers`` does this for a ``diffusers.UNet2DModel`` and its scheduler's betas; diffusers itself is
not imported here. A class-conditional diffusers model reads the record's ``label`` as ``class_labels``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from difflab.conditioning import Condition
from difflab.denoiser import Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule

# diffusers' ``prediction_type`` names -> difflab's
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


class CallableNet(nn.Module):
    """``net(x, t, cond)`` for a plain callable ``fn(x, t)`` (conditions are not passed on)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        return self.fn(x, t)


def from_callable(net: Callable, betas: torch.Tensor, prediction: str = "eps",
                  conditions: dict[str, Condition] | None = None) -> Denoiser:
    """A ``Denoiser`` for ``net`` trained on the discrete schedule ``betas`` to predict ``prediction`` (eps, x0
    or v); t may be fractional. ``net`` is a module ``net(x, t, cond)``, or any callable ``fn(x, t)``."""
    module = net if isinstance(net, nn.Module) else CallableNet(net)
    return Denoiser(module, VPPrecond(NoiseSchedule.from_betas(betas), prediction), conditions)


class DiffusersNet(nn.Module):
    """``net(x, t, cond=None)`` returning a tensor, from a diffusers model returning ``.sample``
    (``UNet2DModel(sample, timestep, class_labels=None)``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    consumes = ("label",)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        y = cond.get("label") if cond is not None else None
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
