"""A residual MLP for low-dimensional data (the 2-D toy sets): the same (x, t, cond) interface as the U-Net."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nets.unet import timestep_embedding, zero_init


@dataclass
class MLPConfig:
    dim: int = 2
    hidden: int = 128
    depth: int = 3
    num_classes: int | None = None


class MLPBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.emb = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = zero_init(nn.Linear(2 * hidden, hidden))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb(emb).chunk(2, dim=-1)
        return h + self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = c = config
        self.time_embed = nn.Sequential(nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))
        self.label_embed = nn.Embedding(c.num_classes + 1, c.hidden) if c.num_classes else None
        self.inp = nn.Linear(c.dim, c.hidden)
        self.blocks = nn.ModuleList(MLPBlock(c.hidden) for _ in range(c.depth))
        self.out = zero_init(nn.Linear(c.hidden, c.dim))

    @property
    def consumes(self) -> tuple[str, ...]:
        return ("label",) if self.label_embed is not None else ()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        emb = F.silu(self.time_embed(timestep_embedding(t, self.config.hidden)))    # (B, hidden)
        if self.label_embed is not None:
            y = cond.get("label") if cond is not None else None
            if y is None:
                y = torch.full((x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(h))                                                   # (B, dim)
