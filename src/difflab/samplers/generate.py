"""Draw many samples in batches, each from its own seed, with a progress bar."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from difflab.denoiser import Denoiser
from difflab.samplers.noise import PerSampleNoise
from difflab.schedules import NoiseSchedule


def generate(sampler: Callable, denoiser: Denoiser, schedule: NoiseSchedule, shape: Sequence[int],
             seeds: Sequence[int], batch_size: int = 256, labels: torch.Tensor | None = None,
             device: torch.device | str = "cpu", progress: bool = False, **sampler_kwargs) -> torch.Tensor:
    """Samples for ``seeds`` (sample i uses only seed i: the result does not depend on ``batch_size``)."""
    outputs = []
    bar = tqdm(total=len(seeds), desc="sampling", unit="img", disable=not progress)
    for start in range(0, len(seeds), batch_size):
        noise = PerSampleNoise(seeds[start:start + batch_size], device)
        x = noise.randn(shape)                              # x_T ~ N(0, I)
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        outputs.append(sampler(denoiser, x, schedule, noise, y=y, **sampler_kwargs).cpu())
        bar.update(len(noise))
    bar.close()
    return torch.cat(outputs)
