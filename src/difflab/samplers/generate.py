"""Draw many samples in batches, each from its own seed, with a progress bar that ticks per sampler step."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from difflab.conditioning import Cond
from difflab.samplers.noise import PerSampleNoise


def generate(sampler: Callable, denoiser: Callable, grid, shape: Sequence[int], seeds: Sequence[int],
             batch_size: int = 256, cond: Cond | None = None, device: torch.device | str = "cpu",
             progress: bool = False, prior_std: float = 1.0, dtype: torch.dtype = torch.float32,
             start: torch.Tensor | None = None, rows: dict[str, torch.Tensor] | None = None,
             on_step: Callable[[int, int], None] | None = None, **sampler_kwargs) -> torch.Tensor:
    """Samples for ``seeds`` (sample i uses only seed i: the result does not depend on ``batch_size``).

    ``grid`` is what ``sampler`` takes after the denoiser: a (respaced) ``NoiseSchedule`` for
    ``sample_ancestral``, a sigma grid for the sigma-space samplers, which also need ``prior_std``
    (``Precond.prior_std``): x at the first step is N(0, prior_std^2), or N(start, prior_std^2) given
    ``start`` (image editing: a noised input). ``cond``, ``start`` and the tensors of ``rows`` (sampler
    arguments, such as an inpainting mask) hold one row per seed. ``on_step(done, total)``, if given, is
    called after every sampler step, as the progress bar ticks (``total``: steps times batches).
    """
    steps = len(grid) - 1 if isinstance(grid, torch.Tensor) else len(grid)
    batches = range(0, len(seeds), batch_size)
    outputs, total, done = [], steps * len(batches), 0
    bar = tqdm(total=total, desc=f"sampling {len(seeds)}", unit="step", disable=not progress)

    def tick(i, x) -> None:
        nonlocal done
        bar.update(1)
        done += 1
        if on_step is not None:
            on_step(done, total)

    for first in batches:
        noise = PerSampleNoise(seeds[first:first + batch_size], device)
        stop = first + len(noise)
        x = noise.randn(shape, dtype) * prior_std           # x_T ~ N(0, I), VE-scaled if prior_std != 1
        if start is not None:
            x = x + start[first:stop].to(device, dtype)
        batch_rows = {name: value[first:stop].to(device) for name, value in (rows or {}).items()}
        outputs.append(sampler(denoiser, x, grid, noise, cond=None if cond is None else cond.rows(first, stop).to(device),
                               callback=tick, **batch_rows, **sampler_kwargs).cpu())
    bar.close()
    return torch.cat(outputs)
