"""A mixture of isotropic Gaussians, whose every noised marginal is known exactly.

With x_0 ~ sum_k w_k N(mu_k, s_k^2 I) and x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, the marginal is
q(x_t) = sum_k w_k N(sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I), so the score, E[eps | x_t] and
E[x_0 | x_t] are available in closed form at every t of any schedule. Components double as classes,
with class posteriors p(k | x_t) known too.
"""

from __future__ import annotations

import math

from typing import Mapping

import torch
from torch import nn

from difflab.denoiser import t_to_sigma
from difflab.schedules import NoiseSchedule


class GaussianMixture:
    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)                 # (K, D)
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(len(self.means))   # (K,)
        weights = torch.ones(len(self.means)) if weights is None else torch.as_tensor(weights)
        self.weights = (weights / weights.sum()).double()

    @classmethod
    def ring(cls, k: int = 8, radius: float = 1.5, std: float = 0.15, dim: int = 2) -> "GaussianMixture":
        angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        means = torch.zeros(k, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * angles.cos(), radius * angles.sin()
        return cls(means, torch.full((k,), std))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[labels] + self.stds[labels, None] * torch.randn(n, self.dim, generator=generator,
                                                                       dtype=torch.float64)
        return (x, labels) if return_labels else x

    # -- the noised marginal q(x_t) for alpha-bar values ``abar`` (shape (N,) or scalar) -------------------
    def _components(self, x: torch.Tensor, abar: torch.Tensor):
        x = x.double()
        abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1)                 # (N or 1, 1)
        centres = abar.sqrt()[:, :, None] * self.means.T[None]                          # (N, D, K)
        variances = abar * self.stds[None] ** 2 + (1 - abar)                            # (N, K)
        diff = x[:, :, None] - centres                                                  # (N, D, K)
        log_norm = -0.5 * (diff ** 2).sum(1) / variances - 0.5 * self.dim * torch.log(2 * math.pi * variances)
        return diff, variances, log_norm + self.weights.log()                           # log w_k N_k(x)

    def log_prob(self, x: torch.Tensor, abar: torch.Tensor | float = 1.0) -> torch.Tensor:
        return torch.logsumexp(self._components(x, abar)[2], dim=1)

    def class_posterior(self, x: torch.Tensor, abar: torch.Tensor | float = 1.0) -> torch.Tensor:
        """p(k | x_t), shape (N, K)."""
        return torch.softmax(self._components(x, abar)[2], dim=1)

    def score(self, x: torch.Tensor, abar: torch.Tensor | float, label: torch.Tensor | None = None) -> torch.Tensor:
        """grad_x log q(x_t), or log q(x_t | k) when ``label`` is given."""
        diff, variances, log_joint = self._components(x, abar)
        if label is None:
            resp = torch.softmax(log_joint, dim=1)                                      # p(k | x_t)
        else:
            resp = nn.functional.one_hot(label, len(self.means)).double()
        return -(resp[:, None, :] * diff / variances[:, None, :]).sum(-1)

    def eps(self, x: torch.Tensor, abar: torch.Tensor | float, label: torch.Tensor | None = None) -> torch.Tensor:
        """E[eps | x_t] = -sqrt(1 - abar) * score."""
        abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1)
        return -(1 - abar).sqrt() * self.score(x, abar, label)


class ExactEpsNet(nn.Module):
    """The Bayes-optimal eps-prediction network for ``mixture`` on ``schedule``: net(x, t, cond=None).

    The record's ``label`` K is the null label (unconditional), as in the trained networks. Timesteps may be
    fractional: alpha-bar then comes from log-sigma interpolated between integer steps, the inverse of the
    sigma-space adapter's ``sigma_to_t``, so the adapter is exactly E[x_0 | x] at any sigma.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.num_classes = len(mixture.means)

    consumes = ("label",)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        y = cond.get("label") if cond is not None else None
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        sigma = t_to_sigma(self.schedule.sigmas.log(), t)
        abar = 1 / (1 + sigma ** 2)
        if y is None or bool((y == self.num_classes).all()):
            return self.mixture.eps(x, abar).to(x.dtype)
        conditional = self.mixture.eps(x, abar, y.clamp(max=self.num_classes - 1))
        unconditional = self.mixture.eps(x, abar)
        null = (y == self.num_classes)[:, None]
        return torch.where(null, unconditional, conditional).to(x.dtype)
