"""A frozen noise-aware CLIP as the encoder of unCLIP's data (Ramesh et al. 2022, Sec. 2: the CLIP image
embedding z_i and text embedding z_t of each captioned image), as ``latent.py`` makes an autoencoder the encoder of
latent diffusion's: every training image and caption is encoded once, cached beside the CLIP, and the CLIP itself is
stored in the unCLIP model's checkpoint (``frozen.clip``), so sampling needs no other file.

- z_i = the CLIP's image embedding of the clean image (t = 0: the noise-aware CLIP is trained on clean images
  too, ``train.clean_fraction``), z_t = its text embedding of the caption; both unit-norm from the CLIP.
- The models see them times ``scale`` = sqrt(d) (d = the embedding width): a unit vector's coordinates have
  mean square 1 / d, so sqrt(d) z has unit variance per dimension on average, the scale the noise schedules
  assume. DALLE2-pytorch does the same (``DiffusionPrior``: ``image_embed_scale = image_embed_dim ** 0.5`` on
  l2-normalised embeddings); here z_t is scaled alike, and the decoder reads z_i at the same scale, so a prior
  sample goes to the decoder as it is.
- ``PriorData`` (the prior's training set): x = sqrt(d) z_i (N, d), with ``cond["text_embed"]`` = sqrt(d) z_t.
  ``EmbeddedImages`` (the decoder's): the images, with ``cond["image_embed"]`` = sqrt(d) z_i (and the caption
  tokens, for a decoder that reads the caption).

The cache, ``CLIP_RUN/embeddings/SPLIT-KEY.safetensors`` (unit-norm z_i and z_t, float32), is keyed by the CLIP
file's SHA-256 and the data's settings: a retrained CLIP or other data never reuse a stale one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.checkpoint import Checkpoint, load_weights
from difflab.conditioning import IMAGE_EMBED_FIELD, TEXT_EMBED_FIELD, Cond
from difflab.data import InMemoryData
from difflab.data.base import CaptionedData
from difflab.errors import DifflabError
from difflab.files import atomic_write
from difflab.nets.clip import NoisyCLIP, NoisyCLIPConfig
from difflab.typed import from_dict, to_dict

ENCODE_BATCH = 500
FROZEN_CLIP = "clip"                # the checkpoint's frozen.clip.* tensors, and its metadata record "clip"


@dataclass
class ClipSpace:
    clip: NoisyCLIP                 # frozen, in eval mode
    source: str = ""                # the CLIP file it was read from
    digest: str = ""                # that file's SHA-256

    @property
    def dim(self) -> int:
        return self.clip.config.embed_dim

    @property
    def scale(self) -> float:
        return math.sqrt(self.dim)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.clip.config
        return (c.in_channels, c.image_size, c.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def unit_image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """z_i (B, d), unit norm, of images in [-1, 1] (B, C, H, W), clean: t = 0."""
        t = torch.zeros(images.shape[0], dtype=torch.long, device=self.device)
        return self.clip.encode_image(images.to(self.device), t)

    @torch.no_grad()
    def unit_text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """z_t (B, d), unit norm, of the captions."""
        return self.clip.encode_text(self.clip.tokenize(list(captions)).to(self.device))

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """sqrt(d) z_i: what the models read."""
        return self.scale * self.unit_image_embeddings(images)

    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        """sqrt(d) z_t: what the prior reads."""
        return self.scale * self.unit_text_embeddings(captions)

    def to_json(self) -> dict:
        return {"network_options": to_dict(self.clip.config), "scale": self.scale, "source": self.source,
                "sha256": self.digest}

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, prefix: str = f"frozen.{FROZEN_CLIP}") -> "ClipSpace":
        """The CLIP stored in an unCLIP model's checkpoint (its record "clip", its weights under ``prefix``)."""
        record = checkpoint.metadata.get(FROZEN_CLIP)
        if not isinstance(record, dict):
            raise DifflabError(f"{checkpoint.path}: holds no CLIP (not an unCLIP prior or decoder: unclip.stage)")
        try:
            config = from_dict(NoisyCLIPConfig, record["network_options"], "clip.")
        except (KeyError, TypeError) as e:
            raise DifflabError(f"{checkpoint.path}: invalid CLIP description ({e!r})") from None
        clip = NoisyCLIP(config)
        load_weights(clip, checkpoint, prefix)
        return cls(clip.eval().requires_grad_(False), str(record.get("source", "")), str(record.get("sha256", "")))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_clip_space(path: str | Path) -> ClipSpace:
    """The noise-aware CLIP of a ``difflab train-clip`` run (its folder or file), EMA weights, frozen."""
    from difflab.train.clip import CLIP_NAME, load_noisy_clip

    path = Path(path)
    file = path / CLIP_NAME if path.is_dir() else path
    if not file.is_file():
        raise DifflabError(f"data.clip: {file} does not exist (train the CLIP first: difflab train-clip fmnist_clip)")
    clip, _ = load_noisy_clip(file)
    return ClipSpace(clip, str(file.resolve()), file_digest(file))


