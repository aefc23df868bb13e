"""Noise drawn per sample, so that a sample depends on its seed and not on the batch it was drawn in.

The same idea as NVlabs/edm ``StackedRandomGenerator``: one ``torch.Generator`` per sample.
"""

from __future__ import annotations

from typing import Sequence

import torch


class PerSampleNoise:
    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A (len(seeds), *shape) tensor of standard normal noise."""
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], x.dtype)
