"""Training a diffusion model: the experiment's data and model, its objective (``DiffusionObjective``, or a
consistency model's ``ConsistencyObjective``), the common loop.

    trainer = diffusion_trainer(load_config("configs/fashion_mnist.yaml"))
    trainer.run()

The checkpoint holds the model's description (``ModelSpec``, metadata record "model") beside the weights, so
sampling rebuilds the model from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from difflab.build import build_data, build_latent_data, build_model, build_unclip_data
from difflab.clip_embeddings import FROZEN_CLIP, check_same_clip
from difflab.conditioning import CAPTION_FIELD
from difflab.config import Config
from difflab.data.base import CaptionedData
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.model import ModelSpec
from difflab.losses import LOSSES, build_loss, check_loss
from difflab.train import distributed
from difflab.train.distributed import DistributedContext
from difflab.train.consistency import METHODS as CONSISTENCY_METHODS
from difflab.train.consistency import ConsistencyObjective
from difflab.train.objectives import (DerivedConditions, DiffusionObjective, SlicedScoreObjective, diffusion_levels,
                                      superres_fields)
from difflab.train.teacher import load_teacher
from difflab.train.timesteps import TIMESTEP_SAMPLERS
from difflab.train.trainer import Trainer


def check_objective(config: Config) -> None:
    """The loss and timestep sampler exist, L_hybrid has a variance to train, and the sliced loss's double
    backward pass is one the network can run."""
    t = config.train
    if t.loss not in LOSSES:
        raise DifflabError(f"unknown train.loss {t.loss!r}; choose one of {LOSSES}")
    if t.timestep_sampling not in TIMESTEP_SAMPLERS:
        raise DifflabError(f"unknown train.timestep_sampling {t.timestep_sampling!r}; "
                           f"choose one of {TIMESTEP_SAMPLERS}")
    if t.loss == "hybrid" and not config.diffusion.learn_variance:
        raise DifflabError("train.loss 'hybrid' trains the reverse variance: set diffusion.learn_variance: true")
    if t.gradient_checkpointing and config.model.kind != "unet":
        raise DifflabError(f"train.gradient_checkpointing needs model.kind 'unet', not {config.model.kind!r}")
    if t.min_snr_gamma is not None and (t.loss not in ("simple", "hybrid") or t.min_snr_gamma <= 0):
        raise DifflabError(f"train.min_snr_gamma {t.min_snr_gamma} weights L_simple: it needs a positive value "
                           f"and train.loss 'simple' or 'hybrid', not {t.loss!r}")
    if t.loss == "sliced" and (t.compile or t.gradient_checkpointing):
        raise DifflabError("train.loss 'sliced' differentiates the network's output with respect to its input inside "
                           "the loss (a double backward pass), which neither torch.compile nor gradient checkpointing "
                           "supports: set train.compile and train.gradient_checkpointing to false")


def diffusion_objective(config: Config, denoiser: Denoiser) -> DiffusionObjective:
    t = config.train
    check_loss(t.loss, denoiser)
    levels = diffusion_levels(denoiser, t.timestep_sampling, config.diffusion.p_mean, config.diffusion.p_std)
    if t.loss == "sliced":
        return SlicedScoreObjective(denoiser, levels, t.sliced_projections, t.sliced_distribution)
    return DiffusionObjective(denoiser, build_loss(t.loss, t.vlb_weight, t.min_snr_gamma), levels)


def training_objective(config: Config, denoiser: Denoiser, spec: ModelSpec, device: torch.device | str = "cpu"):
    """The experiment's objective: a diffusion loss, or a consistency model's (``distill.method`` cd, ct, ict)."""
    d = config.distill
    if d.method is None:
        return diffusion_objective(config, denoiser)
    if d.method not in CONSISTENCY_METHODS:
        raise DifflabError(f"distill.method {d.method!r} is not a single training run; choose one of "
                           f"{CONSISTENCY_METHODS}, or progressive (difflab train runs its rounds)")
    teacher = None
    if d.method == "cd":
        if not d.teacher:
            raise DifflabError("distill.teacher: consistency distillation needs the teacher's run folder or checkpoint")
        loaded = load_teacher(d.teacher)
        if loaded.spec.sample_shape != spec.sample_shape:
            raise DifflabError(f"distill.teacher {loaded.path} makes samples of shape {loaded.spec.sample_shape}, "
                               f"the data are {spec.sample_shape}")
        if (loaded.spec.autoencoder or {}).get("sha256") != (spec.autoencoder or {}).get("sha256"):
            raise DifflabError(f"distill.teacher {loaded.path} and the student must share the latent space "
                               f"(data.autoencoder): the teacher's is "
                               f"{(loaded.spec.autoencoder or {}).get('source', 'none (pixels)')}")
        teacher = loaded.denoiser.to(device)
    return ConsistencyObjective(denoiser, d.method, config.train.steps, teacher, d.solver, d.distance, d.levels,
                                d.target_ema, d.rho, d.s0, d.s1, d.mu0, d.p_mean, d.p_std)


def diffusion_trainer(config: Config, resume: bool | str | Path = False, progress: bool = True,
                      dist: DistributedContext | None = None,
                      preview: Callable[[ModelSpec], Callable[[Denoiser, str], None]] | None = None,
                      overwrite: bool = False) -> Trainer:
    """The loop for ``config``. ``preview(spec, latent_space)``, if given, makes the callback
    ``(ema_denoiser, name)`` that the loop calls every ``train.sample_every`` steps and at the end (the CLI
    writes sample grids with it). With ``data.autoencoder`` the model is trained in that autoencoder's latent
    space and its checkpoint holds the autoencoder too (``frozen.autoencoder``); an unCLIP prior or decoder
    (``unclip.stage``) trains on the embeddings of the frozen CLIP ``data.clip``, which its checkpoint holds
    (``frozen.clip``, record "clip")."""
    check_objective(config)
    if config.data.clip and config.unclip.stage is None:
        raise DifflabError("data.clip: a frozen CLIP encodes the data of an unCLIP model; set unclip.stage "
                           "(prior or decoder)")
    dist = dist or distributed.single_process(config.train.device)
    torch.manual_seed(config.train.seed)                         # initial weights, the same on every rank
    latent = clip = None
    if config.unclip.stage is not None:
        data, clip = build_unclip_data(config)
    elif config.data.autoencoder:
        data, latent = build_latent_data(config.data)
    else:
        data = build_data(config.data)
    denoiser, spec = build_model(config, data, latent)
    text = isinstance(data, CaptionedData) and CAPTION_FIELD in denoiser.conditions
    if text:                                     # text-to-image: the captions in the model's tokenizer, once
        data.tokenize(denoiser.net.tokenize)
    denoiser = denoiser.to(dist.device)
    objective = training_objective(config, denoiser, spec, dist.device)
    r = config.superres
    if r.low_res is not None:                    # a cascade's super-resolution stage (Ho et al. 2021)
        objective = DerivedConditions(objective, superres_fields(r.low_res, r.augmentation, r.max_level, r.max_blur))
    callback = preview(spec, latent) if preview is not None else None
    ema_preview = (lambda ema_net, name: callback(denoiser.with_net(ema_net), name)) if callback else None
    frozen = {"autoencoder": latent.autoencoder} if latent is not None else {FROZEN_CLIP: clip.clip} if clip else None
    trainer = Trainer(config, objective, data, resume=resume, progress=progress, dist=dist, preview=ema_preview,
                      metadata={"model": spec.to_json(), **({FROZEN_CLIP: clip.to_json()} if clip else {})},
                      overwrite=overwrite, frozen=frozen)
    if clip is not None and trainer.step:        # a resumed unCLIP run: the embeddings must be the same CLIP's
        check_same_clip(trainer.out_dir / trainer.checkpoint_name if resume is True else Path(resume), clip)
    if text:
        encode_captions(denoiser.net, data, Path(config.train.out_dir))
    trainer.denoiser, trainer.spec = denoiser, spec
    return trainer


def encode_captions(net, data: CaptionedData, out_dir: Path) -> None:
    """A frozen text encoder (Imagen) encodes the data's distinct captions once, cached in
    RUN/text_embeddings.safetensors; a jointly trained one (GLIDE) encodes them at every step."""
    precompute = getattr(net.text_encoder, "precompute", None)
    if precompute is not None:
        precompute(torch.unique(data.tokens, dim=0), out_dir / "text_embeddings.safetensors")