def check_same_clip(checkpoint_path: Path, space: ClipSpace) -> None:
    """A resumed unCLIP run continues on the CLIP it started with (its checkpoint's record "clip")."""
    from difflab.checkpoint import load_checkpoint

    record = load_checkpoint(checkpoint_path).metadata.get(FROZEN_CLIP) or {}
    if record.get("sha256") != space.digest:
        raise DifflabError(f"data.clip: {space.source} is not the CLIP that {checkpoint_path} was trained on "
                           f"({record.get('source', 'none')}); resume with that one, or start afresh")


# -- encoding the data once ---------------------------------------------------------------------------------------
@torch.no_grad()
def encode_captioned(space: ClipSpace, data: CaptionedData) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm z_i and z_t (N, d) each, float32 on the CPU: images ``ENCODE_BATCH`` at a time, each distinct
    caption once."""
    images = []
    for start in range(0, len(data), ENCODE_BATCH):
        x, _ = InMemoryData.batch(data, torch.arange(start, min(start + ENCODE_BATCH, len(data))))
        images.append(space.unit_image_embeddings(x).float().cpu())
    distinct = list(dict.fromkeys(data.captions))
    position = {caption: i for i, caption in enumerate(distinct)}
    text = torch.cat([space.unit_text_embeddings(distinct[i:i + ENCODE_BATCH]).float().cpu()
                      for i in range(0, len(distinct), ENCODE_BATCH)])
    return torch.cat(images), text[torch.tensor([position[c] for c in data.captions], dtype=torch.long)]


def cache_path(space: ClipSpace, data_config, split: str) -> Path:
    """Beside the CLIP, named by its file's hash and the data's settings."""
    key = json.dumps({"clip": space.digest, "split": split, "dataset": data_config.dataset, "path": data_config.path,
                      "image_size": data_config.image_size, "resize": data_config.resize,
                      "held_out": data_config.held_out_captions}, sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(space.source).parent / "embeddings" / f"{split}-{name}.safetensors"


def cached_embeddings(space: ClipSpace, data: CaptionedData, cache: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_captioned``, read from / written to ``cache`` (a damaged or mismatched cache is rebuilt)."""
    if cache is not None and cache.is_file():
        try:
            tensors = load_file(str(cache))
            if tensors["image"].shape == tensors["text"].shape == (len(data), space.dim):
                return tensors["image"], tensors["text"]
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            pass
    image, text = encode_captioned(space, data)
    if cache is not None:
        atomic_write(cache, lambda tmp: save_file({"image": image.contiguous(), "text": text.contiguous()}, str(tmp)))
    return image, text


# -- the two training sets ----------------------------------------------------------------------------------------
@dataclass
class PriorData:
    """The prior's examples: x = sqrt(d) z_i (N, d), each with its caption's sqrt(d) z_t."""
    image_embed: torch.Tensor
    text_embed: torch.Tensor
    embed_scale: float
    captions: tuple[str, ...] = ()
    labels: torch.Tensor | None = None      # the images' classes (for evaluation; not a condition)
    name: str = ""
    num_classes = None
    class_names = ()

    def __len__(self) -> int:
        return self.image_embed.shape[0]

    @property
    def is_image(self) -> bool:
        return False

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.image_embed.shape[1:])

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        return self.image_embed[indices], Cond({TEXT_EMBED_FIELD: self.text_embed[indices]})


@dataclass
class EmbeddedImages(CaptionedData):
    """The decoder's examples: images with their sqrt(d) z_i; the caption tokens too once tokenised (a decoder
    that reads the caption)."""
    image_embed: torch.Tensor | None = None
    embed_scale: float = 1.0

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        x, _ = InMemoryData.batch(self, indices)
        fields = {IMAGE_EMBED_FIELD: self.image_embed[indices]}
        if self.tokens is not None:
            fields["caption"] = self.tokens[indices]
        return x, Cond(fields)


def unclip_dataset(stage: str, space: ClipSpace, data: CaptionedData, image: torch.Tensor, text: torch.Tensor):
    """The training set of an unCLIP ``stage`` (prior | decoder) from the captioned data and their unit-norm
    embeddings."""
    if stage == "prior":
        return PriorData(space.scale * image, space.scale * text, space.scale, data.captions, data.labels,
                         f"{data.name}/clip_embeddings")
    return EmbeddedImages(data.data, data.labels, data.num_classes, data.name, data.class_names,
                          captions=data.captions, image_embed=space.scale * image, embed_scale=space.scale)
