"""Training losses as small callables returning per-element losses (reduce them in the trainer)."""

from __future__ import annotations

import torch

from difflab import diffusion
from difflab.denoiser import Denoiser


def simple_loss(denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
    """L_simple of Ho et al. 2020, Eq. 14: || target - net(x_t, t) ||^2 with x_t ~ q(x_t | x_0).

    The target is eps (the paper), x0, or v (Salimans & Ho 2022), by ``denoiser.prediction``.
    """
    xt = diffusion.q_sample(denoiser.schedule, x0, t, noise)
    output = denoiser.net(xt, t, y) if y is not None else denoiser.net(xt, t)
    return (output.float() - denoiser.target(x0, t, noise).float()) ** 2
