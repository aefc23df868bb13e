"""Adapters that turn outside models into difflab's ``Denoiser`` D(x; sigma, cond) (the idea of
k-diffusion's ``external.py``).

Any callable ``net(x_t, t)`` that predicts eps, x0 or v on a discrete schedule of betas becomes a
``Denoiser`` with a ``VPPrecond``, which every sampler drives (at fractional timesteps between the schedule's).
``from_diffusers`` does this for a ``diffusers.UNet2DModel`` and its scheduler's betas; diffusers itself is
not imported here. A class-conditional diffusers model reads the record's ``label`` as ``class_labels``.

k-diffusion's models are denoisers already, in difflab's convention (x VE-scaled, output x0): ``to_k_diffusion``
hands a difflab ``Denoiser`` to k-diffusion's samplers, ``from_k_diffusion`` hands a k-diffusion model to
difflab's (neither imports k-diffusion).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from difflab.conditioning import Cond, Condition
from difflab.denoiser import Denoiser, Precond, Scalings, VPPrecond
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


# -- k-diffusion (Crowson's k-diffusion, its denoiser convention model(x, sigma, **extra_args) -> x0) ---------
class KDiffusionModel(nn.Module):
    """A difflab ``Denoiser`` as k-diffusion expects a model: ``model(x, sigma, **extra_args)`` returning the
    denoised x0, x VE-scaled (x = x0 + sigma n), which is difflab's convention too, so every
    ``k_diffusion.sampling.sample_*`` drives it. ``extra_args={"cond": record}`` passes a condition record
    (``difflab.pipelines.ddpm.class_condition``, or a ``Cond``); ``sigma_min``, ``sigma_max`` are the trained
    noise levels, for ``k_diffusion.sampling.get_sigmas_karras(n, model.sigma_min, model.sigma_max)``."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_min = denoiser.precond.sigma_min
        self.sigma_max = denoiser.precond.default_sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        return self.denoiser(x, sigma, cond)


def to_k_diffusion(denoiser: Denoiser) -> KDiffusionModel:
    """``denoiser`` in k-diffusion's model convention (``KDiffusionModel``)."""
    return KDiffusionModel(denoiser)


class ExternalPrecond(Precond):
    """The preconditioning of a model that is already a denoiser: c_skip = 0, c_out = 1, c_in = 1 and
    c_noise = sigma, so D(x; sigma) = model(x, sigma)."""

    kind = "external"

    def __init__(self, sigma_min: float, sigma_max: float):
        if not 0 < sigma_min < sigma_max:
            raise DifflabError(f"an external denoiser needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        zero, one = torch.zeros_like(sigma), torch.ones_like(sigma)
        return zero, one, one, sigma

    def to_json(self) -> dict:
        raise DifflabError("an adapted outside denoiser has no difflab checkpoint; save the outside model instead")


class KDiffusionNet(nn.Module):
    """``net(x, sigma, cond)`` for a k-diffusion model ``model(x, sigma, **extra_args)``: the record's fields
    become its keyword arguments (``extra_args`` as k-diffusion's samplers pass them)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        return self.model(x, sigma.to(x.dtype), **dict(cond or {}))


def from_k_diffusion(model: nn.Module, sigma_min: float | None = None, sigma_max: float | None = None,
                     conditions: dict[str, Condition] | None = None) -> Denoiser:
    """A ``Denoiser`` for a k-diffusion model (``k_diffusion.layers.Denoiser``, ``external.CompVisDenoiser``,
    or any ``model(x, sigma, **extra_args) -> x0``): every difflab sampler drives it. The noise range is the
    model's ``sigma_min``/``sigma_max`` (k-diffusion's discrete wrappers have them) unless given."""
    sigma_min = sigma_min if sigma_min is not None else getattr(model, "sigma_min", None)
    sigma_max = sigma_max if sigma_max is not None else getattr(model, "sigma_max", None)
    if sigma_min is None or sigma_max is None:
        raise DifflabError("this k-diffusion model has no sigma_min/sigma_max: pass them to from_k_diffusion")
    return Denoiser(KDiffusionNet(model), ExternalPrecond(float(sigma_min), float(sigma_max)), conditions)
