"""Progressive distillation: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Alg. 2.

A round trains a student, initialised as a copy of its teacher, so that one of its DDIM steps (eta = 0) does
what two of the teacher's do; the next round's teacher is that student, and so on: 256 -> 128 -> ... -> 1
steps. In sigma space (x VE-scaled, ``difflab.samplers.ddim``) a DDIM step from sigma to sigma' is
x' = x0 + (sigma' / sigma)(x - x0). Two teacher steps sigma -> sigma' -> sigma'' give x''; the student's x0
target x-tilde is what makes its one step sigma -> sigma'' land on x'':

    x'' = x~ + (sigma'' / sigma)(x - x~)   =>   x~ = (x'' - (sigma'' / sigma) x) / (1 - sigma'' / sigma),

Alg. 2's x~ = (z'' - (s''/s) z) / (alpha'' - (s''/s) alpha) divided through by alpha''. At the last step
(sigma'' = 0) it is the teacher's x0 at sigma', the paper's special case, with no division by zero.

The grid of N steps is the schedule's "trailing" grid (Lin et al. 2024): timesteps T - 1, T - 1 - T/N, ...,
then sigma = 0. It starts at the schedule's last timestep, so one step starts from pure noise (the paper's
requirement of a log-SNR range that reaches it; the cosine schedule's alpha-bar there is ~1e-9), and for T
a multiple of N (or N a power of 2 and T = 1000) the 2N grid holds the N grid and its midpoints, checked
below. The students sample with DDIM on their own grid (``sample: {sampler: ddim, spacing: trailing}``).

Loss: the x0 error weighted by "SNR + 1" (= the MSE of v, Salimans & Ho 2022, Sec. 4) or "truncated SNR"
max(SNR, 1), SNR = 1 / sigma^2; written on the network's output F as ||D - x~||^2 = c_out^2 ||F - F~||^2.
Each round has a fresh optimiser (a new ``Trainer``), its own folder and checkpoint, and resumes as any run.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from difflab.build import build_data
from difflab.latent import encode_dataset
from difflab.checkpoint import CHECKPOINT_NAME, load_checkpoint
from difflab.conditioning import Cond
from difflab.config import Config, DistillConfig, SampleConfig
from difflab.denoiser import Denoiser, VPPrecond, per_example
from difflab.errors import DifflabError
from difflab.train.teacher import checkpoint_file, load_teacher
from difflab.samplers.sigmas import append_zero, discrete_timesteps
from difflab.train.batches import StepBatch
from difflab.train.objectives import dropped_conditions
from difflab.train.trainer import Trainer, TrainResult

WEIGHTINGS = ("snr_plus_one", "truncated_snr")


def trailing_sigmas(precond: VPPrecond, steps: int) -> torch.Tensor:
    """The noise levels of ``steps`` DDIM steps on the trailing grid, decreasing, then 0 (steps + 1 values)."""
    keep = discrete_timesteps(len(precond.schedule), steps, "trailing")
    return append_zero(precond.schedule.sigmas[keep].flip(0))


def round_grids(precond: VPPrecond, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's grid of ``steps`` steps, the teacher's of 2 ``steps``), the first inside the second."""
    student, teacher = trailing_sigmas(precond, steps), trailing_sigmas(precond, 2 * steps)
    if not torch.equal(teacher[::2], student):
        raise DifflabError(f"distill: the trailing grid of {2 * steps} steps does not contain that of {steps} on "
                           f"a schedule of {len(precond.schedule)} timesteps (choose powers of 2 dividing it)")
    return student, teacher


def x0_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    snr = sigma.pow(-2)
    return snr + 1 if weighting == "snr_plus_one" else snr.clamp(min=1)


