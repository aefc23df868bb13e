"""Data sets held in memory as one tensor: images as uint8 (N, C, H, W), points as float32 (N, D).

Batches are gathered by index from that tensor, so the training loop has no per-sample Python work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.conditioning import Cond
from difflab.errors import DifflabError


@dataclass
class InMemoryData:
    data: torch.Tensor                      # uint8 (N, C, H, W) images, or float32 (N, D) points
    labels: torch.Tensor | None = None      # int64 (N,), or None for unlabelled data
    num_classes: int | None = None
    name: str = ""
    class_names: tuple[str, ...] = ()       # the classes' names, when the data set has them

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def is_image(self) -> bool:
        return self.data.dtype == torch.uint8

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model-ready batch: images scaled from {0..255} to [-1, 1], points as they are (``generator`` is for
        data sets that draw, such as ``difflab.latent.LatentData``; it is not used here)."""
        x = self.data[indices]
        x = x.float() / 127.5 - 1.0 if self.is_image else x.float()
        y = self.labels[indices] if self.labels is not None else None
        return x, y


@dataclass
class CaptionedData(InMemoryData):
    """Images with one caption each (text-to-image). ``tokens`` (N, max_length) are the captions in the model's
    tokenizer (set once the model exists: ``tokenize``); batches carry them as the record's ``caption``. The
    labels stay for evaluation (the caption's class), not as a condition."""
    captions: tuple[str, ...] = ()
    tokens: torch.Tensor | None = None

    def tokenize(self, tokenizer) -> None:
        """Tokenise every caption once, with ``tokenizer(list of str) -> (N, L) int64``."""
        self.tokens = tokenizer(list(self.captions))

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        if self.tokens is None:
            raise DifflabError("captioned data: tokenize the captions with the model's tokenizer first")
        x, _ = super().batch(indices, generator)
        return x, Cond(caption=self.tokens[indices])


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to uint8 {0..255} (the inverse of ``InMemoryData.batch``), rounding to nearest."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
