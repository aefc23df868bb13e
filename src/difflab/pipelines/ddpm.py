"""Sampling pipeline: a checkpoint's model (rebuilt from its description alone), guidance and thresholding as
the options ask, a sampler and its grid, to images in [-1, 1] (or points) and to PNG grids and ``.npz`` files.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from difflab.checkpoint import Checkpoint, load_checkpoint, load_weights
from difflab.classifier_guidance import ClassifierGuidance
from difflab.clip_guidance import CLIP_TOKENS_FIELD, ClipGuidance
from difflab.conditioning import CAPTION_FIELD, CONTROL_FIELD, IMAGE_EMBED_FIELD, LOW_RES_FIELD, TEXT_EMBED_FIELD, Cond
from difflab.config import Config, SampleConfig, check_ranges
from difflab.data import to_uint8_images
from difflab.denoiser import Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.guidance import ClassifierFreeGuidance, ControlScaled, Thresholded, dynamic_threshold, static_threshold
from difflab.imageio import save_grid, save_npz, save_scatter
from difflab.latent import LatentSpace
from difflab.model import ModelSpec, denoiser_from_spec
from difflab.samplers import DISCRETE_SAMPLERS, SAMPLER_OPTIONS, SAMPLERS, generate, sigma_grid
from difflab.schedules import space_timesteps

WEIGHTS = ("ema", "model")


@dataclass
class LoadedModel:
    denoiser: Denoiser
    spec: ModelSpec
    config: Config            # the experiment it was trained with (its ``sample`` section: the recommended sampler)
    weights: str              # which weights were loaded: "ema" or "model"
    step: int
    path: Path
    latent: LatentSpace | None = None    # latent models: the autoencoder that decodes their samples


def model_spec_of(checkpoint: Checkpoint) -> ModelSpec:
    if "model" not in checkpoint.metadata:
        raise DifflabError(f"{checkpoint.path}: has no model description (written by difflab < 0.2; retrain it)")
    return ModelSpec.from_json(checkpoint.metadata["model"], f"{checkpoint.path} (model)")


def load_model(path: str | Path, weights: str = "ema", device: str = "cpu") -> LoadedModel:
    """A checkpoint's denoiser, with its EMA weights by default (the raw weights if it has no EMA)."""
    if weights not in WEIGHTS:
        raise DifflabError(f"unknown weights {weights!r}; choose one of {WEIGHTS}")
    checkpoint = load_checkpoint(path)
    if weights == "ema" and not checkpoint.has_ema:
        weights = "model"
    spec = model_spec_of(checkpoint)
    denoiser = denoiser_from_spec(spec)
    load_weights(denoiser.net, checkpoint, weights)
    latent = None
    if spec.is_latent:
        latent = LatentSpace.from_checkpoint(checkpoint, spec.autoencoder, "frozen.autoencoder")
        latent.autoencoder.to(device)
    return LoadedModel(denoiser.to(device).eval(), spec, checkpoint.config, weights,
                       int(checkpoint.state.get("step", 0)), checkpoint.path, latent)


def guidance_classifier(options: SampleConfig, device: str):
    """The noise-aware classifier of ``options.classifier`` and the preconditioning of its training inputs
    (x_t and integer t of the VP schedule it was trained on)."""
    from difflab.build import build_schedule
    from difflab.train.classifier import load_noisy_classifier

    if not options.classifier:
        raise DifflabError("classifier guidance (classifier_scale) needs a noise-aware classifier (--classifier)")
    classifier, diffusion_config = load_noisy_classifier(options.classifier)
    return classifier.to(device), VPPrecond(build_schedule(diffusion_config), diffusion_config.prediction)


def guidance_clip(options: SampleConfig, device: str):
    """The noise-aware CLIP of ``options.clip`` and the preconditioning of its training inputs (x_t and integer t
    of the VP schedule it was trained on)."""
    from difflab.build import build_schedule
    from difflab.train.clip import load_noisy_clip

    if not options.clip:
        raise DifflabError("CLIP guidance (clip_scale) needs a noise-aware CLIP (--clip RUN_OR_FILE)")
    clip, diffusion_config = load_noisy_clip(options.clip)
    return clip.to(device), VPPrecond(build_schedule(diffusion_config), diffusion_config.prediction)


