"""ControlNet sampling: control images from files (as they are, or computed from ordinary images by the model's
hint), samples that follow them, and how closely they do (the hint of the sample against the hint given).

    loaded = load_model("runs/fmnist_controlnet")
    hints = hints_from_images(loaded.spec, images)               # images in [-1, 1] -> Canny edges in [0, 1]
    samples = sample(loaded, len(hints), options, with_control(None, hints))
    agreement(loaded.spec, hints, samples)                       # per-sample edge F1
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflab.conditioning import CONTROL_FIELD, Cond, ControlImage
from difflab.data.folder import EXTENSIONS, load_image
from difflab.data.hints import HintOptions, make_hints
from difflab.errors import DifflabError
from difflab.imageio import save_grid
from difflab.metrics.edges import binary_f1
from difflab.model import ModelSpec


def control_field(spec: ModelSpec) -> ControlImage | None:
    """The model's control-image condition, if it is a controlled model."""
    field = spec.condition_fields().get(CONTROL_FIELD)
    return field if isinstance(field, ControlImage) else None


def require_control(spec: ModelSpec, source: str = "model") -> ControlImage:
    field = control_field(spec)
    if field is None:
        raise DifflabError(f"{source} is not a ControlNet model (it takes no control image)")
    return field


def hints_from_images(spec: ModelSpec, images: torch.Tensor) -> torch.Tensor:
    """The model's hint (e.g. Canny edges) of images in [-1, 1] (B, C, H, W): (B, 1, H, W) in [0, 1]."""
    return make_hints(images, HintOptions.of(require_control(spec)))


def read_images(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """An image file, or every image in a folder (sorted by name), as floats in [0, 1] (N, channels, size, size)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DifflabError(f"control folder {path} holds no {'/'.join(sorted(EXTENSIONS))} files")
    elif path.is_file():
        files = [path]
    else:
        raise DifflabError(f"control image {path} does not exist")
    return torch.stack([torch.from_numpy(np.array(load_image(f, size, channels))).float() / 255 for f in files])


def control_images(spec: ModelSpec, path: str | Path, n: int, from_images: bool = False) -> torch.Tensor:
    """``n`` control images (the files of ``path`` in turn, repeated as needed): the files themselves (hints in
    [0, 1], e.g. white edges on black), or with ``from_images`` the model's hint computed from them."""
    field = require_control(spec)
    size = spec.sample_shape[-1]
    if from_images:
        images = read_images(path, size, spec.sample_shape[0]) * 2 - 1
        hints = make_hints(images, HintOptions.of(field))
    else:
        hints = read_images(path, size, field.channels)
    return hints[torch.arange(n) % len(hints)]


def with_control(cond: Cond | None, hints: torch.Tensor) -> Cond:
    """``cond`` with the control images, one row each (their scale is ``SampleConfig.control_scale``)."""
    return cond.replace(**{CONTROL_FIELD: hints}) if cond is not None else Cond({CONTROL_FIELD: hints})


def agreement(spec: ModelSpec, hints: torch.Tensor, samples: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """(B,) how closely each sample follows its hint: the F1 of the sample's hint against the hint given for
    edges and silhouettes (``difflab.metrics.edges``), 1 - mean absolute difference for sketches."""
    field = require_control(spec)
    made = make_hints(samples, HintOptions.of(field))
    if field.hint == "sketch":
        return 1 - (made - hints).abs().mean((1, 2, 3))
    return binary_f1(hints, made, tolerance)


def save_pairs(hints: torch.Tensor, samples: torch.Tensor, path: str | Path, scale: int = 1) -> Path:
    """A grid of (hint | sample) pairs, eight pairs to a row; hints in [0, 1], samples in [-1, 1]."""
    from difflab.data import to_uint8_images

    hint_images = (hints.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, samples.shape[1], -1, -1)
    pairs = torch.stack([hint_images, to_uint8_images(samples)], dim=1).flatten(0, 1)
    return save_grid(pairs, path, columns=16, scale=scale)


def control_preview(config, spec: ModelSpec, device: str = "cpu"):
    """For the trainer: ``preview(ema_denoiser, name)`` samples from the control images of the first
    ``train.num_sample_images`` test images (with their labels, for a class-conditional base), writes the
    (hint | sample) pairs to ``out_dir/samples/NAME.png`` and returns the mean agreement with the hints (logged
    with the step, so the step where the model starts to follow them, the paper's "sudden convergence", shows
    in metrics.jsonl)."""
    from difflab.build import build_data
    from difflab.pipelines.ddpm import sample

    test = build_data(config.data, "test")
    n = min(config.train.num_sample_images, len(test))
    images, labels = test.batch(torch.arange(n))
    hints = hints_from_images(spec, images)
    cond = with_control(Cond(label=labels) if spec.num_classes() and labels is not None else None, hints)

    def preview(denoiser, name: str) -> dict:
        samples = sample(denoiser, n, config.sample, cond, device, spec=spec)
        save_pairs(hints, samples, Path(config.train.out_dir) / "samples" / f"{name}.png")
        metrics = {"control_agreement": agreement(spec, hints, samples).mean().item()}
        if require_control(spec).hint != "sketch":
            metrics["control_f1_1px"] = agreement(spec, hints, samples, tolerance=1).mean().item()
        return metrics
    return preview
