"""2-D toy data sets for fast tests: swiss roll, 8 Gaussians, two moons, checkerboard.

Each is scaled to roughly unit standard deviation and drawn from a seeded generator.
"""

from __future__ import annotations

import math

import torch

from difflab.data.base import InMemoryData
from difflab.errors import DifflabError


def swiss_roll(n: int, g: torch.Generator) -> torch.Tensor:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 7.0
    return x + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    angles = torch.randint(0, 8, (n,), generator=g).double() * (2 * math.pi / 8)
    centres = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * 1.4
    return centres + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def two_moons(n: int, g: torch.Generator) -> torch.Tensor:
    upper = torch.rand(n, generator=g) < 0.5
    angle = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.2
    return points + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    x = 4 * torch.rand(n, generator=g, dtype=torch.float64) - 2
    row = torch.randint(0, 2, (n,), generator=g).double()
    y = torch.rand(n, generator=g, dtype=torch.float64) - 2 * row + (x.floor() % 2)   # as in FFJORD's toy set
    return torch.stack([x, y], dim=1) * 0.85


TOY_SETS = {"swiss_roll": swiss_roll, "eight_gaussians": eight_gaussians,
            "two_moons": two_moons, "checkerboard": checkerboard}


def load_toy(name: str, n: int = 10000, seed: int = 0) -> InMemoryData:
    if name not in TOY_SETS:
        raise DifflabError(f"unknown toy data set {name!r}; choose one of {sorted(TOY_SETS)}")
    g = torch.Generator().manual_seed(seed)
    return InMemoryData(TOY_SETS[name](n, g).float(), name=f"toy/{name}")
