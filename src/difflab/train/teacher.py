"""A trained model read from its checkpoint alone, for the objectives that learn from one (distillation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difflab.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_weights
from difflab.config import Config
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.latent import LatentSpace
from difflab.model import ModelSpec, denoiser_from_spec


@dataclass
class Teacher:
    denoiser: Denoiser        # in eval mode, its EMA weights when it has them
    spec: ModelSpec
    config: Config            # the experiment that trained it
    path: Path
    latent: LatentSpace | None = None    # a latent model's autoencoder (from its checkpoint)


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or the checkpoint of a run folder."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def load_teacher(path: str | Path) -> Teacher:
    checkpoint = load_checkpoint(checkpoint_file(path))
    if "model" not in checkpoint.metadata:
        raise DifflabError(f"distill.teacher {checkpoint.path}: has no model description (not a diffusion model "
                           f"written by difflab >= 0.2)")
    spec = ModelSpec.from_json(checkpoint.metadata["model"], f"{checkpoint.path} (model)")
    denoiser = denoiser_from_spec(spec)
    load_weights(denoiser.net, checkpoint, "ema" if checkpoint.has_ema else "model")
    for p in denoiser.parameters():
        p.requires_grad_(False)
    latent = (LatentSpace.from_checkpoint(checkpoint, spec.autoencoder, "frozen.autoencoder")
              if spec.is_latent else None)
    return Teacher(denoiser.eval(), spec, checkpoint.config, checkpoint.path, latent)
