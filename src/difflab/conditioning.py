"""Conditions as one record: ``Cond(label=..., text=..., ...)`` carried from the data through the objective,
the networks, guidance and the samplers, which never look inside it.

Two kinds of object:

- ``Cond``, the record: named tensors, batch first (one row per example). It is sliced, concatenated and moved
  as a whole, so a sampler batches it like x and guidance doubles it like x.
- ``Condition``, the description of one field, kept with the model: its name, its "null" value (what "no
  condition" means for it) and its training dropout, the probability of replacing it by that null value
  (Ho & Salimans 2021, Sec. 3.2: the unconditional model is the conditional one at the null condition).
  The same object supplies the null value in training (dropout) and in sampling (classifier-free guidance),
  so the two cannot disagree.

A network reads the fields it consumes (``cond.get("label")``); a missing field means its null value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping

import torch

from difflab.errors import DifflabError


class Cond(Mapping):
    """An immutable record of named condition tensors with a common batch size."""

    def __init__(self, fields: Mapping[str, torch.Tensor] | None = None, **named: torch.Tensor):
        self._fields = {**(fields or {}), **named}
        sizes = {name: value.shape[0] for name, value in self._fields.items()}
        if len(set(sizes.values())) > 1:
            raise DifflabError(f"condition fields have different batch sizes: {sizes}")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._fields[name]

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return "Cond(" + ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._fields.items()) + ")"

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Cond":
        return Cond({name: fn(value) for name, value in self._fields.items()})

    def replace(self, **fields: torch.Tensor) -> "Cond":
        return Cond({**self._fields, **fields})

    def to(self, device: torch.device | str) -> "Cond":
        return self.map(lambda v: v.to(device))

    def rows(self, start: int, stop: int) -> "Cond":
        return self.map(lambda v: v[start:stop])

    @staticmethod
    def cat(records: Iterable["Cond"]) -> "Cond":
        """Row-wise concatenation of records with the same fields (e.g. conditional + unconditional)."""
        records = list(records)
        names = set(records[0])
        if any(set(r) != names for r in records):
            raise DifflabError("cannot concatenate condition records with different fields")
        return Cond({name: torch.cat([r[name] for r in records]) for name in records[0]})


# -- descriptions of condition fields ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """One condition field: its ``name`` in the record and its training ``dropout`` probability."""
    name: str
    dropout: float = 0.0

    kind = "tensor"
    guided = True      # classifier-free guidance sets it to null in the unconditional pass

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        """The null condition, shaped like ``value``: zeros (an empty embedding) unless a kind says otherwise."""
        return torch.zeros_like(value)

    def check(self, value: torch.Tensor) -> None:
        """Raise a clear error when ``value`` cannot be this condition."""

    def to_json(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class ClassLabel(Condition):
    """An integer class in [0, num_classes); the null label is ``num_classes`` (an extra embedding row).
    ``names``, when the data set has them, lets users ask for a class by name."""
    num_classes: int = 0
    names: tuple[str, ...] = ()

    kind = "class_label"

    def class_id(self, text: str) -> int:
        """The class named (case and spaces ignored) or numbered ``text``; a clear error otherwise."""
        if text.strip().lstrip("-").isdigit():
            index = int(text)
        else:
            folded = {name.lower().replace(" ", ""): i for i, name in enumerate(self.names)}
            index = folded.get(text.lower().replace(" ", ""), -1)
            if index < 0:
                known = ", ".join(self.names) if self.names else "none: use a class number"
                raise DifflabError(f"unknown class {text!r} (names: {known})")
        if not 0 <= index < self.num_classes:
            raise DifflabError(f"class {text!r}: must be in [0, {self.num_classes - 1}]")
        return index

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        return torch.full_like(value, self.num_classes)

    def check(self, value: torch.Tensor) -> None:
        if value.dtype.is_floating_point or value.ndim != 1:
            raise DifflabError(f"condition {self.name!r}: expected a 1-D integer tensor of class ids, "
                               f"got {value.dtype} {tuple(value.shape)}")
        if len(value) and (int(value.min()) < 0 or int(value.max()) > self.num_classes):
            raise DifflabError(f"condition {self.name!r}: class ids must lie in [0, {self.num_classes - 1}] "
                               f"(or {self.num_classes}, the null label)")


CONTROL_FIELD = "control"      # the record's field for a ControlNet's control image


@dataclass(frozen=True)
class ControlImage(Condition):
    """A ControlNet's control image (Zhang et al. 2023): (B, channels, H, W) in [0, 1], made from images by the
    hint ``hint`` with its options (``difflab.data.hints``). Never dropped in training and kept in both passes
    of classifier-free guidance (the paper's "CFG resolution weighting" aside, the control is not what is
    guided); its null value, zeros, is what the hint of a blank image would be for edges."""
    channels: int = 1
    hint: str = "canny"
    canny_sigma: float = 1.0
    silhouette_threshold: float = 0.05
    sketch_factor: int = 4

    kind = "control_image"
    guided = False

    def check(self, value: torch.Tensor) -> None:
        if not value.dtype.is_floating_point or value.ndim != 4 or value.shape[1] != self.channels:
            raise DifflabError(f"condition {self.name!r}: expected (B, {self.channels}, H, W) control images in "
                               f"[0, 1], got {value.dtype} {tuple(value.shape)}")


LOW_RES_FIELD, AUG_LEVEL_FIELD = "low_res", "aug_level"      # a super-resolution stage's conditions


@dataclass(frozen=True)
class LowResImage(Condition):
    """A super-resolution stage's low-resolution image (B, channels, size, size) in [-1, 1] (Ho et al. 2021),
    after its noise-conditioning augmentation; never dropped, kept in both passes of guidance."""
    size: int = 0
    channels: int = 1

    kind = "low_res_image"
    guided = False

    def check(self, value: torch.Tensor) -> None:
        if not value.dtype.is_floating_point or tuple(value.shape[1:]) != (self.channels, self.size, self.size):
            raise DifflabError(f"condition {self.name!r}: expected (B, {self.channels}, {self.size}, {self.size}) "
                               f"low-resolution images, got {value.dtype} {tuple(value.shape)}")


@dataclass(frozen=True)
class AugmentationLevel(Condition):
    """The level a in [0, 1] of the noise-conditioning augmentation ``augmentation`` (gaussian | blur) of the
    low-resolution image (``difflab.superres``); training draws a uniform in [0, max_level]."""
    augmentation: str = "gaussian"
    max_level: float = 0.5
    max_blur: float = 1.0

    kind = "augmentation_level"
    guided = False

    def check(self, value: torch.Tensor) -> None:
        if not value.dtype.is_floating_point or value.ndim != 1 or (len(value) and not
                                                                    0 <= float(value.min()) <= float(value.max()) <= 1):
            raise DifflabError(f"condition {self.name!r}: expected a 1-D float tensor of levels in [0, 1], got "
                               f"{value.dtype} {tuple(value.shape)}")


CAPTION_FIELD = "caption"      # a text-to-image model's caption tokens


@dataclass(frozen=True)
class Caption(Condition):
    """A caption as token ids (B, max_length), 0 = padding, in the tokenizer of the model's text encoder
    (``difflab.nets.text_encoder``). The null value is the empty caption's tokens ``null_tokens``, stored with
    the model so that training (caption dropout, GLIDE's 20%) and sampling (classifier-free guidance) use the
    same one."""
    max_length: int = 0
    null_tokens: tuple[int, ...] = ()

    kind = "caption"

    def null_like(self, value: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.null_tokens, dtype=value.dtype, device=value.device).expand_as(value).clone()

    def check(self, value: torch.Tensor) -> None:
        if value.dtype.is_floating_point or value.ndim != 2 or value.shape[1] != self.max_length:
            raise DifflabError(f"condition {self.name!r}: expected (B, {self.max_length}) integer caption tokens, "
                               f"got {value.dtype} {tuple(value.shape)}")


TEXT_EMBED_FIELD, IMAGE_EMBED_FIELD = "text_embed", "image_embed"     # unCLIP's CLIP embeddings z_t, z_i


@dataclass(frozen=True)
class ClipEmbedding(Condition):
    """A CLIP embedding (B, dim) of a caption (z_t, the unCLIP prior's condition) or of an image (z_i, the
    decoder's), unit-norm times ``scale``. The null value is the zero vector (Ramesh et al. 2022, Sec. 2.1: for
    classifier-free guidance the CLIP embedding is set to zero 10% of the time), which no real embedding (norm
    ``scale``) is."""
    dim: int = 0
    scale: float = 1.0

    kind = "clip_embedding"

    def check(self, value: torch.Tensor) -> None:
        if not value.dtype.is_floating_point or value.ndim != 2 or value.shape[1] != self.dim:
            raise DifflabError(f"condition {self.name!r}: expected (B, {self.dim}) CLIP embeddings, got "
                               f"{value.dtype} {tuple(value.shape)}")


CONDITION_KINDS: dict[str, type[Condition]] = {"tensor": Condition, "class_label": ClassLabel,
                                               "control_image": ControlImage, "low_res_image": LowResImage,
                                               "augmentation_level": AugmentationLevel, "caption": Caption,
                                               "clip_embedding": ClipEmbedding}


def condition_from_json(values: dict) -> Condition:
    values = dict(values)
    for key in ("names", "null_tokens"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    kind = values.pop("kind", None)
    if kind not in CONDITION_KINDS:
        raise DifflabError(f"unknown condition kind {kind!r}; known: {sorted(CONDITION_KINDS)}")
    try:
        return CONDITION_KINDS[kind](**values)
    except TypeError as e:
        raise DifflabError(f"invalid {kind} condition {values}: {e}") from None


# -- null values: dropout in training, guidance in sampling ------------------------------------------------------
def with_null(cond: Cond, conditions: Mapping[str, Condition], names: Iterable[str] | None = None,
              mask: torch.Tensor | None = None) -> Cond:
    """``cond`` with the fields ``names`` (default: all described ones present) replaced by their null values,
    in every row or only where the boolean (B,) ``mask`` is true."""
    names = [n for n in (conditions if names is None else names) if n in cond]
    replaced = {}
    for name in names:
        if name not in conditions:
            raise DifflabError(f"condition {name!r} is not one the model knows ({', '.join(conditions) or 'none'})")
        value, null = cond[name], conditions[name].null_like(cond[name])
        if mask is None:
            replaced[name] = null
        else:
            rows = mask.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
            replaced[name] = torch.where(rows, null, value)
    return cond.replace(**replaced)


def drop_conditions(cond: Cond, conditions: Mapping[str, Condition], generator: torch.Generator) -> Cond:
    """Training dropout: each described field is replaced by its null value with its own probability, one
    independent draw per row and field (fields in the order of ``conditions``)."""
    for name, condition in conditions.items():
        if name in cond and condition.dropout > 0:
            drop = torch.rand(cond[name].shape[:1], generator=generator) < condition.dropout
            cond = with_null(cond, conditions, [name], drop)
    return cond
