"""Training a ControlNet (Zhang et al. 2023) on a frozen base model, with the common loop.

    trainer = controlnet_trainer(load_config("configs/fmnist_controlnet.yaml"))
    trainer.run()

The base is read from its checkpoint alone (``control.base``); the controlled model (``ControlledUNet``) keeps the
base's preconditioning, schedule and conditions, plus the control image. Its copy of the base's encoder starts
from the base's (EMA) weights; only the copy, the hint encoder and the zero convolutions are optimised (the base's
parameters take no gradient, so the optimiser, clipping and EMA leave them as they are). Each step's control
images are computed from its training images (after any flip) by the config's hint, so none are stored. The
checkpoint holds the whole controlled model, base included: ``difflab sample RUN --control ...`` needs nothing
else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import torch

from difflab.build import build_data
from difflab.conditioning import CONTROL_FIELD, ControlImage, condition_from_json
from difflab.config import Config, ControlConfig
from difflab.data.hints import HintOptions, make_hints
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.model import ModelSpec, denoiser_from_spec
from difflab.nets.registry import resolve_network
from difflab.train import distributed
from difflab.train.distributed import DistributedContext
from difflab.train.objectives import DerivedConditions
from difflab.train.teacher import Teacher, load_teacher
from difflab.train.trainer import Trainer


def control_condition(control: ControlConfig) -> ControlImage:
    return ControlImage(CONTROL_FIELD, 0.0, 1, control.hint, control.canny_sigma, control.silhouette_threshold,
                        control.sketch_factor)


def load_base(config: Config) -> Teacher:
    """The frozen base model of ``control.base``: a pixel-space U-Net."""
    if not config.control.base:
        raise DifflabError("control.base: a ControlNet needs the base model's run folder or checkpoint")
    base = load_teacher(config.control.base)
    if base.spec.network != "unet":
        raise DifflabError(f"control.base {base.path}: a ControlNet copies a U-Net's encoder; this model's network "
                           f"is {base.spec.network!r}")
    if base.spec.is_latent or not base.spec.is_image:
        raise DifflabError(f"control.base {base.path}: needs a pixel-space image model (control images are pixels)")
    if base.spec.learned_variance:
        raise DifflabError(f"control.base {base.path}: models with a learned variance are not supported")
    return base


def controlnet_spec(config: Config, base: Teacher) -> ModelSpec:
    """The controlled model: the base's description with the ControlNet as its network and the control image
    as one more condition (the base's label dropout replaced by ``train.label_dropout``)."""
    HintOptions.of(config.control).check(base.spec.sample_shape[-1])
    options = dict(config.model.options, base=base.spec.network_options)
    resolved = resolve_network("controlnet", options, base.spec.sample_shape, base.spec.sample_shape[0], None)
    conditions = [dataclasses.replace(condition_from_json(c), dropout=config.train.label_dropout).to_json()
                  for c in base.spec.conditions]
    conditions.append(control_condition(config.control).to_json())
    return dataclasses.replace(base.spec, network="controlnet", network_options=resolved, conditions=conditions)


def controlnet_trainer(config: Config, resume: bool | str | Path = False, progress: bool = True,
                       dist: DistributedContext | None = None,
                       preview: Callable[[ModelSpec], Callable[[Denoiser, str], None]] | None = None,
                       overwrite: bool = False) -> Trainer:
    """The loop for a ControlNet experiment (``model.kind: controlnet``); ``preview`` as for
    ``diffusion_trainer``."""
    from difflab.train.diffusion import check_objective, diffusion_objective

    check_objective(config)
    if config.distill.method is not None or config.data.autoencoder:
        raise DifflabError("model.kind 'controlnet' trains a pixel-space ControlNet: distill.method and "
                           "data.autoencoder must be unset")
    dist = dist or distributed.single_process(config.train.device)
    base = load_base(config)
    data = build_data(config.data)
    if data.sample_shape != base.spec.sample_shape:
        raise DifflabError(f"control.base {base.path} makes samples of shape {base.spec.sample_shape}; the data are "
                           f"{data.sample_shape} (data.image_size, data.channels)")
    if base.spec.num_classes() and data.labels is None:
        raise DifflabError(f"control.base {base.path} is class-conditional; data set {data.name!r} has no labels")
    spec = controlnet_spec(config, base)
    torch.manual_seed(config.train.seed)                          # the hint encoder's and joining convs' weights
    denoiser = denoiser_from_spec(spec)
    denoiser.net.base.load_state_dict(base.denoiser.net.state_dict())
    denoiser.net.copy_base_into_control()
    denoiser = denoiser.to(dist.device)
    hint = HintOptions.of(config.control)
    objective = DerivedConditions(diffusion_objective(config, denoiser),
                                  lambda x0, generator: {CONTROL_FIELD: make_hints(x0, hint)})
    callback = preview(spec, None) if preview is not None else None
    ema_preview = (lambda ema_net, name: callback(denoiser.with_net(ema_net), name)) if callback else None
    trainer = Trainer(config, objective, data, resume=resume, progress=progress, dist=dist, preview=ema_preview,
                      metadata={"model": spec.to_json(), "control": {"base": str(base.path)}},
                      overwrite=overwrite)
    trainer.denoiser, trainer.spec = denoiser, spec
    return trainer
