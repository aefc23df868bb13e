"""Feature extractors: what FID, KID and precision/recall compare, and where class probabilities come from.

An extractor is any object with a ``name`` (it keys cached reference statistics, so it must change when
the weights do) that maps a batch of uint8 images (B, C, H, W) to a dict holding ``"features"`` (B, D)
and, for classifiers, ``"probs"`` (B, classes). Three kinds:

- ``ClassifierExtractor``: the shipped Fashion-MNIST classifier (``load_fmnist_classifier``); its
  penultimate layer is difflab's default feature space for Fashion-MNIST.
- ``CallableExtractor``: any user function of the images.
- ``InceptionExtractor`` (in ``difflab.metrics.inception``): Inception-v3 pool3 features as in FID.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from difflab.checkpoint import read_safetensors
from difflab.files import atomic_write
from difflab.errors import DifflabError
from difflab.nets.classifier import Classifier, ClassifierConfig

FMNIST_CLASSIFIER = "fmnist_classifier.safetensors"
CLASSIFIER_FORMAT = "difflab-classifier/1"
HASH_CHARS = 12


class FeatureExtractor(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """A uint8 (N, C, H, W) tensor, or an error naming ``what``."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        dtype = getattr(images, "dtype", "?")
        raise DifflabError(f"{what}: expected uint8 images of shape (N, C, H, W), got {dtype} {shape}")
    return images


def tensors_digest(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """Leading hex digits of a SHA-256 over names, bytes and ``extra``: independent of how they were saved."""
    h = hashlib.sha256(extra.encode())
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:HASH_CHARS]


def file_digest(path: str | Path) -> str:
    """Leading hex digits of the file's SHA-256: tags extractor names so caches follow the weights."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:HASH_CHARS]


# -- the Fashion-MNIST classifier ------------------------------------------------------------------------------
class ClassifierExtractor:
    """Penultimate features and softmax probabilities of a ``Classifier`` trained on ``image_size`` images.

    Images one size larger by an even margin (Fashion-MNIST's 28x28 zero-padded to 32x32, as difflab's
    ``data.resize: pad`` does) are centre-cropped back, so 28- and 32-pixel samples are scored alike.
    """

    def __init__(self, net: Classifier, name: str, metadata: dict | None = None):
        self.net = net.eval()
        self.name = name
        self.metadata = metadata or {}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        c = self.net.config
        check_images(images)
        _, channels, h, w = images.shape
        if channels != c.in_channels or h != w or h < c.image_size or (h - c.image_size) % 2:
            raise DifflabError(f"{self.name}: expects {c.in_channels}-channel {c.image_size}x{c.image_size} "
                               f"images (or larger by an even zero-padded margin), got shape {tuple(images.shape)}")
        margin = (h - c.image_size) // 2
        images = images[:, :, margin:margin + c.image_size, margin:margin + c.image_size]
        return images.float() / 127.5 - 1.0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.net.features(self.prepare(images))
        return {"features": features, "probs": torch.softmax(self.net.head(features), dim=1)}


def save_classifier(net: Classifier, path: str | Path, metadata: dict) -> Path:
    """The classifier's weights in safetensors, its config and ``metadata`` (e.g. test accuracy) as JSON,
    written to a temporary name and renamed."""
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": CLASSIFIER_FORMAT, "config": json.dumps(dataclasses.asdict(net.config)),
            **{k: json.dumps(v) for k, v in metadata.items()}}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def load_classifier(path: str | Path, name: str | None = None) -> ClassifierExtractor:
    """A classifier file written by ``save_classifier``, as a feature extractor named
    ``<name or file stem>-<digest of weights and config>``."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, CLASSIFIER_FORMAT, "classifier")
    try:
        values = json.loads(metadata.pop("config"))
        config = ClassifierConfig(**{**values, "channels": tuple(values["channels"])})
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise DifflabError(f"{path}: missing or invalid classifier config in metadata ({e})") from None
    net = Classifier(config)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise DifflabError(f"{path}: weights do not fit its classifier config ({str(e).splitlines()[0]})") from None
    info = {k: json.loads(v) for k, v in metadata.items() if k != "format"}
    digest = tensors_digest(tensors, json.dumps(values, sort_keys=True))
    return ClassifierExtractor(net, f"{name or path.stem}-{digest}", info)


def fmnist_classifier_path() -> Path:
    return Path(str(resources.files("difflab").joinpath("assets").joinpath(FMNIST_CLASSIFIER)))


def load_fmnist_classifier() -> ClassifierExtractor:
    """The Fashion-MNIST classifier shipped with difflab (trained by scripts/train_fmnist_classifier.py)."""
    path = fmnist_classifier_path()
    if not path.is_file():
        raise DifflabError(f"the shipped Fashion-MNIST classifier {path} is missing; reinstall difflab or run "
                           "scripts/train_fmnist_classifier.py")
    return load_classifier(path, name="fmnist_classifier")


# -- any user function ----------------------------------------------------------------------------------------
class CallableExtractor:
    """Wraps ``fn(images uint8 (B, C, H, W)) -> features (B, D)`` (or a dict like the other extractors)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor | dict], name: str):
        self.fn, self.name = fn, name

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.fn(check_images(images))
        return dict(out) if isinstance(out, dict) else {"features": out}


# -- running an extractor over many images ------------------------------------------------------------------------
def extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 500,
            progress: bool = False, what: str = "images") -> dict[str, np.ndarray]:
    """The extractor's outputs for all ``images``, in batches, as float64 arrays keyed like its dict."""
    check_images(images, what)
    parts: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=len(images), desc=f"features ({extractor.name})", unit="img", disable=not progress)
    for start in range(0, len(images), batch_size):
        batch = extractor(images[start:start + batch_size])
        if "features" not in batch:
            raise DifflabError(f"feature extractor {extractor.name!r} returned no 'features'")
        for key, value in batch.items():
            value = torch.as_tensor(value).detach().cpu().double()
            parts.setdefault(key, []).append(value.reshape(value.shape[0], -1).numpy())
        bar.update(min(batch_size, len(images) - start))
    bar.close()
    return {key: np.concatenate(values) for key, values in parts.items()}
