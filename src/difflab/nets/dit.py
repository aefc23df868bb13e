"""DiT, a diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

Sec. 3.2: x (B, C, H, W) is cut into p x p patches, each embedded linearly (a convolution with kernel = stride =
p, "patchify") to T = (H / p)^2 tokens of width ``hidden_size``, plus a fixed 2-D sin-cos positional
embedding; ``depth`` blocks conditioned on the timestep and class embeddings; a final layer norm and a linear
decoding of each token to p * p * out_channels values, rearranged into the output image ("unpatchify").
The timestep t is embedded by sinusoids then an MLP, the label by a table of num_classes + 1 rows (the last,
index num_classes, the null label of classifier-free guidance).

How the conditions enter (Sec. 3.2, Fig. 3 and 5), ``DiTConfig.block``:

- ``adaln_zero``: adaptive layer norm, the scale gamma and shift beta of each LayerNorm regressed from
  c = time + label embedding, and a gate alpha scaling each residual branch; the regression layers start at
  zero, so every block starts as the identity, and the final layer starts at zero too (DiT's
  ``initialize_weights``). The paper's best design.
- ``adaln``: the same scale and shift, no gates, the regression layers initialised like every other.
- ``in_context``: the time and label embeddings are two extra tokens in the sequence (as ViT's cls token),
  standard ViT blocks, the two tokens removed before the final layer.
- ``cross_attention``: the two embeddings are a length-2 sequence that a cross-attention layer after the
  self-attention attends to (LDM's transformer block, ``difflab.nets.attention.TransformerBlock``).

Every design ends in the zero-initialised final linear layer, so an untrained DiT outputs zero (as the U-Net).
Sizes are data (``DIT_PRESETS``, Table 1, plus a CPU-sized "XS"): ``size`` picks one, and any of
``hidden_size``, ``depth`` and ``num_heads`` set explicitly overrides the preset's value. The network knows
nothing of diffusion: t is any real number (a fractional timestep, a scaled log-sigma), and a learned variance
is only ``out_channels = 2 * in_channels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nets.attention import FeedForward, MultiHeadAttention, TransformerBlock
from difflab.nets.unet import class_labels, timestep_embedding, zero_init

# Peebles & Xie 2023, Table 1 (their head width is 64 throughout); "XS" is difflab's, for CPU runs.
DIT_PRESETS: dict[str, dict[str, int]] = {
    "XS": dict(hidden_size=192, depth=6, num_heads=3),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
DIT_BLOCKS = ("adaln_zero", "adaln", "in_context", "cross_attention")
TIME_FREQUENCIES = 256          # sinusoids fed to the timestep MLP (DiT's ``frequency_embedding_size``)


@dataclass
class DiTConfig:
    in_channels: int = 4
    out_channels: int | None = None        # defaults to in_channels (twice that for a learned variance)
    image_size: int = 32                   # H = W of the input (set from the data)
    patch_size: int = 2                    # p: T = (image_size / p)^2 tokens
    size: str | None = "S"                 # a DIT_PRESETS name giving hidden_size, depth and num_heads
    hidden_size: int | None = None         # set explicitly: overrides the preset's
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0                 # feed-forward width / hidden_size
    num_classes: int | None = None         # class-conditional when set; label num_classes is the null label
    block: str = "adaln_zero"              # adaln_zero | adaln | in_context | cross_attention (Sec. 3.2)


def dit_sizes(config: DiTConfig) -> dict[str, int]:
    """hidden_size, depth and num_heads: the preset ``size``'s, overridden by the fields set explicitly."""
    if config.size is not None and config.size not in DIT_PRESETS:
        raise ValueError(f"unknown DiT size {config.size!r}; choose one of {', '.join(DIT_PRESETS)}")
    sizes = dict(DIT_PRESETS[config.size]) if config.size is not None else {}
    sizes.update({name: getattr(config, name) for name in ("hidden_size", "depth", "num_heads")
                  if getattr(config, name) is not None})
    missing = sorted({"hidden_size", "depth", "num_heads"} - set(sizes))
    if missing:
        raise ValueError(f"no size preset and no {', '.join(missing)}")
    return sizes


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid^2, dim) fixed positional embedding of a grid x grid token grid, row-major (as facebookresearch/DiT
    ``get_2d_sincos_pos_embed``, from MAE): Vaswani et al. 2017's sinusoids (Sec. 3.5) per axis, token (row i,
    column j) = [sin(j w_k), cos(j w_k), sin(i w_k), cos(i w_k)] with w_k = 10000^(-k / (dim / 4)), k < dim / 4."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)     # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def axis(position: torch.Tensor) -> torch.Tensor:
        angles = position.reshape(-1, 1) * omega                                     # (grid^2, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()                        # (grid^2, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive layer norm's affine step on normalised tokens (B, T, D) with (B, D) shift and scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNBlock(nn.Module):
    """x + alpha1 Attn(modulate(LN x, beta1, gamma1)), then x + alpha2 FF(modulate(LN x, beta2, gamma2)), with
    (beta, gamma, alpha) = Linear(SiLU(c)) (Sec. 3.2, "adaLN" and, ``gated``, "adaLN-Zero"; alpha = 1 when
    not gated). The LayerNorms have no parameters of their own."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, gated: bool):
        super().__init__()
        self.gated = gated
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mlp_ratio)
        self.modulation = nn.Linear(dim, (6 if gated else 4) * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.gated:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=1)  # (B, D)
            gate1, gate2 = gate1[:, None], gate2[:, None]
        else:
            shift1, scale1, shift2, scale2 = self.modulation(F.silu(c)).chunk(4, dim=1)
            gate1 = gate2 = 1.0
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))                  # (B, T, D)
        return x + gate2 * self.ff(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """LayerNorm (adaptive, scale and shift from c, for the adaLN designs), then a linear map of each token to
    its patch's p * p * out_channels values."""

    def __init__(self, dim: int, patch_values: int, adaptive: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=not adaptive, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim) if adaptive else None
        self.linear = nn.Linear(dim, patch_values)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.modulation is not None:
            shift, scale = self.modulation(F.silu(c)).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.linear(x)                                                            # (B, T, p*p*out)


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        if c.block not in DIT_BLOCKS:
            raise ValueError(f"unknown DiT block {c.block!r}; choose one of {DIT_BLOCKS}")
        sizes = dit_sizes(c)
        dim, p = sizes["hidden_size"], c.patch_size
        self.out_channels = c.out_channels or c.in_channels
        self.grid = c.image_size // p
        self.patch_embed = nn.Conv2d(c.in_channels, dim, p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid), persistent=False)   # (T, D)
        self.time_embed = nn.Sequential(nn.Linear(TIME_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.label_embed = nn.Embedding(c.num_classes + 1, dim) if c.num_classes else None
        self.blocks = nn.ModuleList(self.block(dim, sizes["num_heads"]) for _ in range(sizes["depth"]))
        self.final = FinalLayer(dim, p * p * self.out_channels, adaptive=c.block in ("adaln_zero", "adaln"))
        self.initialize_weights()

    def block(self, dim: int, num_heads: int) -> nn.Module:
        c = self.config
        if c.block in ("adaln_zero", "adaln"):
            return AdaLNBlock(dim, num_heads, c.mlp_ratio, gated=c.block == "adaln_zero")
        if c.block == "cross_attention":
            return TransformerBlock(dim, num_heads, c.mlp_ratio, context_dim=dim)
        return TransformerBlock(dim, num_heads, c.mlp_ratio)                                # in_context: ViT

    def initialize_weights(self) -> None:
        """As facebookresearch/DiT ``initialize_weights``: Xavier-uniform linear layers (the patch embedding
        too, as a linear map of the flattened patch) with zero biases, N(0, 0.02) label table and timestep MLP;
        then zero for the adaLN-Zero regressions and for the final linear layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        if self.config.block == "adaln_zero":
            for block in self.blocks:
                zero_init(block.modulation)
            zero_init(self.final.modulation)
        zero_init(self.final.linear)

    @property
    def consumes(self) -> tuple[str, ...]:
        """The condition fields this network reads."""
        return ("label",) if self.label_embed is not None else ()

    def embeddings(self, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None, batch: int,
                   device: torch.device) -> torch.Tensor:
        """(B, K, D): the timestep's embedding and, when class-conditional, the label's (K = 2; else K = 1)."""
        emb = [self.time_embed(timestep_embedding(t, TIME_FREQUENCIES))]
        if self.label_embed is not None:
            emb.append(self.label_embed(class_labels(cond, self.config.num_classes, batch, device)))
        return torch.stack(emb, dim=1)

    def run_blocks(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The ``depth`` blocks on the patch tokens h (B, T, D), the conditions entering as ``config.block``
        says (Sec. 3.2)."""
        if self.config.block == "in_context":
            h = torch.cat([emb, h], dim=1)                                                # (B, K + T, D)
            for block in self.blocks:
                h = block(h)
            return h[:, emb.shape[1]:]
        if self.config.block == "cross_attention":
            for block in self.blocks:
                h = block(h, emb)                                                         # attends to (B, K, D)
            return h
        c = emb.sum(dim=1)                                                                # (B, D): t + y
        for block in self.blocks:
            h = block(h, c)
        return h

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, p * p * out) to (B, out, H, W): token (i, j)'s values fill the patch at row i, column j."""
        b, g, p, out = h.shape[0], self.grid, self.config.patch_size, self.out_channels
        h = h.reshape(b, g, g, p, p, out).permute(0, 5, 1, 3, 2, 4)                       # (B, out, g, p, g, p)
        return h.reshape(b, out, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if x.shape[-2:] != (self.config.image_size, self.config.image_size):
            raise ValueError(f"DiT built for {self.config.image_size}x{self.config.image_size} inputs, got "
                             f"{tuple(x.shape[-2:])}")
        emb = self.embeddings(t, cond, x.shape[0], x.device)                                # (B, K, D)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)     # (B, T, D)
        h = self.run_blocks(h, emb)                                                         # (B, T, D)
        return self.unpatchify(self.final(h, emb.sum(dim=1)))                               # (B, out, H, W)
