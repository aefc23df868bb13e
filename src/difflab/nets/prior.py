"""unCLIP's prior networks (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP
Latents", Sec. 2.2): F(z_i noised, t, z_t) -> a prediction of the CLIP image embedding z_i (the diffusion
model's x0-prediction: the paper's prior is trained to "predict the unnoised z_i directly"), each
reading the caption's CLIP text embedding z_t from ``cond["text_embed"]`` (B, dim); no embedding is the null
one, zeros. Three networks of the same interface, to compare:

- ``PriorTransformer`` (model.kind ``prior_transformer``): the paper's (Sec. 2.2) sequence of tokens, in order,
  the CLIP text embedding, an embedding of the diffusion timestep, the noised CLIP image embedding and a final
  learned query, each projected to ``width`` (plus a learned position per token), through pre-LayerNorm
  transformer blocks; the query's output, projected back to ``dim``, is the prediction. The paper also puts
  the caption's encoder tokens first and uses a causal mask; here the four tokens attend to each other freely
  (with no tokens before them, a causal mask would only hide z_t, t and z_i from each other's outputs).
- ``PriorMLP`` (``prior_mlp``): the residual MLP of ``difflab.nets.mlp`` on [z_i noised, z_t], z_t also added
  to the timestep embedding that scales and shifts every block.
- ``RegressionPrior`` (``prior_regression``): a deterministic baseline, an MLP z_t -> z_i that ignores the
  noised input and the timestep. Trained with the same objective (x0-prediction, MSE on z_i at random t) its
  loss is exactly the regression MSE ||f(z_t) - z_i||^2, and every sampler returns f(z_t) (D = F for an
  x0-predicting VP model): does a generative prior beat the best deterministic map z_t -> z_i?

The networks know nothing of diffusion: ``t`` is whatever they are called with (the fractional timestep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from difflab.conditioning import TEXT_EMBED_FIELD
from difflab.nets.attention import TransformerBlock
from difflab.nets.mlp import MLPBlock
from difflab.nets.unet import timestep_embedding, zero_init


def text_embedding(cond: Mapping[str, torch.Tensor] | None, batch: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """``cond["text_embed"]`` (B, dim), or the null embedding (zeros) when there is none."""
    z_t = cond.get(TEXT_EMBED_FIELD) if cond is not None else None
    return torch.zeros(batch, dim, dtype=like.dtype, device=like.device) if z_t is None else z_t.to(like.dtype)


@dataclass
class PriorTransformerConfig:
    dim: int = 64                       # the CLIP embedding's width (set from the data)
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0


class PriorTransformer(nn.Module):
    """Tokens [z_t, emb(t), z_i noised, query] -> transformer -> the query's output -> (B, dim)."""

    consumes = (TEXT_EMBED_FIELD,)
    tokens = 4

    def __init__(self, config: PriorTransformerConfig):
        super().__init__()
        self.config = c = config
        self.text_in = nn.Linear(c.dim, c.width)
        self.time_embed = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.image_in = nn.Linear(c.dim, c.width)
        self.query = nn.Parameter(torch.randn(c.width) * 0.02)
        self.positions = nn.Parameter(torch.randn(self.tokens, c.width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(c.width, c.num_heads, c.mlp_ratio) for _ in range(c.depth))
        self.out_norm = nn.LayerNorm(c.width)
        self.out = zero_init(nn.Linear(c.width, c.dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        b, width = x.shape[0], self.config.width
        z_t = text_embedding(cond, b, self.config.dim, x)                                  # (B, dim)
        tokens = torch.stack([self.text_in(z_t), self.time_embed(timestep_embedding(t, width).to(x.dtype)),
                              self.image_in(x), self.query.expand(b, width)], dim=1)        # (B, 4, width)
        h = tokens + self.positions
        for block in self.blocks:
            h = block(h)
        return self.out(self.out_norm(h[:, -1]))                                            # (B, dim)


@dataclass
class PriorMLPConfig:
    dim: int = 64
    hidden: int = 512
    depth: int = 4


class PriorMLP(nn.Module):
    """``MLPBlock``s on Linear([z_i noised, z_t]), modulated by emb(t) + Linear(z_t)."""

    consumes = (TEXT_EMBED_FIELD,)

    def __init__(self, config: PriorMLPConfig):
        super().__init__()
        self.config = c = config
        self.time_embed = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))
        self.text_embed = nn.Linear(c.dim, c.hidden)
        self.inp = nn.Linear(2 * c.dim, c.hidden)
        self.blocks = nn.ModuleList(MLPBlock(c.hidden) for _ in range(c.depth))
        self.out = zero_init(nn.Linear(c.hidden, c.dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        z_t = text_embedding(cond, x.shape[0], self.config.dim, x)                        # (B, dim)
        emb = F.silu(self.time_embed(timestep_embedding(t, self.config.hidden).to(x.dtype)) + self.text_embed(z_t))
        h = self.inp(torch.cat([x, z_t], dim=1))                                          # (B, hidden)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(h))                                                        # (B, dim)


@dataclass
class RegressionPriorConfig:
    dim: int = 64
    hidden: int = 512
    depth: int = 3


class RegressionPrior(nn.Module):
    """f(z_t): an MLP of the text embedding alone; x and t are ignored (see the module docstring)."""

    consumes = (TEXT_EMBED_FIELD,)

    def __init__(self, config: RegressionPriorConfig):
        super().__init__()
        self.config = c = config
        layers, width = [], c.dim
        for _ in range(c.depth):
            layers += [nn.Linear(width, c.hidden), nn.SiLU()]
            width = c.hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, c.dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.mlp(text_embedding(cond, x.shape[0], self.config.dim, x))            # (B, dim)
