"""Training objectives: what a step optimises, apart from how the loop runs it (``trainer.py``).

An objective owns the module it trains (``trained``: the optimiser and the EMA follow it, DDP wraps it), the
randomness of a step (``draw``: from the step's generator, for the whole global batch, so every rank and a
resumed run draw the same), and the loss (``loss``: one value per example, computed with the forward module
the loop hands it: the trained one, wrapped for DDP or compiled). State that must survive a resume (the
importance sampler's history) is in ``state_tensors``.

- ``DiffusionObjective``: a denoiser's loss (``difflab.losses``) at sampled noise levels: uniform or
  importance-sampled timesteps of a VP schedule, or EDM's log-normal sigmas; condition dropout as each
  condition field describes it (Ho & Salimans 2021).
- ``SlicedScoreObjective``: the same noise levels, noise and dropout, plus each example's random projections
  for sliced score matching (``losses.sliced_loss``; Song et al. 2019), drawn from the step's generator too.
- ``NoisyClassifierObjective``: cross-entropy of a noise-aware classifier p(y | x_t, t) on x_t ~ q(x_t | x_0)
  with uniform t on the schedule of the model it will guide (Dhariwal & Nichol 2021, Sec. 4.1).
- ``NoisyCLIPObjective``: CLIP's contrastive loss (``losses.contrastive_loss``) of a noise-aware CLIP on the
  same x_t (GLIDE, Nichol et al. 2022, Sec. 2.4), some rows clean so that it is also a clean-image CLIP.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from difflab import diffusion
from difflab.conditioning import Cond, drop_conditions
from difflab.denoiser import Denoiser, VPPrecond
from difflab.losses import PROJECTIONS, contrastive_loss, projection_vectors, same_caption, sliced_loss
from difflab.schedules import NoiseSchedule
from difflab.train.batches import StepBatch
from difflab.train.timesteps import LogNormalSigmas, UniformTimesteps


class Objective(Protocol):
    trained: nn.Module

    def draw(self, x0: torch.Tensor, cond: Cond | None, generator: torch.Generator, step: int) -> StepBatch: ...

    def loss(self, batch: StepBatch, forward: nn.Module) -> torch.Tensor | tuple[torch.Tensor, dict]: ...


class DiffusionObjective:
    """``loss_fn(denoiser, x0, noise, sigma, cond, t)`` at noise levels from ``levels``."""

    def __init__(self, denoiser: Denoiser, loss_fn: Callable, levels: UniformTimesteps | LogNormalSigmas):
        self.denoiser, self.loss_fn, self.levels = denoiser, loss_fn, levels
        self.trained = denoiser.net
        self._training = denoiser                    # the denoiser around the loop's forward module

    def draw(self, x0: torch.Tensor, cond: Cond | None, generator: torch.Generator, step: int = 0) -> StepBatch:
        """Noise levels, then noise, then condition dropout, all from ``generator``."""
        t = weights = None
        if isinstance(self.levels, LogNormalSigmas):
            sigma = self.levels.sample(x0.shape[0], generator)
        else:
            t, weights = self.levels.sample(x0.shape[0], generator)
            sigma = self.denoiser.precond.schedule.sigmas[t]
        noise = torch.randn(x0.shape, generator=generator)
        cond = dropped_conditions(cond, self.denoiser, generator)
        return StepBatch({"x0": x0, "noise": noise, "sigma": sigma, "t": t, "weights": weights}, cond)

    def training_denoiser(self, forward: nn.Module) -> Denoiser:
        """The denoiser around the loop's forward module (made once, again only when that module changes)."""
        if self._training.net is not forward:
            self._training = self.denoiser.with_net(forward)
        return self._training

    def loss(self, batch: StepBatch, forward: nn.Module) -> torch.Tensor:
        return self.loss_fn(self.training_denoiser(forward), batch.x0, batch.noise, batch.sigma, batch.cond, batch.t)

    def observe(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """The examples' unweighted losses at their timesteps (the importance sampler's history)."""
        if isinstance(self.levels, UniformTimesteps):
            self.levels.update(t, losses)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if isinstance(self.levels, UniformTimesteps):
            return {f"timesteps.{k}": v for k, v in self.levels.state_tensors().items()}
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if isinstance(self.levels, UniformTimesteps):
            self.levels.load_state_tensors({k.removeprefix("timesteps."): v for k, v in tensors.items()})


class SlicedScoreObjective(DiffusionObjective):
    """``losses.sliced_loss`` at the noise levels of ``levels``, with ``projections`` random vectors per example
    from ``distribution`` (rademacher | gaussian), drawn after the noise and dropout (batch first: (B, M, ...))."""

    def __init__(self, denoiser: Denoiser, levels: UniformTimesteps | LogNormalSigmas, projections: int = 1,
                 distribution: str = "rademacher"):
        if distribution not in PROJECTIONS or projections < 1:
            raise ValueError(f"sliced score matching needs projections >= 1 from one of {PROJECTIONS}, got "
                             f"{projections} from {distribution!r}")
        super().__init__(denoiser, sliced_loss, levels)
        self.projections, self.distribution = projections, distribution

    def draw(self, x0: torch.Tensor, cond: Cond | None, generator: torch.Generator, step: int = 0) -> StepBatch:
        batch = super().draw(x0, cond, generator, step)
        shape = (x0.shape[0], self.projections, *x0.shape[1:])
        return StepBatch({**batch.tensors, "projections": projection_vectors(shape, self.distribution, generator)},
                         batch.cond)

    def loss(self, batch: StepBatch, forward: nn.Module) -> torch.Tensor:
        return self.loss_fn(self.training_denoiser(forward), batch.x0, batch.noise, batch.sigma, batch.cond, batch.t,
                            batch.projections)


class DerivedConditions:
    """An objective whose condition record also holds fields made from each step's examples: ``derive(x0,
    generator)`` returns them (a ControlNet's control images, a super-resolution stage's augmented low-resolution
    images and their levels), drawing from the step's generator before the inner objective does, so resume stays
    exact."""

    def __init__(self, inner, derive: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]):
        self.inner, self.derive = inner, derive
        self.trained = inner.trained

    def draw(self, x0: torch.Tensor, cond: Cond | None, generator: torch.Generator, step: int = 0) -> StepBatch:
        fields = self.derive(x0, generator)
        cond = cond.replace(**fields) if cond is not None else Cond(fields)
        return self.inner.draw(x0, cond, generator, step)

    def __getattr__(self, name: str):          # loss, observe, state tensors: the inner objective's
        if name in ("inner", "derive", "trained"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def superres_fields(low_res: int, augmentation: str, max_level: float, max_blur: float):
    """``derive`` for a super-resolution stage (Ho et al. 2021, Sec. 4.1): the examples downsampled to
    ``low_res``, augmented at levels uniform in [0, max_level] (the level passed on as a condition)."""
    from difflab.conditioning import AUG_LEVEL_FIELD, LOW_RES_FIELD
    from difflab.superres import augment, downsample

    def derive(x0: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        low = downsample(x0, low_res)
        if augmentation == "none":
            return {LOW_RES_FIELD: low}
        level = torch.rand(x0.shape[0], generator=generator) * max_level
        noise = torch.randn(low.shape, generator=generator) if augmentation == "gaussian" else None
        return {LOW_RES_FIELD: augment(low, augmentation, level, noise, max_blur), AUG_LEVEL_FIELD: level}
    return derive


def dropped_conditions(cond: Cond | None, denoiser: Denoiser, generator: torch.Generator) -> Cond | None:
    """The fields of ``cond`` that ``denoiser`` consumes, each dropped to its null value as its condition
    describes (Ho & Salimans 2021); None when there are none."""
    if cond is None:
        return None
    cond = Cond({k: v for k, v in cond.items() if k in denoiser.conditions})
    return drop_conditions(cond, denoiser.conditions, generator) if len(cond) else None


def diffusion_levels(denoiser: Denoiser, timestep_sampling: str, p_mean: float, p_std: float):
    from difflab.train.timesteps import build_timestep_sampler

    if isinstance(denoiser.precond, VPPrecond):
        return build_timestep_sampler(timestep_sampling, len(denoiser.precond.schedule))
    return LogNormalSigmas(p_mean, p_std)


class NoisyClassifierObjective:
    """Cross-entropy of ``classifier(x_t, t)`` against the label, t uniform on ``schedule``."""

    def __init__(self, classifier: nn.Module, schedule: NoiseSchedule):
        self.trained, self.schedule = classifier, schedule

    def draw(self, x0: torch.Tensor, cond: Cond | None, generator: torch.Generator, step: int = 0) -> StepBatch:
        t = torch.randint(0, len(self.schedule), (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return StepBatch({"x0": x0, "t": t, "noise": noise}, cond)

    def loss(self, batch: StepBatch, forward: nn.Module) -> tuple[torch.Tensor, dict]:
        xt = diffusion.q_sample(self.schedule, batch.x0, batch.t, batch.noise)
        logits = forward(xt, batch.t)                                              # (B, classes)
        labels = batch.cond["label"]
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        return F.cross_entropy(logits.float(), labels, reduction="none"), {"accuracy": accuracy}


class NoisyCLIPObjective:
    """Contrastive loss of ``clip(x_t, t, caption tokens)``: t uniform on ``schedule``, x_t = q_sample(x_0, t),
    except a ``clean_fraction`` of the rows (each row by its own draw), which see x_0 itself at t = 0 (the
    schedule's sigma_0 is below a pixel's quantisation step, so t = 0 means "clean" for both). Rows with
    identical captions are each other's positives (``losses.same_caption``: soft targets).

    The batch is the contrastive batch: the loop's micro-batch (``train.grad_accumulation``) or, with several
    ranks, each rank's shard would be a smaller one, so the CLIP trainer runs one process, one micro-batch."""

    def __init__(self, clip: nn.Module, schedule: NoiseSchedule, clean_fraction: float = 0.25):
        if not 0 <= clean_fraction <= 1:
            raise ValueError(f"clean_fraction must lie in [0, 1], got {clean_fraction}")
        self.trained, self.schedule, self.clean_fraction = clip, schedule, clean_fraction

    def draw(self, x0: torch.Tensor, cond: Cond | None, generator: torch.Generator, step: int = 0) -> StepBatch:
        """Timesteps, then noise, then which rows are clean, all from ``generator``."""
        t = torch.randint(0, len(self.schedule), (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        clean = torch.rand(x0.shape[0], generator=generator) < self.clean_fraction
        return StepBatch({"x0": x0, "t": torch.where(clean, 0, t), "noise": noise, "clean": clean}, cond)

    def loss(self, batch: StepBatch, forward: nn.Module) -> tuple[torch.Tensor, dict]:
        xt = diffusion.q_sample(self.schedule, batch.x0, batch.t, batch.noise)
        xt = torch.where(batch.clean.reshape(-1, *([1] * (xt.ndim - 1))), batch.x0, xt)
        tokens = batch.cond["caption"]                                             # (B, L), the CLIP's tokens
        logits = forward(xt, batch.t, tokens)                                      # (B, B) image i, caption j
        positives = same_caption(tokens)
        top1 = positives.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean().item()
        return contrastive_loss(logits, positives), {"accuracy": top1,
                                                     "logit_scale": self.trained.logit_multiplier().item()}
