"""Cascaded sampling (Ho et al. 2021, "Cascaded Diffusion Models", Alg. 1-2): a base model's samples, then each
super-resolution stage conditioned on the previous stage's output after noise-conditioning augmentation.

A cascade is a YAML file naming its stages (run folders or checkpoints), base first:

    cascade:
      stages: [runs/fmnist_base14, runs/fmnist_sr28]
      aug_level: 0.2        # the augmentation level at every super-resolution stage (choose it by a sweep)
      truncated: false      # gaussian augmentation: stop the previous stage's sampler at that level instead

``difflab sample cascade.yaml --n 64`` runs it; each stage samples with its own preset's sampler (``--guidance``
and the other sampling options apply to every stage). Stage k draws sample i from seed ``seed + i + k *
1000003``; the augmentation noise of sample i at stage k from seed ``seed + i + k * 1000003 + 500001``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.conditioning import AUG_LEVEL_FIELD, LOW_RES_FIELD, AugmentationLevel, Cond, LowResImage
from difflab.config import SampleConfig
from difflab.errors import DifflabError
from difflab.pipelines.ddpm import LoadedModel, load_model, sample, sampling_plan
from difflab.samplers import generate
from difflab.superres import augment, sigma_of_level, truncated_condition
from difflab.typed import from_dict

STAGE_SEED_STRIDE, AUG_SEED_OFFSET = 1_000_003, 500_001


@dataclass
class CascadeConfig:
    stages: tuple[str, ...] = ()                         # run folders or checkpoints, base first
    aug_level: float = 0.0                               # the augmentation level at every super-resolution stage
    truncated: bool = False                              # gaussian: the previous stage stops at that level


def load_cascade(path: str | Path) -> CascadeConfig:
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DifflabError(f"{path}: not a readable cascade YAML file ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict) or set(values) != {"cascade"}:
        raise DifflabError(f"{path}: a cascade file holds one section, 'cascade' (with stages, aug_level, truncated)")
    config = from_dict(CascadeConfig, values["cascade"] or {}, "cascade.")
    if len(config.stages) < 2:
        raise DifflabError(f"{path}: cascade.stages must name a base model and at least one super-resolution stage")
    if not 0 <= config.aug_level < 1:
        raise DifflabError(f"{path}: cascade.aug_level {config.aug_level} must be in [0, 1)")
    return config


def stage_conditions(stage: LoadedModel) -> tuple[LowResImage, AugmentationLevel | None]:
    fields = stage.spec.condition_fields()
    low = fields.get(LOW_RES_FIELD)
    if not isinstance(low, LowResImage):
        raise DifflabError(f"cascade stage {stage.path} is not a super-resolution model (superres.low_res)")
    aug = fields.get(AUG_LEVEL_FIELD)
    return low, aug if isinstance(aug, AugmentationLevel) else None


def sample_to_level(stage: LoadedModel, n: int, options: SampleConfig, cond: Cond | None, sigma: float,
                    device: str = "cpu") -> torch.Tensor:
    """The stage's sampler run only down to VE noise level ``sigma`` (its grid cut there): x = x0 + sigma n."""
    plan = sampling_plan(stage, options, cond, device)
    if not isinstance(plan.grid, torch.Tensor):
        raise DifflabError(f"truncated conditioning stops a sigma-grid sampler; {options.sampler} runs a discrete "
                           f"chain (choose e.g. --sampler heun)")
    grid = torch.cat([plan.grid[plan.grid > sigma], torch.tensor([sigma], dtype=plan.grid.dtype)])
    seeds = [options.seed + i for i in range(n)]
    return generate(plan.sampler, plan.model, grid, plan.spec.sample_shape, seeds, batch_size=options.batch_size,
                    cond=cond, device=device, **plan.kwargs)


def augmentation_noise(shape: tuple[int, ...], seed: int, n: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + AUG_SEED_OFFSET + i))
                        for i in range(n)])


