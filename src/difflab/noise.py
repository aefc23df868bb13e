"""Noise drawn per sample, so that a sample depends on its seed and not on the batch it was drawn in.

The same idea as NVlabs/edm ``StackedRandomGenerator``: one ``torch.Generator`` per sample. Each
generator draws ``chunk`` noise tensors at a time and hands them out one by one, which keeps the number
of generator calls low when there are many small samples (2-D points) and many steps.
"""

from __future__ import annotations

from typing import Sequence

import torch


class PerSampleNoise:
    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", chunk: int = 64):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        self.chunk = chunk
        self._buffer: torch.Tensor | None = None      # (chunk, N, *shape)
        self._used = 0

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A (len(seeds), *shape) tensor of standard normal noise: the next draw of each sample's stream."""
        shape = tuple(shape)
        buffer = self._buffer
        if buffer is None or self._used == self.chunk or buffer.shape[2:] != shape or buffer.dtype != dtype:
            buffer = torch.stack([torch.randn((self.chunk, *shape), generator=g, device=self.device, dtype=dtype)
                                  for g in self.generators], dim=1)
            self._buffer, self._used = buffer, 0
        self._used += 1
        return buffer[self._used - 1]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], x.dtype)
