"""Which noise levels a training batch uses: on a discrete schedule, uniform or importance-sampled timesteps
(Nichol & Dhariwal 2021, Sec. 3.3); for continuous-noise models (EDM), log-normal sigmas.

Importance sampling of L_vlb: p_t proportional to sqrt(E[L_t^2]), estimated from the last ``history``
losses seen at each t; uniform until every t has that many (the paper's "we keep a history of the previous
10 terms for each loss term, and update this dynamically during training ... until we draw 10 samples for
every t, we sample t uniformly"). A small uniform share (1e-3, as the paper's code) keeps every p_t > 0.
The loss of an example drawn with probability p_t is weighted by 1 / (T p_t), so the weighted loss is an
unbiased estimate of the uniform-t objective.

The history is part of the training state: it is saved in checkpoints so that resuming is exact.
"""

from __future__ import annotations

import torch

TIMESTEP_SAMPLERS = ("uniform", "importance")


class UniformTimesteps:
    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(timesteps, loss weights or None when every weight is 1)."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator), None

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


class ImportanceTimesteps(UniformTimesteps):
    def __init__(self, num_timesteps: int, history: int = 10, uniform_share: float = 1e-3):
        super().__init__(num_timesteps)
        self.uniform_share = uniform_share
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)   # a ring buffer per t
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)              # losses seen per t

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts >= self.losses.shape[1]).all())

    def probabilities(self) -> torch.Tensor:
        if not self.warmed_up:
            return super().probabilities()
        p = (self.losses ** 2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_share) + self.uniform_share / self.num_timesteps

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, (1.0 / (self.num_timesteps * p[t])).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the (unweighted) losses of examples at timesteps ``t``, oldest first out."""
        history = self.losses.shape[1]
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            self.losses[step, self.counts[step] % history] = loss
            self.counts[step] += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            self.losses.copy_(tensors["losses"])
            self.counts.copy_(tensors["counts"])


class LogNormalSigmas:
    """Karras et al. 2022, Sec. 5 and Table 1 (EDM training): ln(sigma) ~ N(p_mean, p_std^2)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2):
        self.p_mean, self.p_std = p_mean, p_std

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return (torch.randn(batch, generator=generator, dtype=torch.float64) * self.p_std + self.p_mean).exp()


def build_timestep_sampler(name: str, num_timesteps: int) -> UniformTimesteps:
    if name == "uniform":
        return UniformTimesteps(num_timesteps)
    if name == "importance":
        return ImportanceTimesteps(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}; choose one of {TIMESTEP_SAMPLERS}")
