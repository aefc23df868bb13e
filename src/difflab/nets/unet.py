"""ADM-style U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 3 and Appendix).

Residual blocks take the timestep (and class) embedding through adaptive group normalisation,
GroupNorm(h) * (1 + scale) + shift; self-attention at chosen resolutions; the layers that end a residual
branch and the output layer start at zero, so an untrained network outputs zero and every block starts
as the identity. The network knows nothing of diffusion: it maps (x, t, cond) to an image-shaped tensor, reading the class
label from the condition record ``cond`` (a mapping of named tensors) when it is class-conditional.

With ``cross_attention`` the attention resolutions (and the middle block) use Rombach et al. 2022's ("LDM",
Sec. 3.3) ``SpatialTransformer`` instead of self-attention: the H*W positions attend to themselves and then to
a sequence of condition tokens, ``cond["context"]`` (B, L, context_dim) with the padding mask
``cond["context_mask"]`` (B, L, True for a real token), both optional. A class-conditional U-Net then also
turns its label into one learned token appended to that sequence, as LDM's class-conditional models do
(``ClassEmbedder``, a length-1 sequence): class embeddings now, text tokens later. The label's additive
embedding (ADM's) is kept as well, so the label reaches every residual block, not only the attention
resolutions.

Four switches of ADM's architecture (Dhariwal & Nichol 2021, Sec. 3 and Table 1; openai/guided-diffusion
``unet.py``), each off by default so that the default network is unchanged:

- ``resblock_updown``: BigGAN's residual blocks for up- and downsampling (Brock et al. 2019; ADM's ``ResBlock``
  with ``up``/``down``): between levels a residual block replaces the strided / upsampling convolution, and
  resamples both its branch (after the first GroupNorm-SiLU, before the first conv) and its skip, by 2x2 average
  pooling or nearest-neighbour upsampling.
- ``rescale_residual``: every residual block returns (skip + h) / sqrt(2), as BigGAN and NCSN++
  (``skip_rescale``, Song et al. 2021) do, so that it starts as skip / sqrt(2) rather than the identity; ADM
  tried it and did not keep it. (Attention blocks are not rescaled.)
- ``num_head_channels``: a fixed width per attention head, heads = channels / num_head_channels at each
  attention layer, instead of a fixed ``num_heads`` (ADM: 64 channels per head).
- ``embedding_silu``: each residual block applies SiLU to the embedding before projecting it to its scale and
  shift, as ADM's ``ResBlock`` does (``emb_layers = Sequential(SiLU(), linear(emb_channels, 2 * out_channels))``)
  and diffusers' ``ResnetBlock2D`` (``time_emb_proj(nonlinearity(temb))``); off, the projection reads the
  embedding as it is. The same parameters either way; a U-Net with it on can be exported to diffusers
  (``difflab.pipelines.diffusers_export``).

Super-resolution (Saharia et al. 2021, "SR3"; Ho et al. 2021, "Cascaded Diffusion Models"): with
``low_res_channels`` the network reads a low-resolution image ``cond["low_res"]`` (B, C, h, w), upsamples it
bilinearly to the image size and concatenates it to its input; with ``augmentation_embedding`` it also reads the
noise-conditioning augmentation level ``cond["aug_level"]`` (B,) in [0, 1] (absent: 0), whose own sinusoidal
embedding and MLP are added to the time embedding (CDM, Sec. 4.1).

Three switches of Imagen's Efficient U-Net (Saharia et al. 2022, App. B.1), each off by default:

- ``level_res_blocks``: residual blocks per level, e.g. (1, 2, 4), instead of ``num_res_blocks`` at every level
  (Imagen: more blocks at the low resolutions, where they are cheap, fewer at the high ones);
- ``scale_skips``: the skip connections are multiplied by 1/sqrt(2) where the decoder concatenates them;
- ``downsample_first``: every level of the encoder starts by downsampling (before its blocks) and every level of
  the decoder ends by upsampling (after its blocks), so no residual block runs at the full resolution and the
  input conv's output is not a skip connection (Imagen's DBlock / UBlock); the image size must be divisible by
  2^levels.

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

from difflab.nets.attention import TransformerBlock


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
    cross_attention: bool = False          # SpatialTransformer (LDM) at the attention resolutions, over tokens
    context_dim: int | None = None         # width of the tokens cond["context"]; None: 4 * model_channels
    transformer_depth: int = 1             # transformer blocks in each SpatialTransformer
    pooled_dim: int | None = None          # width of cond["pooled"] (a caption's pooled embedding), projected and
    #                                        added to the time embedding (GLIDE, Imagen); None: none
    # Dhariwal & Nichol 2021, Sec. 3 and Table 1; the value after "ADM:" is their final architecture's.
    resblock_updown: bool = False          # residual blocks do the up/downsampling (BigGAN). ADM: True
    rescale_residual: bool = False         # residual blocks return (skip + h) / sqrt(2). ADM: False (did not help)
    num_head_channels: int | None = None   # channels per attention head, overriding num_heads. ADM: 64
    embedding_silu: bool = False           # SiLU on the embedding before each block's scale-shift projection. ADM: True
    # Super-resolution stages of a cascade (SR3, CDM)
    low_res_channels: int = 0              # > 0: cond["low_res"] upsampled and concatenated to the input
    augmentation_embedding: bool = False   # cond["aug_level"] in [0, 1] embedded and added to the time embedding
    # Efficient U-Net (Saharia et al. 2022, App. B.1)
    level_res_blocks: tuple[int, ...] | None = None   # residual blocks per level, overriding num_res_blocks
    scale_skips: bool = False              # skip connections times 1/sqrt(2) where the decoder concatenates them
    downsample_first: bool = False         # each encoder level starts with its downsampling, each decoder level
    #                                        ends with its upsampling (no blocks at the full resolution)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Vaswani et al. 2017 / ADM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def class_labels(cond: Mapping[str, torch.Tensor] | None, num_classes: int, batch: int,
                 device: torch.device) -> torch.Tensor:
    """``cond["label"]`` (B,), or the null label ``num_classes`` for every row when there is none."""
    y = cond.get("label") if cond is not None else None
    return y if y is not None else torch.full((batch,), num_classes, dtype=torch.long, device=device)


# BigGAN / NCSN++ residual rescaling: (skip + h) / sqrt(2) keeps the sum's variance that of one branch.
RESIDUAL_RESCALE = 1 / math.sqrt(2)
AUG_LEVEL_SCALE = 1000.0     # the augmentation level in [0, 1] is embedded like a timestep in [0, 1000]


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class Resample(nn.Module):
    """The resampling inside a BigGAN residual block (ADM's ``Upsample`` / ``Downsample`` without a conv):
    nearest-neighbour 2x upsampling, or 2x2 average pooling."""

    def __init__(self, direction: str):
        super().__init__()
        if direction not in ("up", "down"):
            raise ValueError(f"resample direction {direction!r}: choose up or down")
        self.direction = direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.direction == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(x, kernel_size=2, stride=2)

    def extra_repr(self) -> str:
        return self.direction


class ResBlock(nn.Module):
    """GN-SiLU-conv, then adaptive GN (scale-shift from the embedding)-SiLU-dropout-conv(zero), plus skip.

    ``resample`` ("up" or "down"): a BigGAN block (ADM's ``ResBlock(up=True / down=True)``) that resamples h
    after the first GN-SiLU and the skip input alike. ``rescale``: the output is (skip + h) / sqrt(2).
    ``embedding_silu``: the scale and shift are projected from SiLU(emb), as in ADM, instead of from emb."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int,
                 resample: str | None = None, rescale: bool = False, embedding_silu: bool = False):
        super().__init__()
        self.resample = Resample(resample) if resample is not None else None
        self.rescale = rescale
        self.embedding_silu = embedding_silu
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # SiLU in place on the norm's fresh output: group-norm backward needs only its input.
        h = F.silu(self.norm1(x), inplace=True)                       # (B, in, H, W)
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)                 # (B, in, 2H, 2W) or (B, in, H/2, W/2)
        h = self.conv1(h)                                             # (B, out, H', W')
        scale, shift = self.emb(F.silu(emb) if self.embedding_silu else emb)[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)            # adaptive group norm
        h = self.conv2(self.dropout(F.silu(h, inplace=True)))
        h = h.add_(self.skip(x))                                      # in place: conv backward needs no output
        return h.mul_(RESIDUAL_RESCALE) if self.rescale else h


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


