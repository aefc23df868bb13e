"""Consistency models: distillation (CD), training (CT) and improved training (iCT).

A consistency function f(x, sigma) maps every point of a probability-flow ODE trajectory to its origin
(Song et al. 2023, "Consistency Models"). It is a ``Denoiser`` with ``ConsistencyPrecond``, whose scalings
make f(x, sigma_min) = x exactly; the same preconditioning is used in training and in sampling (one
``Denoiser``), so the two cannot scale the input differently.

Training compares f at adjacent levels sigma_n < sigma_{n+1} of a Karras grid of N levels (Eq. 5 of Karras
et al. 2022, rho = 7): with x_{n+1} = x_0 + sigma_{n+1} z,

    loss = lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_n, sigma_n)),   theta- = stopgrad,

- CD (Alg. 2): x_n is one step of the teacher's probability-flow ODE from x_{n+1} (Heun, or Euler);
  theta- an EMA of theta with rate mu (``target_ema``), separate from the EMA kept for sampling;
- CT (Alg. 3): x_n = x_0 + sigma_n z, the same z (an unbiased estimator of the same target, Thm. 2); N and mu
  grow with the step k of K (App. C, Eq. 8): N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1,
  mu(k) = exp(s0 log(mu0) / N(k)), s0 = 2, s1 = 150, mu0 = 0.9;
- iCT (Song & Dhariwal 2023): CT with theta- = stopgrad(theta) (mu = 0, Sec. 3.2), the pseudo-Huber
  distance sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(d) (Sec. 3.3), N(k) = min(s0 2^floor(k/K'), s1)
  + 1 with K' = floor(K / (log2 floor(s1/s0) + 1)), s0 = 10, s1 = 1280 (Sec. 3.4, Eq. 9), n drawn with
  p(n) proportional to erf((ln sigma_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_n - P_mean) /
  (sqrt 2 P_std)), P_mean = -1.1, P_std = 2 (Sec. 3.5), and lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n)
  (Sec. 3.1).

The student and target passes see the same dropout masks (the random state is replayed between them).
K is ``train.steps``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from difflab.conditioning import Cond
from difflab.denoiser import ConsistencyPrecond, Denoiser, per_example
from difflab.errors import DifflabError
from difflab.samplers.sigmas import karras_sigmas
from difflab.train.batches import StepBatch
from difflab.train.objectives import dropped_conditions

METHODS = ("cd", "ct", "ict")
SOLVERS = ("heun", "euler")
DISTANCES = ("l2", "pseudo_huber")
PAPER_S0_S1 = {"cd": (None, None), "ct": (2, 150), "ict": (10, 1280)}


# -- the schedules ------------------------------------------------------------------------------------------
def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_1 < ... < sigma_n of Karras et al. 2022, Eq. 5 (float64)."""
    return karras_sigmas(n, sigma_min, sigma_max, rho)[:-1].flip(0)


def ct_levels(k: int, total: int, s0: int = 2, s1: int = 150) -> int:
    """Song et al. 2023, App. C: N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1."""
    return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1


def ct_target_ema(levels: int, s0: int = 2, mu0: float = 0.9) -> float:
    """Song et al. 2023, App. C: mu(k) = exp(s0 log(mu0) / N(k))."""
    return math.exp(s0 * math.log(mu0) / levels)


