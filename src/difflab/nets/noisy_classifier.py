"""Noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1).

"The downsampling trunk of the UNet model with an attention pool at the 8x8 layer to produce the final
output" (ADM's ``EncoderUNetModel`` with ``pool="attention"``): the U-Net's encoder
(``difflab.nets.unet.UNetEncoder``, shared with the U-Net), then GroupNorm-SiLU and an attention pool
(``AttentionPool2d``, as in CLIP's ResNets, Radford et al. 2021): the mean of the H*W positions, with a
learned positional embedding, queries all of them, and its attention output is projected to the logits.

The network knows nothing of diffusion: ``t`` is whatever the diffusion model is called with (integer or
real timesteps of its schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nets.unet import UNetConfig, UNetEncoder, group_norm


@dataclass
class NoisyClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    dropout: float = 0.0
    groups: int = 32
    num_classes: int = 10                  # the classes it predicts (it takes no label as input)

    def unet_config(self) -> UNetConfig:
        """The U-Net encoder it is built on: the same fields, and no label embedding."""
        return UNetConfig(in_channels=self.in_channels, image_size=self.image_size,
                          model_channels=self.model_channels, channel_mult=tuple(self.channel_mult),
                          num_res_blocks=self.num_res_blocks, attention_resolutions=tuple(self.attention_resolutions),
                          num_heads=self.num_heads, dropout=self.dropout, num_classes=None, groups=self.groups)


def encoder_side(image_size: int, levels: int) -> int:
    """Spatial size after ``levels - 1`` stride-2 convolutions (padding 1, so each rounds up)."""
    for _ in range(levels - 1):
        image_size = (image_size + 1) // 2
    return image_size


class AttentionPool2d(nn.Module):
    """Attention pooling (Radford et al. 2021, CLIP; ADM's ``AttentionPool2d``): a mean token is prepended
    to the H*W positions, a positional embedding added, and the mean token's multi-head attention output
    over all H*W + 1 tokens is projected to ``out_dim``. Only the mean token's query is computed: the
    other positions' outputs are discarded in ADM too."""

    def __init__(self, side: int, channels: int, num_heads: int, out_dim: int):
        super().__init__()
        self.side, self.num_heads = side, num_heads
        self.positional_embedding = nn.Parameter(torch.randn(channels, side * side + 1) / channels ** 0.5)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if (h, w) != (self.side, self.side):
            raise ValueError(f"attention pool built for {self.side}x{self.side} features, got {h}x{w}")
        x = x.reshape(b, c, h * w)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)  # (B, C, N)
        qkv = self.qkv(x).reshape(b, 3, self.num_heads, c // self.num_heads, h * w + 1)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                    # each (B, heads, N, C/heads)
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)      # (B, heads, 1, C/heads): the mean token
        return self.proj(out.transpose(-1, -2).reshape(b, c, 1))[:, :, 0]   # (B, out_dim)


class NoisyClassifier(UNetEncoder):
    """logits = classifier(x_t, t): (B, C, H, W) and (B,) timesteps, integer or real, to (B, num_classes)."""

    def __init__(self, config: NoisyClassifierConfig):
        super().__init__(config.unet_config())
        self.config = config
        channels = self.encoder_channels
        side = encoder_side(config.image_size, len(config.channel_mult))
        self.out_norm = group_norm(channels, config.groups)
        self.pool = AttentionPool2d(side, channels, config.num_heads, config.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        h, _, _ = self.encode(x, t)                                   # (B, C, H/2^L, W/2^L)
        return self.pool(F.silu(self.out_norm(h)))                    # (B, num_classes)
