"""Which examples and which noise each training step uses, as a pure function of (seed, step).

Every step draws from generators seeded by (seed, step) and walks an epoch permutation seeded by
(seed, epoch), so a resumed run sees exactly the batches, timesteps and noise of an uninterrupted one
without saving any random-number state.

In data-parallel training these draws are made for the whole global batch on every rank, and each rank
keeps its slice (``StepBatch.shard``): N ranks then compute the gradient of one process with the same
global batch, and a run can be resumed with a different number of ranks.
"""

from __future__ import annotations

import torch

from difflab.conditioning import Cond

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant to spread (seed, index) pairs apart
EPOCH_STREAM, STEP_STREAM, DROPOUT_STREAM = 1, 2, 3
RANK_STREAM_STRIDE = 16    # rank r > 0 draws dropout from stream DROPOUT_STREAM + 16 r, apart from the above


def derived_seed(seed: int, index: int, stream: int = 0) -> int:
    return (seed * _MIX + index * 1_000_003 + stream * 7919) % (2 ** 63)


class EpochBatches:
    """Batches of indices without replacement within each epoch, reshuffled every epoch."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, epoch, stream=EPOCH_STREAM))
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
    return torch.Generator().manual_seed(derived_seed(seed, step, stream=STEP_STREAM))


def dropout_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed set before a step's forward passes (dropout masks); each rank draws its own."""
    return derived_seed(seed, step, stream=DROPOUT_STREAM + RANK_STREAM_STRIDE * rank)


class StepBatch:
    """A step's tensors (examples, noise, noise levels, loss weights, ...; batch first) and its condition
    record, as an objective drew them. Fields are read as attributes (``batch.x0``); a missing one is None."""

    def __init__(self, tensors: dict[str, torch.Tensor | None], cond: Cond | None = None):
        self.tensors = {k: v for k, v in tensors.items() if v is not None}
        self.cond = cond

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("tensors", "cond"):
            raise AttributeError(name)
        return self.tensors.get(name)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def _map(self, fn) -> "StepBatch":
        return StepBatch({k: fn(v) for k, v in self.tensors.items()},
                         self.cond.map(fn) if self.cond is not None else None)

    def shard(self, rank: int, world_size: int) -> "StepBatch":
        """Rank ``rank``'s contiguous slice of the global batch."""
        size = len(self) // world_size
        return self._map(lambda v: v[rank * size:(rank + 1) * size])

    def split(self, parts: int) -> list["StepBatch"]:
        """``parts`` equal micro-batches (gradient accumulation); the batch itself when ``parts`` is 1."""
        if parts == 1:
            return [self]
        size = len(self) // parts
        return [self._map(lambda v, i=i: v[i * size:(i + 1) * size]) for i in range(parts)]

    def to(self, device: torch.device, channels_last: bool = False) -> "StepBatch":
        def move(v: torch.Tensor) -> torch.Tensor:
            v = v.to(device, non_blocking=True)
            return v.contiguous(memory_format=torch.channels_last) if channels_last and v.ndim == 4 else v
        return self._map(move)
