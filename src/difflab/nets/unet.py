"""ADM-style U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 3 and Appendix).

Residual blocks take the timestep (and class) embedding through adaptive group normalisation,
GroupNorm(h) * (1 + scale) + shift; self-attention at chosen resolutions; the layers that end a residual
branch and the output layer start at zero, so an untrained network outputs zero and every block starts
as the identity. The network knows nothing of diffusion: it maps (x, t, cond) to an image-shaped tensor, reading the class
label from the condition record ``cond`` (a mapping of named tensors) when it is class-conditional.

``UNetEncoder`` is the down half (embedding, input conv, down stages, middle block); ``UNet`` adds the
decoder to it, and the noise-aware classifier of ``difflab.nets.noisy_classifier`` an attention pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 1
    out_channels: int | None = None        # defaults to in_channels (twice that for a learned variance)
    image_size: int = 32
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int | None = None         # class-conditional when set; label num_classes is the null label
    groups: int = 32


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Vaswani et al. 2017 / ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """GN-SiLU-conv, then adaptive GN (scale-shift from the embedding)-SiLU-dropout-conv(zero), plus skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # SiLU in place on the norm's fresh output: group-norm backward needs only its input.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))           # (B, out, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)            # adaptive group norm
        h = self.conv2(self.dropout(F.silu(h, inplace=True)))
        return h.add_(self.skip(x))                                   # in place: conv backward needs no output


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)        # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return self.proj(out).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Sequential):
    """A sequence of blocks that all receive the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x, emb)
        return x


class UNetEncoder(nn.Module):
    """The U-Net's down half: timestep (and label) embedding, input conv, down stages and middle block.

    Built once, here, for both the U-Net (which adds the decoder) and the noise-aware classifier of
    ``difflab.nets.noisy_classifier`` (which adds attention pooling, ADM's ``EncoderUNetModel``).
    Subclasses inherit its modules as attributes, so the U-Net's state_dict keys are those of one class.
    ``config.out_channels`` is not used here; ``config.num_classes`` adds a label embedding.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = self.encoder_config = c = config     # a subclass may replace ``config`` with its own
        self.gradient_checkpointing = False   # in training, recompute each stage's activations in backward
        ch = c.model_channels
        self.emb_dim = emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None
        self.input_conv = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        # num_res_blocks stages per level, then a downsample; remember every output's channels for the skips.
        self.down = nn.ModuleList()
        self.skip_channels = [ch]
        level_ch, resolution = ch, c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(self.stage(level_ch, mult * ch, resolution))
                level_ch = mult * ch
                self.skip_channels.append(level_ch)
            if level != len(c.channel_mult) - 1:
                self.down.append(Stage(Downsample(level_ch)))
                self.skip_channels.append(level_ch)
                resolution //= 2
        self.encoder_channels, self.encoder_resolution = level_ch, resolution

        self.middle = Stage(ResBlock(level_ch, level_ch, emb_dim, c.dropout, c.groups),
                            AttentionBlock(level_ch, c.num_heads, c.groups),
                            ResBlock(level_ch, level_ch, emb_dim, c.dropout, c.groups))

    def stage(self, in_ch: int, out_ch: int, resolution: int) -> Stage:
        """A residual block, followed by self-attention when ``resolution`` is one of the attention ones."""
        c = self.encoder_config
        blocks = [ResBlock(in_ch, out_ch, self.emb_dim, c.dropout, c.groups)]
        if resolution in c.attention_resolutions:
            blocks.append(AttentionBlock(out_ch, c.num_heads, c.groups))
        return Stage(*blocks)

    def embed(self, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None, batch: int,
              device: torch.device) -> torch.Tensor:
        """Timestep embedding, plus the class label's when class-conditional (no label: the null label)."""
        emb = self.time_embed(timestep_embedding(t, self.encoder_config.model_channels))   # (B, 4ch)
        if self.label_embed is not None:
            y = cond.get("label") if cond is not None else None
            if y is None:
                y = torch.full((batch,), self.encoder_config.num_classes, dtype=torch.long, device=device)
            emb = emb + self.label_embed(y)
        return emb

    def encode(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None):
        """(h, emb, skips): the middle block's output (B, C, H/2^L, W/2^L), the embedding (B, 4ch) and the
        input conv's and every down stage's outputs (the U-Net's skip connections)."""
        emb = self.embed(t, cond, x.shape[0], x.device)
        h = self.input_conv(x)                                                       # (B, ch, H, W)
        skips = [h]
        for stage in self.down:
            h = self.run_stage(stage, h, emb)
            skips.append(h)
        return self.run_stage(self.middle, h, emb), emb, skips

    def run_stage(self, stage: Stage, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``stage(h, emb)``; with gradient checkpointing its activations are recomputed in the backward
        pass instead of kept (Chen et al. 2016), with the same dropout masks (the RNG state is replayed)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, use_reentrant=False)
        return stage(h, emb)


class UNet(UNetEncoder):
    def __init__(self, config: UNetConfig):
        super().__init__(config)
        c = config
        ch, level_ch, resolution = c.model_channels, self.encoder_channels, self.encoder_resolution
        skip_channels = list(self.skip_channels)

        # Decoder: num_res_blocks + 1 stages per level, each concatenating one skip; upsample between levels.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                blocks = self.stage(level_ch + skip_channels.pop(), mult * ch, resolution)
                level_ch = mult * ch
                if level != 0 and i == c.num_res_blocks:
                    blocks.append(Upsample(level_ch))
                    resolution *= 2
                self.up.append(blocks)

        self.out_norm = group_norm(level_ch, c.groups)
        self.out_conv = zero_init(nn.Conv2d(level_ch, c.out_channels or c.in_channels, 3, padding=1))

    @property
    def consumes(self) -> tuple[str, ...]:
        """The condition fields this network reads."""
        return ("label",) if self.label_embed is not None else ()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        h, emb, skips = self.encode(x, t, cond)                                        # (B, C, H/2^L, W/2^L)
        for stage in self.up:
            h = self.run_stage(stage, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))                               # (B, out, H, W)
