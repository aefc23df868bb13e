"""Draw many samples in batches, each from its own seed, with a progress bar."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from difflab.denoiser import Denoiser
from difflab.samplers.noise import PerSampleNoise
from difflab.schedules import NoiseSchedule


def generate(sampler: Callable, denoiser: Denoiser | Callable, schedule: NoiseSchedule | torch.Tensor,
             shape: Sequence[int], seeds: Sequence[int], batch_size: int = 256, labels: torch.Tensor | None = None,
             device: torch.device | str = "cpu", progress: bool = False, prior_std: float = 1.0,
             dtype: torch.dtype = torch.float32, **sampler_kwargs) -> torch.Tensor:
    """Samples for ``seeds`` (sample i uses only seed i: the result does not depend on ``batch_size``).

    ``denoiser`` and ``schedule`` are what ``sampler`` takes: a ``Denoiser`` and a ``NoiseSchedule`` for
    ``sample_ancestral``, a ``SigmaDenoiser`` and a sigma grid for the sigma-space samplers, which also
    need ``prior_std`` (``difflab.samplers.sigmas.prior_std``): x at the first step is N(0, prior_std^2).
    """
    outputs = []
    bar = tqdm(total=len(seeds), desc="sampling", unit="img", disable=not progress)
    for start in range(0, len(seeds), batch_size):
        noise = PerSampleNoise(seeds[start:start + batch_size], device)
        x = noise.randn(shape, dtype) * prior_std           # x_T ~ N(0, I), VE-scaled if prior_std != 1
        y = labels[start:start + batch_size].to(device) if labels is not None else None
        outputs.append(sampler(denoiser, x, schedule, noise, y=y, **sampler_kwargs).cpu())
        bar.update(len(noise))
    bar.close()
    return torch.cat(outputs)
