"""Which examples and which noise each training step uses, as a pure function of (seed, step).

Every step draws from generators seeded by (seed, step) and walks an epoch permutation seeded by
(seed, epoch), so a resumed run sees exactly the batches, timesteps and noise of an uninterrupted one
without saving any random-number state.
"""

from __future__ import annotations

import torch

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant to spread (seed, index) pairs apart


def derived_seed(seed: int, index: int, stream: int = 0) -> int:
    return (seed * _MIX + index * 1_000_003 + stream * 7919) % (2 ** 63)


class EpochBatches:
    """Batches of indices without replacement within each epoch, reshuffled every epoch."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, epoch, stream=1))
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=g)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        chunks, remaining = [], self.batch_size
        while remaining:
            epoch, offset = divmod(start, self.num_examples)
            take = min(remaining, self.num_examples - offset)
            chunks.append(self.permutation(epoch)[offset:offset + take])
            start, remaining = start + take, remaining - take
        return torch.cat(chunks)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for a step's timesteps, noise and label dropout."""
    return torch.Generator().manual_seed(derived_seed(seed, step, stream=2))