class ProgressiveDistillationObjective:
    """One round: ``student`` learns one DDIM step of ``steps`` from two of ``teacher``'s."""

    def __init__(self, student: Denoiser, teacher: Denoiser, steps: int, weighting: str = "snr_plus_one"):
        if not isinstance(student.precond, VPPrecond):
            raise DifflabError("distill: progressive distillation needs a teacher on a discrete schedule "
                               f"(diffusion.precond vp), not {student.precond.kind}")
        if weighting not in WEIGHTINGS:
            raise DifflabError(f"unknown distill.weighting {weighting!r}; choose one of {WEIGHTINGS}")
        self.student, self.teacher, self.steps, self.weighting = student, teacher.eval(), steps, weighting
        self.student_sigmas, self.teacher_sigmas = round_grids(student.precond, steps)
        self.trained = student.net
        self._training = student

    def draw(self, x0: torch.Tensor, cond: Cond | None, generator: torch.Generator, step: int = 0) -> StepBatch:
        """The student's step i (from student_sigmas[i]), uniform, then the noise of x at that level."""
        i = torch.randint(0, self.steps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        return StepBatch({"x0": x0, "noise": noise, "i": i}, dropped_conditions(cond, self.student, generator))

    @torch.no_grad()
    def target(self, x: torch.Tensor, i: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        """x~ of Alg. 2 from two teacher DDIM steps at x (noise level student_sigmas[i]), in float32 whatever
        the training precision (float64 stays): the division by 1 - sigma''/sigma (~0.03 at 256 steps) amplifies errors."""
        with torch.autocast(x.device.type, enabled=False):
            return self._target(x if x.dtype == torch.float64 else x.float(), i, cond)

    def _target(self, x: torch.Tensor, i: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        sigmas = self.teacher_sigmas.to(x.device)
        s, s_mid, s_next = (per_example(sigmas[2 * i + k], x) for k in range(3))
        x0 = self.teacher(x, sigmas[2 * i], cond)
        x_mid = x0 + s_mid / s * (x - x0)
        x0 = self.teacher(x_mid, sigmas[2 * i + 1], cond)
        x_next = x0 + s_next / s_mid * (x_mid - x0)
        return (x_next - s_next / s * x) / (1 - s_next / s)

    def loss(self, batch: StepBatch, forward: nn.Module) -> torch.Tensor:
        if self._training.net is not forward:
            self._training = self.student.with_net(forward)
        sigma = self.student_sigmas.to(batch.x0.device)[batch.i]                 # (B,) float64
        x = batch.x0 + per_example(sigma, batch.x0) * batch.noise
        target_x0 = self.target(x, batch.i, batch.cond)
        c_skip, c_out, _, _ = self.student.precond.scalings(sigma)
        f_target = (target_x0 - per_example(c_skip, x) * x) / per_example(c_out, x)
        f = self._training.network_output(x, sigma, batch.cond).float()
        weight = (x0_weight(sigma, self.weighting) * c_out ** 2).to(f)
        return weight * (f - f_target).pow(2).flatten(1).mean(1)


# -- the rounds ---------------------------------------------------------------------------------------------
def round_steps(distill: DistillConfig) -> list[int]:
    """The students' step counts: start_steps, start_steps / 2, ..., end_steps."""
    steps, rounds = distill.start_steps, []
    while steps >= distill.end_steps:
        rounds.append(steps)
        if steps == distill.end_steps:
            return rounds
        if steps % 2:
            break
        steps //= 2
    raise DifflabError(f"distill: end_steps {distill.end_steps} is not start_steps {distill.start_steps} halved "
                       f"some number of times")


def round_config(config: Config, teacher: Config, steps: int) -> Config:
    """The round's experiment as saved with its student: the teacher's model and diffusion, this
    experiment's training, and DDIM on the student's own grid as its recommended sampler."""
    out_dir = str(Path(config.train.out_dir) / f"steps_{steps:04d}")
    train = replace(config.train, out_dir=out_dir,
                    max_minutes=config.distill.minutes_per_round or config.train.max_minutes)
    sample = replace(SampleConfig(), sampler="ddim", steps=steps, spacing="trailing",
                     clip_x0=teacher.sample.clip_x0, batch_size=teacher.sample.batch_size)
    return replace(config, model=teacher.model, diffusion=teacher.diffusion, train=train, sample=sample)


def round_finished(path: Path, config: Config) -> bool:
    """Whether the round's checkpoint reached its train.steps or its time budget."""
    state = load_checkpoint(path).state
    t = config.train
    return int(state.get("step", 0)) >= t.steps or (
        t.max_minutes is not None and float(state.get("train_seconds", 0)) >= 60 * t.max_minutes)


def progressive_distillation(config: Config, resume: bool = False, progress: bool = True,
                             overwrite: bool = False, preview: Callable | None = None,
                             say: Callable = print) -> list[TrainResult]:
    """Every round of ``config.distill``, each in ``train.out_dir/steps_NNNN``. With ``resume``, finished
    rounds are kept (the next round's teacher is read from them), an interrupted one continues.
    ``preview(round_config, spec)``, if given, makes a round's preview callback ``(ema_denoiser, name)``."""
    distill = config.distill
    if not distill.teacher:
        raise DifflabError("distill.teacher: progressive distillation needs the teacher's run folder or checkpoint")
    teacher_path = checkpoint_file(distill.teacher)
    data, latent = build_data(config.data), load_teacher(teacher_path).latent
    if latent is not None:                       # a latent teacher: its data are its autoencoder's latents
        data = encode_dataset(latent, data)
    results = []
    for steps in round_steps(distill):
        teacher = load_teacher(teacher_path)
        if tuple(data.sample_shape) != tuple(teacher.spec.sample_shape):
            raise DifflabError(f"distill.teacher {teacher_path} makes samples of shape {teacher.spec.sample_shape}, "
                               f"the data are {tuple(data.sample_shape)}")
        round_cfg = round_config(config, teacher.config, steps)
        path = Path(round_cfg.train.out_dir) / CHECKPOINT_NAME
        if resume and path.exists() and round_finished(path, round_cfg):
            say(f"round of {steps} steps: finished earlier ({path})")
            teacher_path = path
            continue
        torch.manual_seed(round_cfg.train.seed)
        net = copy.deepcopy(teacher.denoiser.net).train().requires_grad_(True)
        student = teacher.denoiser.with_net(net)
        objective = ProgressiveDistillationObjective(student, teacher.denoiser, steps, distill.weighting)
        metadata = {"model": teacher.spec.to_json(),
                    "distilled": {"method": "progressive", "steps": steps, "teacher": str(teacher_path)}}
        callback = preview(round_cfg, teacher.spec, latent=latent) if preview is not None else None
        trainer = Trainer(round_cfg, objective, data, resume=resume and path.exists(), progress=progress,
                          metadata=metadata, overwrite=overwrite,
                          frozen={"autoencoder": latent.autoencoder} if latent is not None else None,
                          preview=(lambda ema_net, name, cb=callback: cb(student.with_net(ema_net), name))
                          if callback else None)
        say(f"round of {steps} steps (teacher {teacher_path}, {2 * steps} steps)"
            + (f": resuming from step {trainer.step}" if trainer.step else ""))
        results.append(trainer.run())
        teacher_path = results[-1].checkpoint
    return results