class SpatialTransformer(nn.Module):
    """Rombach et al. 2022 (LDM), Sec. 3.3, their ``SpatialTransformer``: GroupNorm, 1x1 conv in, the H*W
    positions as tokens through ``depth`` transformer blocks (self-attention, cross-attention to the condition
    tokens, feed-forward), 1x1 conv out, zero-initialised so that the block starts as the identity, plus x."""

    def __init__(self, channels: int, num_heads: int, context_dim: int, depth: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(channels, num_heads, context_dim=context_dim)
                                    for _ in range(depth))
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)              # (B, HW, C)
        for block in self.blocks:
            tokens = block(tokens, context, mask)
        return self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w)) + x


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
    """A sequence of blocks that all receive the embedding, except a ``SpatialTransformer``, which receives the
    condition tokens and their mask instead (as LDM's ``TimestepEmbedSequential``)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self:
            x = block(x, context, context_mask) if isinstance(block, SpatialTransformer) else block(x, emb)
        return x


class UNetEncoder(nn.Module):
    """The U-Net's down half: timestep (and label) embedding, input conv, down stages and middle block.

    Built once, here, for both the U-Net (which adds the decoder) and the noise-aware classifier of
    ``difflab.nets.noisy_classifier`` (which adds attention pooling, ADM's ``EncoderUNetModel``).
    Subclasses inherit its modules as attributes, so the U-Net's state_dict keys are those of one class.
    ``config.out_channels`` is not used here; ``config.num_classes`` adds a label embedding (and, with
    ``cross_attention``, a label token).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = self.encoder_config = c = config     # a subclass may replace ``config`` with its own
        self.gradient_checkpointing = False   # in training, recompute each stage's activations in backward
        ch = c.model_channels
        self.emb_dim = emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(c.num_classes + 1, emb_dim) if c.num_classes else None
        self.context_dim = c.context_dim if c.context_dim is not None else emb_dim
        self.label_token = (nn.Embedding(c.num_classes + 1, self.context_dim)
                            if c.cross_attention and c.num_classes else None)
        self.aug_embed = (nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                          if c.augmentation_embedding else None)
        self.pooled_embed = nn.Linear(c.pooled_dim, emb_dim) if c.pooled_dim else None
        self.input_conv = nn.Conv2d(c.in_channels + c.low_res_channels, ch, 3, padding=1)

        # res_blocks(level) stages per level, with a downsample between levels (or, with downsample_first, at
        # the start of every level); remember every output's channels for the skips.
        self.down = nn.ModuleList()
        self.skip_channels = [] if c.downsample_first else [ch]
        level_ch, resolution = ch, c.image_size
        for level, mult in enumerate(c.channel_mult):
            if c.downsample_first:
                self.down.append(Stage(self.downsample(level_ch)))
                self.skip_channels.append(level_ch)
                resolution //= 2
            for _ in range(self.res_blocks(level)):
                self.down.append(self.stage(level_ch, mult * ch, resolution))
                level_ch = mult * ch
                self.skip_channels.append(level_ch)
            if not c.downsample_first and level != len(c.channel_mult) - 1:
                self.down.append(Stage(self.downsample(level_ch)))
                self.skip_channels.append(level_ch)
                resolution //= 2
        self.encoder_channels, self.encoder_resolution = level_ch, resolution

        self.middle = Stage(self.res_block(level_ch, level_ch), self.attention(level_ch),
                            self.res_block(level_ch, level_ch))

    def res_blocks(self, level: int) -> int:
        """Residual blocks at ``level``: ``level_res_blocks[level]``, or ``num_res_blocks``."""
        c = self.encoder_config
        return c.level_res_blocks[level] if c.level_res_blocks is not None else c.num_res_blocks

    def res_block(self, in_ch: int, out_ch: int, resample: str | None = None) -> ResBlock:
        """A residual block with the config's dropout, groups, ``rescale_residual`` and ``embedding_silu``."""
        c = self.encoder_config
        return ResBlock(in_ch, out_ch, self.emb_dim, c.dropout, c.groups, resample, c.rescale_residual,
                        c.embedding_silu)

    def downsample(self, channels: int) -> nn.Module:
        """Between levels: a stride-2 conv, or with ``resblock_updown`` a downsampling residual block (BigGAN)."""
        if self.encoder_config.resblock_updown:
            return self.res_block(channels, channels, "down")
        return Downsample(channels)

    def upsample(self, channels: int) -> nn.Module:
        """Between levels: nearest 2x and a conv, or with ``resblock_updown`` an upsampling residual block."""
        if self.encoder_config.resblock_updown:
            return self.res_block(channels, channels, "up")
        return Upsample(channels)

    def stage(self, in_ch: int, out_ch: int, resolution: int) -> Stage:
        """A residual block, followed by attention when ``resolution`` is one of the attention ones."""
        blocks = [self.res_block(in_ch, out_ch)]
        if resolution in self.encoder_config.attention_resolutions:
            blocks.append(self.attention(out_ch))
        return Stage(*blocks)

    def heads(self, channels: int) -> int:
        """Attention heads at width ``channels``: channels / num_head_channels when that is set (ADM), else
        num_heads."""
        c = self.encoder_config
        if c.num_head_channels is None:
            return c.num_heads
        if channels % c.num_head_channels:
            raise ValueError(f"num_head_channels {c.num_head_channels} does not divide attention width {channels}")
        return channels // c.num_head_channels

    def attention(self, channels: int) -> nn.Module:
        """Self-attention (ADM), or with ``cross_attention`` a SpatialTransformer over the condition tokens."""
        c = self.encoder_config
        if c.cross_attention:
            return SpatialTransformer(channels, self.heads(channels), self.context_dim, c.transformer_depth, c.groups)
        return AttentionBlock(channels, self.heads(channels), c.groups)

    def embed(self, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None, batch: int,
              device: torch.device) -> torch.Tensor:
        """Timestep embedding, plus the class label's when class-conditional (no label: the null label), the
        augmentation level's (no level: 0) and a caption's pooled embedding's (none: nothing added)."""
        ch = self.encoder_config.model_channels
        emb = self.time_embed(timestep_embedding(t, ch))                               # (B, 4ch)
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels(cond, self.encoder_config.num_classes, batch, device))
        if self.aug_embed is not None:
            level = cond.get("aug_level") if cond is not None else None
            level = torch.zeros(batch, device=device) if level is None else level
            emb = emb + self.aug_embed(timestep_embedding(AUG_LEVEL_SCALE * level, ch))
        pooled = cond.get("pooled") if cond is not None and self.pooled_embed is not None else None
        if pooled is not None:                       # GLIDE: the text's last token; Imagen: its pooled embedding
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))
        return emb

    def with_low_res(self, x: torch.Tensor, cond: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """x with the upsampled low-resolution image concatenated (a super-resolution U-Net), else x."""
        if not self.encoder_config.low_res_channels:
            return x
        low = cond.get("low_res") if cond is not None else None
        if low is None:
            raise ValueError("a super-resolution U-Net needs its low-resolution image, cond['low_res']")
        up = F.interpolate(low.to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([x, up], dim=1)

    def condition_tokens(self, cond: Mapping[str, torch.Tensor] | None, batch: int, device: torch.device
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(context, mask) for the SpatialTransformers: ``cond["context"]`` (B, L, context_dim) and its mask
        ``cond["context_mask"]`` (B, L) (None: every token real), then the label token when class-conditional.
        (None, None) without cross-attention, or with no tokens at all."""
        if not self.encoder_config.cross_attention:
            return None, None
        context = cond.get("context") if cond is not None else None
        mask = cond.get("context_mask") if cond is not None and context is not None else None
        if self.label_token is not None:
            token = self.label_token(class_labels(cond, self.encoder_config.num_classes, batch, device))[:, None]
            context = token if context is None else torch.cat([context, token.to(context.dtype)], dim=1)
            if mask is not None:
                mask = torch.cat([mask.bool(), torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        return context, mask

    def encode(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None,
               tokens: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
               input_residual: torch.Tensor | None = None):
        """(h, emb, skips): the middle block's output (B, C, H/2^L, W/2^L), the embedding (B, 4ch) and the
        input conv's and every down stage's outputs (the U-Net's skip connections). ``tokens``: the
        ``condition_tokens`` when the caller has them already. ``input_residual`` (B, ch, H, W) is added to the
        input conv's output (a ControlNet's encoded hint, Zhang et al. 2023)."""
        emb = self.embed(t, cond, x.shape[0], x.device)
        if tokens is None:
            tokens = self.condition_tokens(cond, x.shape[0], x.device)
        h = self.input_conv(self.with_low_res(x, cond))                              # (B, ch, H, W)
        if input_residual is not None:
            h = h + input_residual
        skips = [] if self.encoder_config.downsample_first else [h]
        for stage in self.down:
            h = self.run_stage(stage, h, emb, tokens)
            skips.append(h)
        return self.run_stage(self.middle, h, emb, tokens), emb, skips

    def run_stage(self, stage: Stage, h: torch.Tensor, emb: torch.Tensor,
                  tokens: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
        """``stage(h, emb, *tokens)``; with gradient checkpointing its activations are recomputed in the backward
        pass instead of kept (Chen et al. 2016), with the same dropout masks (the RNG state is replayed)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, *tokens, use_reentrant=False)
        return stage(h, emb, *tokens)


class UNet(UNetEncoder):
    def __init__(self, config: UNetConfig):
        super().__init__(config)
        c = config
        ch, level_ch, resolution = c.model_channels, self.encoder_channels, self.encoder_resolution
        skip_channels = list(self.skip_channels)

        # Decoder: res_blocks(level) + 1 stages per level, each concatenating one skip; upsample between levels
        # (with downsample_first: at the end of every level).
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(self.res_blocks(level) + 1):
                blocks = self.stage(level_ch + skip_channels.pop(), mult * ch, resolution)
                level_ch = mult * ch
                if i == self.res_blocks(level) and (level != 0 or c.downsample_first):
                    blocks.append(self.upsample(level_ch))
                    resolution *= 2
                self.up.append(blocks)
        self.skip_scale = RESIDUAL_RESCALE if c.scale_skips else None

        self.out_norm = group_norm(level_ch, c.groups)
        self.out_conv = zero_init(nn.Conv2d(level_ch, c.out_channels or c.in_channels, 3, padding=1))

    @property
    def consumes(self) -> tuple[str, ...]:
        """The condition fields this network reads."""
        label = ("label",) if self.label_embed is not None else ()
        superres = (("low_res",) if self.config.low_res_channels else ()) + \
            (("aug_level",) if self.config.augmentation_embedding else ())
        pooled = ("pooled",) if self.config.pooled_dim else ()
        return label + superres + (("context", "context_mask") if self.config.cross_attention else ()) + pooled

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        tokens = self.condition_tokens(cond, x.shape[0], x.device)      # (B, L, context_dim), (B, L) or None
        h, emb, skips = self.encode(x, t, cond, tokens)                                # (B, C, H/2^L, W/2^L)
        return self.decode(h, emb, skips, tokens)

    def decode(self, h: torch.Tensor, emb: torch.Tensor, skips: list[torch.Tensor],
               tokens: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
        """The up half, from ``encode``'s outputs (a ControlNet adds its residuals to them first)."""
        skips = list(skips)
        for stage in self.up:
            skip = skips.pop()
            skip = skip * self.skip_scale if self.skip_scale is not None else skip
            h = self.run_stage(stage, torch.cat([h, skip], dim=1), emb, tokens)
        return self.out_conv(F.silu(self.out_norm(h)))                               # (B, out, H, W)
