"""Image editing with any trained model and its samplers (guidance included):

- ``image_to_image``: SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
  Differential Equations", Sec. 3): noise the input to an intermediate level, x = x0 + sigma_s n (q(x_s | x0)
  in VE scaling), and solve the reverse process from there. ``strength`` in [0, 1] is the fraction of the
  sampler's grid that is run (diffusers' img2img ``strength``): 0 returns the input unchanged; 1 starts at the
  grid's first level from the prior alone, SDEdit's t0 = T, where q(x_T | x0) is the prior (so it is plain
  sampling with the same seeds).
- ``inpaint``: RePaint (Lugmayr et al. 2022; ``difflab.samplers.sample_repaint``) on the model's grid: the
  known pixels (mask 1) are kept exactly, the rest is generated in harmony with them.

A latent model edits in its latent space: SDEdit starts from the posterior mean of the input's encoding and
decodes the result; inpainting is refused (the mask would have to be carried into the latent grid).
"""

from __future__ import annotations

import dataclasses

import torch

from difflab.conditioning import Cond
from difflab.config import SampleConfig
from difflab.errors import DifflabError
from difflab.pipelines.ddpm import LoadedModel, decode_latents, sampling_plan
from difflab.samplers import DISCRETE_SAMPLERS, generate, sample_repaint


def check_images(images: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(images.shape[1:]) != tuple(shape):
        raise DifflabError(f"{what}: shape {tuple(images.shape[1:])} does not match the model's samples {shape}")


def image_to_image(loaded: LoadedModel, images: torch.Tensor, strength: float, options: SampleConfig,
                   cond: Cond | None = None, device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """SDEdit of ``images`` (N, ...) in the data's range; image i seeded by ``options.seed + i``."""
    if not 0 <= strength <= 1:
        raise DifflabError(f"--strength {strength}: must lie in [0, 1]")
    if options.sampler in DISCRETE_SAMPLERS:
        raise DifflabError("image-to-image needs a sigma-space sampler (not ancestral; e.g. heun, ddim, dpmpp-2m)")
    check_images(images, loaded.spec.image_shape, "--init-image")
    plan = sampling_plan(loaded, options, cond, device)
    steps = round(strength * (len(plan.grid) - 1))
    if steps == 0:
        return images.clone()
    if loaded.latent is not None:                     # edit the posterior mean of the image's encoding
        images = torch.cat([loaded.latent.posterior(chunk)[0].cpu() for chunk in images.split(options.batch_size)])
    grid = plan.grid[-(steps + 1):]
    kwargs = dict(plan.kwargs)
    start = None
    if steps < len(plan.grid) - 1:                   # x_s = x0 + sigma_s n; at strength 1 the prior alone
        kwargs["prior_std"], start = grid[0].item(), images
    seeds = [options.seed + i for i in range(len(images))]
    out = generate(plan.sampler, plan.model, grid, loaded.spec.sample_shape, seeds, options.batch_size,
                   cond=cond, device=device, progress=progress, start=start, **kwargs)
    return decode_latents(loaded.latent, out, options.batch_size, device) if loaded.latent is not None else out


def inpaint(loaded: LoadedModel, images: torch.Tensor, mask: torch.Tensor, options: SampleConfig,
            resample: int = 5, cond: Cond | None = None, device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """RePaint of ``images`` where ``mask`` (N or 1, 1 or C, H, W; 1 = keep) is 0, on the grid of ``options``."""
    if loaded.spec.is_latent:
        raise DifflabError(f"--mask: inpainting a latent model ({loaded.path}) is not supported")
    check_images(images, loaded.spec.sample_shape, "--init-image")
    if options.sampler in DISCRETE_SAMPLERS:
        options = dataclasses.replace(options, sampler="ddim")
    plan = sampling_plan(loaded, options, cond, device)
    mask = (mask > 0.5).to(images.dtype).expand_as(images)
    kwargs = {k: v for k, v in plan.kwargs.items() if k == "prior_std"}
    seeds = [options.seed + i for i in range(len(images))]
    return generate(sample_repaint, plan.model, plan.grid, loaded.spec.sample_shape, seeds, options.batch_size,
                    cond=cond, device=device, progress=progress, rows={"known": images, "mask": mask},
                    resample=resample, **kwargs)
