"""The compute of one forward pass of a network, in GFLOPs per image.

Counted by ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add of every matrix product and
convolution (normalisations, activations and additions are not counted). Attention runs on PyTorch's math
kernel while counting, so that its two products Q K^T and A V are seen as matrix products (the fused CPU
kernel is invisible to the counter). Peebles & Xie 2023 (DiT, Table 4) and fvcore count one FLOP per
multiply-add: their "Gflops" are half of these numbers (DiT-S/4 on 32x32x4 latents: 1.41 there, 2.8 here).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from difflab.nets.dit import DiT, DiTConfig


def network_gflops(net: nn.Module, sample_shape: tuple[int, ...],
                   cond: Mapping[str, torch.Tensor] | None = None) -> float:
    """GFLOPs of ``net(x, t, cond)`` on one sample of ``sample_shape`` (no condition: the null one)."""
    parameter = next(net.parameters())
    x = torch.zeros(1, *sample_shape, device=parameter.device, dtype=parameter.dtype)
    t = torch.zeros(1, device=parameter.device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, t, cond)
    return counter.get_total_flops() / 1e9


def dit_gflops(config: DiTConfig) -> float:
    """GFLOPs per image of the DiT ``config`` describes (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        net = DiT(config)
    return network_gflops(net, (config.in_channels, config.image_size, config.image_size))