def ict_levels(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """Song & Dhariwal 2023, Eq. 9: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1))."""
    stage = max(1, math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // stage), s1) + 1


def ict_level_probabilities(levels: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Song & Dhariwal 2023, Sec. 3.5: p(sigma_n) for n < N, the log-normal's mass between sigma_n and
    sigma_{n+1}."""
    cdf = torch.erf((levels.log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Song & Dhariwal 2023, Sec. 3.3: sqrt(||a - b||^2 + c^2) - c per example."""
    return ((a - b).flatten(1).pow(2).sum(1) + c ** 2).sqrt() - c


# -- the teacher's ODE step (CD) ----------------------------------------------------------------------------
def ode_step(teacher: Denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             cond: Cond | None, solver: str) -> torch.Tensor:
    """One Euler or Heun step (Karras et al. 2022, Alg. 1) of dx/dsigma = (x - D(x; sigma)) / sigma, per
    example from sigma to sigma_next (both > 0)."""
    s, s_next = per_example(sigma, x), per_example(sigma_next, x)
    d = (x - teacher(x, sigma, cond)) / s
    x_euler = x + (s_next - s) * d
    if solver == "euler":
        return x_euler
    d_next = (x_euler - teacher(x_euler, sigma_next, cond)) / s_next
    return x + (s_next - s) * (d + d_next) / 2


class ReplayedRandomness:
    """Saves the random state, so that a second forward pass draws the same dropout masks as the first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class ConsistencyObjective:
    """CD, CT or iCT (``method``) of ``student``, a consistency-preconditioned denoiser."""

    current_levels = 0

    def __init__(self, student: Denoiser, method: str, total_steps: int, teacher: Denoiser | None = None,
                 solver: str = "heun", distance: str = "l2", levels: int = 18, target_ema: float = 0.95,
                 rho: float = 7.0, s0: int | None = None, s1: int | None = None, mu0: float = 0.9,
                 p_mean: float = -1.1, p_std: float = 2.0):
        if method not in METHODS:
            raise DifflabError(f"unknown distill.method {method!r}; choose progressive or one of {METHODS}")
        if not isinstance(student.precond, ConsistencyPrecond):
            raise DifflabError(f"distill.method {method!r} trains a consistency model: set diffusion.precond "
                               f"'consistency', not {student.precond.kind!r}")
        if method == "cd" and teacher is None:
            raise DifflabError("distill.teacher: consistency distillation needs a teacher")
        if solver not in SOLVERS:
            raise DifflabError(f"unknown distill.solver {solver!r}; choose one of {SOLVERS}")
        if distance not in DISTANCES:
            raise DifflabError(f"unknown distill.distance {distance!r}; choose one of {DISTANCES}")
        self.student, self.method, self.total_steps, self.teacher = student, method, total_steps, teacher
        self.solver, self.distance, self.levels, self.target_ema, self.rho = solver, distance, levels, target_ema, rho
        paper_s0, paper_s1 = PAPER_S0_S1[method]
        self.s0, self.s1 = s0 or paper_s0, s1 or paper_s1
        self.mu0, self.p_mean, self.p_std = mu0, p_mean, p_std
        self.trained = student.net
        self._training = student
        # theta-: an EMA of the student (CD, CT); iCT's is the student itself, without gradients
        self.target_net = None if method == "ict" else copy.deepcopy(student.net).requires_grad_(False)
        self.target = student.with_net(self.target_net) if self.target_net is not None else None

    # -- the step's levels ----------------------------------------------------------------------------------
    def num_levels(self, step: int) -> int:
        if self.method == "cd":
            return self.levels
        schedule = ct_levels if self.method == "ct" else ict_levels
        return schedule(step, self.total_steps, self.s0, self.s1)

    def grid(self, step: int) -> torch.Tensor:
        precond = self.student.precond
        return karras_levels(self.num_levels(step), precond.sigma_min, precond.sigma_max, self.rho)

    def draw(self, x0: torch.Tensor, cond: Cond | None, generator: torch.Generator, step: int = 0) -> StepBatch:
        levels = self.grid(step)
        self.current_levels = len(levels)                                         # logged with the loss
        if self.method == "ict":
            n = torch.multinomial(ict_level_probabilities(levels, self.p_mean, self.p_std), x0.shape[0],
                                  replacement=True, generator=generator)
        else:
            n = torch.randint(0, len(levels) - 1, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return StepBatch({"x0": x0, "noise": noise, "sigma": levels[n], "sigma_next": levels[n + 1]},
                         dropped_conditions(cond, self.student, generator))

    # -- the loss -------------------------------------------------------------------------------------------
    def loss(self, batch: StepBatch, forward: nn.Module) -> tuple[torch.Tensor, dict]:
        if self._training.net is not forward:
            self._training = self.student.with_net(forward)
        x0, sigma, sigma_next, cond = batch.x0, batch.sigma, batch.sigma_next, batch.cond
        x_next = x0 + per_example(sigma_next, x0) * batch.noise
        if self.target_net is not None:
            self.target_net.train(self.trained.training)                          # the same dropout
        randomness = ReplayedRandomness(x0.device)
        with torch.no_grad():
            if self.method == "cd":
                x = ode_step(self.teacher, x_next, sigma_next, sigma, cond, self.solver)
            else:
                x = x0 + per_example(sigma, x0) * batch.noise
            target_net = self.target if self.target is not None else self._training
            target = target_net(x, sigma, cond).float()
        randomness.replay()
        estimate = self._training(x_next, sigma_next, cond).float()
        if self.distance == "pseudo_huber":
            distance = pseudo_huber(estimate, target, 0.00054 * math.sqrt(x0[0].numel()))
        else:
            distance = (estimate - target).pow(2).flatten(1).mean(1)
        weight = 1 / (sigma_next - sigma) if self.method == "ict" else torch.ones_like(sigma)
        return weight.to(distance) * distance, {"levels": float(self.current_levels)}

    def after_step(self, step: int) -> None:
        """After step k (``step`` = k + 1 steps done): theta- <- mu theta- + (1 - mu) theta (CD: mu =
        target_ema; CT: mu(k))."""
        if self.target_net is None:
            return
        mu = self.target_ema if self.method == "cd" else ct_target_ema(self.num_levels(step - 1), self.s0, self.mu0)
        with torch.no_grad():
            for target, live in zip(self.target_net.parameters(), self.trained.parameters()):
                target.lerp_(live.detach(), 1 - mu)
            for target, live in zip(self.target_net.buffers(), self.trained.buffers()):
                target.copy_(live)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.target_net is None:
            return {}
        return {f"target.{k}": v for k, v in self.target_net.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.target_net is not None:
            state = {k.removeprefix("target."): v for k, v in tensors.items() if k.startswith("target.")}
            if state:
                self.target_net.load_state_dict(state)
