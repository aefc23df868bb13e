"""DDPM pipeline: a checkpoint's denoiser plus a sampler from its config, to images (uint8) or points."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.build import build_denoiser, build_schedule, sample_shape
from difflab.config import Config, SampleConfig
from difflab.data import to_uint8_images
from difflab.denoiser import Denoiser, SigmaDenoiser
from difflab.errors import DifflabError
from difflab.classifier_guidance import AncestralMeanShift, ClassifierGuidance
from difflab.guidance import ClassifierFreeGuidance, ThresholdedNet, dynamic_threshold
from difflab.imageio import save_grid, save_npz, save_scatter
from difflab.samplers import DISCRETE_SAMPLERS, SAMPLER_OPTIONS, SAMPLERS, build_sigmas, generate, prior_std
from difflab.schedules import space_timesteps
from difflab.checkpoint import load_checkpoint, load_weights

WEIGHTS = ("ema", "model")


@dataclass
class LoadedModel:
    denoiser: Denoiser
    config: Config
    weights: str           # which weights were loaded: "ema" or "model"
    step: int
    path: Path


def load_model(path: str | Path, weights: str = "ema", device: str = "cpu") -> LoadedModel:
    """A checkpoint's denoiser, with its EMA weights by default (the raw weights if it has no EMA)."""
    if weights not in WEIGHTS:
        raise DifflabError(f"unknown weights {weights!r}; choose one of {WEIGHTS}")
    checkpoint = load_checkpoint(path)
    if weights == "ema" and not checkpoint.has_ema:
        weights = "model"
    denoiser = build_denoiser(checkpoint.config)
    load_weights(denoiser.net, checkpoint, weights)
    return LoadedModel(denoiser.to(device).eval(), checkpoint.config, weights,
                       int(checkpoint.state.get("step", 0)), checkpoint.path)


def guidance_classifier(config: Config, options: SampleConfig, device: str) -> torch.nn.Module:
    """The noise-aware classifier of ``options.classifier``, checked against the model's diffusion."""
    from difflab.train.classifier import load_noisy_classifier

    if not options.classifier:
        raise DifflabError("classifier guidance (classifier_scale) needs a noise-aware classifier (--classifier)")
    classifier, diffusion_config = load_noisy_classifier(options.classifier)
    ours = config.diffusion
    if (diffusion_config.schedule, diffusion_config.timesteps) != (ours.schedule, ours.timesteps):
        raise DifflabError(f"--classifier {options.classifier}: trained on a {diffusion_config.schedule} schedule "
                           f"with T = {diffusion_config.timesteps}, the model uses {ours.schedule} with "
                           f"T = {ours.timesteps}")
    return classifier.to(device)


def guided(denoiser: Denoiser, config: Config, options: SampleConfig, labels: torch.Tensor | None,
           clip_x0: bool, device: str = "cpu") -> tuple[Denoiser, bool, dict]:
    """The denoiser with classifier-free guidance, classifier guidance and dynamic thresholding applied as
    the options ask; whether the sampler should still clip x0 statically; and extra sampler arguments
    (the ancestral sampler takes classifier guidance as a mean shift, Dhariwal & Nichol 2021, Alg. 1)."""
    net, extra = denoiser.net, {}
    mean_channels = sample_shape(config.data)[0] if denoiser.learned_variance else None
    if options.guidance:
        classes = getattr(getattr(net, "config", None), "num_classes", None)
        if not classes or labels is None:
            raise DifflabError("guidance needs a class-conditional model and class labels (--class)")
        net = ClassifierFreeGuidance(net, options.guidance, null_label=classes, mean_channels=mean_channels)
    if options.classifier_scale:
        if labels is None:
            raise DifflabError("classifier guidance needs class labels (--class)")
        classifier = guidance_classifier(config, options, device)
        if options.sampler in DISCRETE_SAMPLERS:
            extra["classifier_grad"] = AncestralMeanShift(classifier, options.classifier_scale)
        else:
            net = ClassifierGuidance(net, classifier, denoiser.schedule, denoiser.prediction,
                                     options.classifier_scale, conditional_net=config.data.conditional)
    if options.dynamic_threshold is not None:
        net = ThresholdedNet(net, denoiser.schedule, denoiser.prediction,
                             functools.partial(dynamic_threshold, percentile=options.dynamic_threshold))
        clip_x0 = False
    return (denoiser if net is denoiser.net else denoiser.with_net(net)), clip_x0, extra


def sample(denoiser: Denoiser, config: Config, n: int, options: SampleConfig | None = None,
           labels: torch.Tensor | None = None, device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """n samples in the data's range ([-1, 1] for images), sample i seeded by ``options.seed + i``."""
    options = options or config.sample
    if options.sampler not in SAMPLERS:
        raise DifflabError(f"unknown sampler {options.sampler!r}; choose one of {sorted(SAMPLERS)}")
    clip_x0 = options.clip_x0 and config.data.dataset != "toy"
    denoiser, clip_x0, kwargs = guided(denoiser, config, options, labels, clip_x0, device)
    kwargs.update({name: getattr(options, name) for name in SAMPLER_OPTIONS[options.sampler]
                   if getattr(options, name) is not None})
    schedule = build_schedule(config.diffusion)
    if options.sampler in DISCRETE_SAMPLERS:
        model, grid = denoiser, schedule.respace(space_timesteps(len(schedule), options.steps))
        kwargs.update(clip_x0=clip_x0)
    else:
        model = SigmaDenoiser(denoiser, clip_x0=clip_x0)
        grid = build_sigmas(schedule, options.steps, options.spacing, options.rho, options.sigma_min,
                            options.sigma_max)
        kwargs.update(prior_std=prior_std(grid))
    seeds = [options.seed + i for i in range(n)]
    return generate(SAMPLERS[options.sampler], model, grid, sample_shape(config.data), seeds,
                    batch_size=options.batch_size, labels=labels, device=device, progress=progress, **kwargs)


def save_samples(samples: torch.Tensor, out_dir: str | Path, name: str = "samples",
                 labels: torch.Tensor | None = None) -> list[Path]:
    """A PNG (grid of images, or density plot of points) and an .npz (uint8 images, or float points)."""
    out_dir = Path(out_dir)
    extra = {"labels": labels.numpy()} if labels is not None else {}
    if samples.ndim == 2:
        return [save_scatter(samples, out_dir / f"{name}.png"),
                save_npz({"points": samples.numpy(), **extra}, out_dir / f"{name}.npz")]
    images = to_uint8_images(samples)
    return [save_grid(images, out_dir / f"{name}.png"),
            save_npz({"images": images.permute(0, 2, 3, 1).numpy(), **extra}, out_dir / f"{name}.npz")]