def guided(denoiser: Denoiser, spec: ModelSpec, options: SampleConfig, cond: Cond | None, device: str = "cpu"):
    """The denoiser with a ControlNet's control scale, classifier-free guidance, classifier guidance, CLIP
    guidance and thresholding applied as the options ask (in that order: the gradient guides see the guided D and
    run on the batch once; thresholds act last)."""
    model = ControlScaled(denoiser, options.control_scale) if options.control_scale != 1 else denoiser
    if options.guidance:
        if not any(c.guided for c in denoiser.conditions.values()) or cond is None:
            raise DifflabError("guidance needs a conditional model and a condition (--class; a control image is "
                               "kept in both passes, not guided)")
        model = ClassifierFreeGuidance(model, options.guidance)
    if options.classifier_scale:
        if cond is None or "label" not in cond:
            raise DifflabError("classifier guidance needs class labels (--class)")
        classifier, classifier_precond = guidance_classifier(options, device)
        model = ClassifierGuidance(model, classifier, classifier_precond, options.classifier_scale)
    if options.clip_scale:
        if cond is None or CLIP_TOKENS_FIELD not in cond:
            raise DifflabError("CLIP guidance needs the captions in the CLIP's tokens (--prompt; "
                               "clip_guidance.with_clip_tokens)")
        clip, clip_precond = guidance_clip(options, device)
        model = ClipGuidance(model, clip, clip_precond, options.clip_scale)
    if spec.data_range is not None:                  # pixels: thresholds apply; latents and points are not clipped
        if options.dynamic_threshold is not None:
            model = Thresholded(model, functools.partial(dynamic_threshold, percentile=options.dynamic_threshold))
        elif options.clip_x0:
            model = Thresholded(model, static_threshold)
    return model


def options_grid(precond, options: SampleConfig) -> torch.Tensor:
    """The sigma grid ``options`` name: their explicit ``sigmas`` (e.g. a grid optimised for the model), else
    ``steps`` levels of their spacing."""
    if options.sigmas is not None:
        return torch.tensor([*options.sigmas, 0.0], dtype=torch.float64)
    if options.sampler == "consistency":
        # Song et al. 2023, Alg. 1: sigma_max and steps - 1 intermediate levels, of a grid of steps + 1 levels
        # without its sigma_min (where f(x, sigma_min) = x: an evaluation that would change nothing)
        steps = int(options.steps)
        grid = sigma_grid(precond, steps + 1, options.spacing, options.rho, options.sigma_min, options.sigma_max)
        return torch.cat([grid[:-2], grid[-1:]])
    return sigma_grid(precond, options.steps, options.spacing, options.rho, options.sigma_min, options.sigma_max)


@dataclass
class SamplingPlan:
    """What ``generate`` needs: the sampler, the (guided) model, its grid and the sampler's arguments."""
    sampler: object
    model: torch.nn.Module
    grid: object                  # a sigma grid, or a (respaced) schedule for the ancestral sampler
    kwargs: dict
    spec: ModelSpec


def sampling_plan(loaded: LoadedModel | Denoiser, options: SampleConfig, cond: Cond | None = None,
                  device: str = "cpu", spec: ModelSpec | None = None) -> SamplingPlan:
    """The sampler, guided model and grid that ``options`` describe, checked."""
    denoiser, spec = (loaded.denoiser, loaded.spec) if isinstance(loaded, LoadedModel) else (loaded, spec)
    check_ranges(options, "sample.")
    if cond is not None:
        for name, value in cond.items():
            if name in denoiser.conditions:
                denoiser.conditions[name].check(value)
    controlled = CONTROL_FIELD in denoiser.conditions
    if controlled and (cond is None or CONTROL_FIELD not in cond):
        raise DifflabError("this ControlNet model samples from control images: difflab sample --control FILE|DIR "
                           "or --control-from FILE|DIR (Python: difflab.pipelines.control.with_control); "
                           "benchmarks/fmnist_controlnet.py scores one")
    if options.control_scale != 1 and not controlled:
        raise DifflabError("control_scale (--control-scale) applies to ControlNet models only")
    if options.sampler not in SAMPLERS:
        raise DifflabError(f"unknown sampler {options.sampler!r}; choose one of {sorted(SAMPLERS)}")
    model = guided(denoiser, spec, options, cond, device)
    kwargs = {name: getattr(options, name) for name in SAMPLER_OPTIONS[options.sampler]
              if getattr(options, name) is not None}
    precond = denoiser.precond
    if options.sampler in DISCRETE_SAMPLERS:
        if not isinstance(precond, VPPrecond):
            raise DifflabError(f"the {options.sampler} sampler needs a model on a discrete schedule "
                               f"(diffusion.precond vp), not {precond.kind}")
        schedule = precond.schedule
        grid = schedule.respace(space_timesteps(len(schedule), options.steps))
    else:
        grid = options_grid(precond, options)
        kwargs.update(prior_std=precond.prior_std(grid[0].item()))
    return SamplingPlan(SAMPLERS[options.sampler], model, grid, kwargs, spec)