def sample_cascade(stages: list[LoadedModel], n: int, aug_level: float = 0.0, truncated: bool = False,
                   cond: Cond | None = None, overrides: dict | None = None, device: str = "cpu",
                   seed: int = 0) -> list[torch.Tensor]:
    """Every stage's n outputs in [-1, 1], base first; ``cond`` (e.g. labels) goes to every stage that reads it,
    ``overrides`` (sampling options) to every stage."""
    outputs, previous = [], None
    for k, stage in enumerate(stages):
        options = dataclasses.replace(stage.config.sample, **(overrides or {}), seed=seed + k * STAGE_SEED_STRIDE)
        stage_cond = Cond({name: v for name, v in (cond or {}).items() if name in stage.spec.condition_fields()})
        if k > 0:
            low_field, aug_field = stage_conditions(stage)
            if tuple(previous.shape[1:]) != (low_field.channels, low_field.size, low_field.size):
                raise DifflabError(f"cascade stage {stage.path} reads {low_field.size}x{low_field.size} images with "
                                   f"{low_field.channels} channels; the stage before makes {tuple(previous.shape[1:])}")
            level = torch.full((n,), float(aug_level))
            if aug_field is not None and not truncated:
                noise = augmentation_noise(tuple(previous.shape[1:]), options.seed, n)
                previous = augment(previous, aug_field.augmentation, level, noise, aug_field.max_blur)
            fields = {LOW_RES_FIELD: previous}
            if aug_field is not None:
                fields[AUG_LEVEL_FIELD] = level
            stage_cond = stage_cond.replace(**fields)
        last = k == len(stages) - 1
        next_aug = None if last else stage_conditions(stages[k + 1])[1]
        if truncated and not last and next_aug is not None and aug_level > 0:
            if next_aug.augmentation != "gaussian":
                raise DifflabError(f"truncated conditioning is for gaussian augmentation; {stages[k + 1].path} "
                                   f"was trained with {next_aug.augmentation}")
            sigma = sigma_of_level(aug_level).item()
            x = sample_to_level(stage, n, options, stage_cond or None, sigma, device)
            outputs.append(x.clamp(-1, 1))                # for looking at; the next stage reads z_s itself
            previous = truncated_condition(x, sigma)
        else:
            previous = sample(stage, n, options, stage_cond or None, device)
            outputs.append(previous)
    return outputs


def load_stages(config: CascadeConfig, weights: str = "ema", device: str = "cpu") -> list[LoadedModel]:
    return [load_model(path, weights, device) for path in config.stages]


def superres_preview(config, spec, device: str = "cpu"):
    """For the trainer: ``preview(ema_denoiser, name)`` upsamples the first ``train.num_sample_images`` test images'
    low-resolution versions (clean: augmentation level 0), writes (low-resolution | sample | original) triples to
    ``out_dir/samples/NAME.png`` and returns the mean absolute error between the samples averaged down and their
    low-resolution inputs (pixels in [-1, 1]; logged with the step)."""
    from difflab.build import build_data
    from difflab.data import to_uint8_images
    from difflab.imageio import save_grid
    from difflab.superres import downsample

    low_field = spec.condition_fields()[LOW_RES_FIELD]
    test = build_data(config.data, "test")
    n = min(config.train.num_sample_images, len(test))
    images, labels = test.batch(torch.arange(n))
    low = downsample(images, low_field.size)
    fields = {LOW_RES_FIELD: low, **({"label": labels} if spec.num_classes() else {})}
    if AUG_LEVEL_FIELD in spec.condition_fields():
        fields[AUG_LEVEL_FIELD] = torch.zeros(n)

    def preview(denoiser, name: str) -> dict:
        samples = sample(denoiser, n, config.sample, Cond(fields), device, spec=spec)
        shown = torch.nn.functional.interpolate(low, size=samples.shape[-2:], mode="nearest")
        triples = torch.stack([shown, samples, images], dim=1).flatten(0, 1)
        save_grid(to_uint8_images(triples), Path(config.train.out_dir) / "samples" / f"{name}.png", columns=12)
        return {"low_res_error": (downsample(samples, low_field.size) - low).abs().mean().item()}
    return preview

