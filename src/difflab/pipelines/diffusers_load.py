"""A diffusers model folder as a difflab model, for difflab's samplers: ``difflab sample --diffusers DIR``.

DIR is a diffusers pipeline folder (``unet/`` and ``scheduler/``, as ``difflab export --format diffusers`` writes
it and e.g. google/ddpm-cifar10-32 is laid out), or a UNet2DModel folder with its scheduler in ``DIR/scheduler/``.
The model is the folder's own: its U-Net through ``difflab.adapters`` (a ``VPPrecond`` on the scheduler's betas
and prediction type), the betas read from the scheduler config (``trained_betas`` exactly, in float64; otherwise
those the scheduler class computes from its named schedule), never rebuilt from a difflab config.
``DIR/difflab.json``, when there is one (a difflab export), adds what diffusers has no field for: the condition
fields (class names, the null label), the data range and the recommended sampler of the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from difflab.adapters import DIFFUSERS_PREDICTIONS, DiffusersNet, from_callable
from difflab.conditioning import ClassLabel, Cond, condition_from_json
from difflab.config import Config, SampleConfig
from difflab.errors import DifflabError
from difflab.model import ModelSpec
from difflab.pipelines.ddpm import LoadedModel
from difflab.pipelines.diffusers_export import DIFFLAB_RECORD, EXPORT_FORMAT, SCHEDULER_FOLDER, UNET_FOLDER
from difflab.typed import from_dict

PIXEL_RANGE = (-1.0, 1.0)        # diffusers' image pipelines map samples from [-1, 1] to pixels


class NullLabelledNet(DiffusersNet):
    """A class-conditional UNet2DModel that gets ``null_label`` when the record has no label, as difflab's U-Net
    does (diffusers requires ``class_labels``); ``null_label`` None: a label is required."""

    def __init__(self, model: torch.nn.Module, null_label: int | None):
        super().__init__(model)
        self.null_label = null_label

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if cond is None or cond.get("label") is None:
            if self.null_label is None:
                raise DifflabError("this diffusers U-Net is class-conditional and has no null label: give --class")
            label = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            cond = cond.replace(label=label) if cond is not None else Cond(label=label)
        return super().forward(x, t, cond)


def read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DifflabError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(values, dict):
        raise DifflabError(f"{path}: expected a JSON object")
    return values


def folder_parts(folder: Path) -> tuple[Path, Path]:
    """The folder of the UNet2DModel and the scheduler's config file."""
    unet = folder / UNET_FOLDER if (folder / UNET_FOLDER / "config.json").is_file() else folder
    if not (unet / "config.json").is_file():
        raise DifflabError(f"{folder}: not a diffusers model folder (no config.json or {UNET_FOLDER}/config.json)")
    for scheduler in (folder / SCHEDULER_FOLDER / "scheduler_config.json", folder / "scheduler_config.json"):
        if scheduler.is_file():
            return unet, scheduler
    raise DifflabError(f"{folder}: no {SCHEDULER_FOLDER}/scheduler_config.json (the model's noise schedule)")


def scheduler_schedule(path: Path, diffusers) -> tuple[torch.Tensor, str]:
    """(betas in float64, difflab's prediction name) of a scheduler config."""
    config = read_json(path)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in DIFFUSERS_PREDICTIONS:
        raise DifflabError(f"{path}: prediction_type {prediction!r}; difflab reads {sorted(DIFFUSERS_PREDICTIONS)}")
    if config.get("trained_betas") is not None:
        return torch.tensor(config["trained_betas"], dtype=torch.float64), DIFFUSERS_PREDICTIONS[prediction]
    kind = getattr(diffusers, str(config.get("_class_name")), None)
    scheduler = kind.from_config(config) if kind is not None and hasattr(kind, "from_config") else None
    if getattr(scheduler, "betas", None) is None:
        raise DifflabError(f"{path}: a {config.get('_class_name')!r} without betas; difflab needs a discrete schedule")
    return scheduler.betas.double(), DIFFUSERS_PREDICTIONS[prediction]


def load_unet(folder: Path, diffusers):
    kind = read_json(folder / "config.json").get("_class_name")
    if kind != "UNet2DModel":
        raise DifflabError(f"{folder / 'config.json'}: a {kind!r}; difflab samples diffusers UNet2DModel folders")
    try:
        return diffusers.UNet2DModel.from_pretrained(str(folder), low_cpu_mem_usage=False)   # no accelerate notice
    except (OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DifflabError(f"{folder}: diffusers could not load the UNet2DModel ({reason})") from None


def load_diffusers(folder: str | Path, device: str = "cpu") -> LoadedModel:
    """The diffusers folder's model as a ``LoadedModel`` (its denoiser, a description, the recommended sampler)."""
    try:
        import diffusers
    except ImportError:
        raise DifflabError("--diffusers needs the diffusers package (pip install diffusers)") from None
    folder = Path(folder)
    unet_folder, scheduler_path = folder_parts(folder)
    record_path = folder / DIFFLAB_RECORD
    record = read_json(record_path) if record_path.is_file() else {"format": EXPORT_FORMAT}
    if record.get("format") != EXPORT_FORMAT:
        raise DifflabError(f"{record_path}: format {record.get('format')!r}, expected {EXPORT_FORMAT!r}")
    betas, prediction = scheduler_schedule(scheduler_path, diffusers)
    model = load_unet(unet_folder, diffusers)
    c = model.config
    if c.out_channels != c.in_channels:
        raise DifflabError(f"{unet_folder}: {c.out_channels} output channels for {c.in_channels} input channels "
                           f"(a learned variance); difflab samples diffusers models that output one prediction")
    size = c.sample_size if isinstance(c.sample_size, (list, tuple)) else (c.sample_size, c.sample_size)
    conditions = record.get("conditions")
    if conditions is None:                         # a diffusers model: its classes, and no null label
        conditions = [ClassLabel("label", num_classes=c.num_class_embeds).to_json()] if c.num_class_embeds else []
    fields = {f.name: f for f in map(condition_from_json, conditions)}
    label = fields.get("label")
    null_label = label.num_classes if label is not None and "conditions" in record else None
    denoiser = from_callable(NullLabelledNet(model, null_label) if label is not None else DiffusersNet(model),
                             betas, prediction, fields)
    # a description for the samplers (shape, range, conditions); the network is diffusers', not in difflab's registry
    spec = ModelSpec(f"diffusers.{type(model).__name__}", dict(c), denoiser.precond.to_json(),
                     (c.in_channels, *map(int, size)), tuple(record.get("data_range") or PIXEL_RANGE), conditions)
    sample = from_dict(SampleConfig, record.get("sample", {}), f"{record_path} sample.")
    return LoadedModel(denoiser.to(device).eval(), spec, dataclasses.replace(Config(), sample=sample), "diffusers",
                       int(record.get("step", 0)), folder)