def sample(loaded: LoadedModel | Denoiser, n: int, options: SampleConfig, cond: Cond | None = None,
           device: str = "cpu", progress: bool = False, spec: ModelSpec | None = None,
           latent: LatentSpace | None = None, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """n samples in the data's range ([-1, 1] for images), sample i seeded by ``options.seed + i``; ``cond``
    holds one row per sample. ``loaded`` is a ``LoadedModel``, or a denoiser with its ``spec`` (and, for a
    latent model, its ``latent`` space). A latent model's samples are decoded to images (clipped to [-1, 1]
    only after decoding: latents are never clipped). ``on_step(done, total)`` follows the sampler's steps
    (``difflab.samplers.generate``)."""
    plan = sampling_plan(loaded, options, cond, device, spec)
    seeds = [options.seed + i for i in range(n)]
    samples = generate(plan.sampler, plan.model, plan.grid, plan.spec.sample_shape, seeds,
                       batch_size=options.batch_size, cond=cond, device=device, progress=progress,
                       on_step=on_step, **plan.kwargs)
    latent = loaded.latent if isinstance(loaded, LoadedModel) else latent
    if plan.spec.is_latent:
        if latent is None:
            raise DifflabError("sampling a latent model needs its autoencoder (load it with load_model)")
        return decode_latents(latent, samples, options.batch_size, device)
    return samples


def decode_latents(latent: LatentSpace, latents: torch.Tensor, batch_size: int, device: str = "cpu") -> torch.Tensor:
    """Images in [-1, 1] from a latent model's samples, in batches."""
    return torch.cat([latent.decode(chunk.to(device)).clamp(-1, 1).cpu() for chunk in latents.split(batch_size)])


def class_condition(labels: torch.Tensor | None) -> Cond | None:
    return Cond(label=labels) if labels is not None else None


def save_samples(samples: torch.Tensor, out_dir: str | Path, name: str = "samples",
                 labels: torch.Tensor | None = None, columns: int | None = None, scale: int = 1,
                 each: bool = False) -> list[Path]:
    """A PNG (grid of images, ``columns`` per row, pixels enlarged ``scale`` times; or a density plot of points)
    and an .npz (uint8 images, or float points); with ``each``, one PNG per image in ``out_dir/name/``."""
    out_dir = Path(out_dir)
    extra = {"labels": labels.numpy()} if labels is not None else {}
    if samples.ndim == 2:
        return [save_scatter(samples, out_dir / f"{name}.png"),
                save_npz({"points": samples.numpy(), **extra}, out_dir / f"{name}.npz")]
    images = to_uint8_images(samples)
    paths = [save_grid(images, out_dir / f"{name}.png", columns, scale),
             save_npz({"images": images.permute(0, 2, 3, 1).numpy(), **extra}, out_dir / f"{name}.npz")]
    if each:
        for i, image in enumerate(images):
            save_grid(image[None], out_dir / name / f"{i:05d}.png", scale=scale, padding=0)
        paths.append(out_dir / name)
    return paths


def preview_callback(config: Config, spec: ModelSpec, device: str = "cpu", latent: LatentSpace | None = None):
    """For the trainer: ``preview(ema_denoiser, name)`` writes a grid (or scatter plot) of the model's samples,
    one per class for a class-conditional model, with the config's sampler, to ``out_dir/samples``; with
    ``train.eval_samples``, it also scores that many samples against the test set and returns the metrics (the
    trainer logs them)."""
    if config.train.eval_samples and config.data.dataset != "fashion_mnist":
        raise DifflabError(f"train.eval_samples scores samples against Fashion-MNIST's test set; data.dataset is "
                           f"{config.data.dataset!r} (set train.eval_samples: 0)")

    if CONTROL_FIELD in spec.condition_fields():
        from difflab.pipelines.control import control_preview
        return control_preview(config, spec, device)
    if LOW_RES_FIELD in spec.condition_fields():
        from difflab.pipelines.cascade import superres_preview
        return superres_preview(config, spec, device)
    if TEXT_EMBED_FIELD in spec.condition_fields():
        from difflab.pipelines.unclip import prior_preview
        return prior_preview(config, spec, device)
    if IMAGE_EMBED_FIELD in spec.condition_fields():
        from difflab.pipelines.unclip import decoder_preview
        return decoder_preview(config, spec, device)
    if CAPTION_FIELD in spec.condition_fields():
        from difflab.pipelines.text import text_preview
        return text_preview(config, spec, device)

    def preview(denoiser: Denoiser, name: str) -> dict | None:
        n = config.train.num_sample_images if spec.is_image else 4000
        classes = spec.num_classes()
        labels = torch.arange(n) % classes if classes else None
        samples = sample(denoiser, n, config.sample, class_condition(labels), device, spec=spec, latent=latent)
        save_samples(samples, Path(config.train.out_dir) / "samples", name)
        return evaluate_preview(denoiser, config, spec, device, latent) if config.train.eval_samples else None
    return preview


def evaluate_preview(denoiser: Denoiser, config: Config, spec: ModelSpec, device: str,
                     latent: LatentSpace | None) -> dict:
    """FID, KID, precision and recall of ``train.eval_samples`` samples (balanced classes; seeds from 10^6, apart
    from the grids') against the Fashion-MNIST test set, as ``difflab eval`` scores them."""
    import dataclasses

    from difflab.pipelines.evaluate import EvalOptions, balanced_labels, score_images

    n, classes = config.train.eval_samples, spec.num_classes()
    labels = balanced_labels(n, classes) if classes else None
    options = dataclasses.replace(config.sample, seed=10 ** 6)
    images = to_uint8_images(sample(denoiser, n, options, class_condition(labels), device, spec=spec, latent=latent))
    metrics = score_images(images, labels, EvalOptions(n=n, progress=False), resize=config.data.resize)["metrics"]
    return {f"eval_{k}": metrics[k] for k in ("fid", "kid", "precision", "recall")} | {"eval_samples": n}
