"""The training loop: a loss of ``difflab.losses`` (L_simple, L_hybrid or L_vlb) at uniform or
importance-sampled timesteps, with AdamW, warm-up, gradient clipping, EMA, logs, grids and checkpoints.

Each step is a pure function of (weights, optimiser state, seed, step): see ``batches.py``. That is what
makes ``resume`` bit-exact on the CPU. The one exception is a learning rate that decays over a time
budget (``train.lr_schedule`` with ``train.max_minutes``): it reads the clock. ``train.max_minutes`` counts
the training time of the whole run, resumed invocations included (the checkpoint keeps it).

Data-parallel training (``distributed.py``): every rank draws the step's whole global batch (examples,
timesteps, noise, label dropout) and trains on its slice; DistributedDataParallel averages the gradients,
so N ranks take the step one process would take with the same batch, up to float rounding (and dropout
masks: each rank draws its own). Each rank then applies the same update, so weights and EMA stay
identical; only rank 0 writes files. How steps are computed (device, precision, gradient accumulation,
channels_last, compile, gradient checkpointing) may change when a run is resumed, and so may the number
of ranks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.build import build_data, build_denoiser
from difflab.config import Config, to_dict
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.losses import LOSSES, build_loss
from difflab.pipelines.ddpm import sample, save_samples
from difflab.train.batches import EpochBatches, StepBatch, dropout_seed, step_generator
from difflab.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_optimizer, load_weights, save_checkpoint
from difflab.train import distributed
from difflab.train.distributed import DistributedContext
from difflab.train.ema import EMA
from difflab.train.precision import Precision
from difflab.train.timesteps import TIMESTEP_SAMPLERS, ImportanceTimesteps, build_timestep_sampler

# Settings that may change when a run is resumed; any other difference is an error.
RESUMABLE_CHANGES = {"name", "data.path", "data.download", "train.steps", "train.max_minutes",
                     "train.log_every", "train.sample_every", "train.checkpoint_every",
                     "train.num_sample_images", "train.device", "train.precision", "train.grad_accumulation",
                     "train.channels_last", "train.compile", "train.gradient_checkpointing"}


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: Config, current: Config) -> list[str]:
    a, b = flatten(to_dict(saved)), flatten(to_dict(current))
    return [f"{k}: checkpoint has {a.get(k)!r}, config has {b.get(k)!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES and not k.startswith("sample.")]


def check_step_layout(config: Config, world_size: int) -> None:
    """The global batch must split evenly into ranks, and each rank's share into micro-batches."""
    t = config.train
    if t.grad_accumulation < 1:
        raise DifflabError(f"train.grad_accumulation must be at least 1, got {t.grad_accumulation}")
    if t.batch_size % (world_size * t.grad_accumulation):
        raise DifflabError(f"train.batch_size {t.batch_size} (the global batch) is not divisible by "
                           f"{world_size} ranks x train.grad_accumulation {t.grad_accumulation}")


def check_objective(config: Config) -> None:
    """The loss and timestep sampler exist, and L_hybrid has a variance to train."""
    t = config.train
    if t.loss not in LOSSES:
        raise DifflabError(f"unknown train.loss {t.loss!r}; choose one of {LOSSES}")
    if t.timestep_sampling not in TIMESTEP_SAMPLERS:
        raise DifflabError(f"unknown train.timestep_sampling {t.timestep_sampling!r}; "
                           f"choose one of {TIMESTEP_SAMPLERS}")
    if t.loss == "hybrid" and not config.diffusion.learn_variance:
        raise DifflabError("train.loss 'hybrid' trains the reverse variance: set diffusion.learn_variance: true")
    if t.min_snr_gamma is not None and (t.loss == "vlb" or t.min_snr_gamma <= 0):
        raise DifflabError(f"train.min_snr_gamma {t.min_snr_gamma} weights L_simple: it needs a positive value "
                           f"and train.loss 'simple' or 'hybrid', not {t.loss!r}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise DifflabError(f"unknown train.lr_schedule {t.lr_schedule!r}; choose one of {LR_SCHEDULES}")


LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_multiplier(schedule: str, step: int, warmup_steps: int, progress: float) -> float:
    """The learning rate as a fraction of train.lr: a linear warm-up over ``warmup_steps``, then constant, or
    a cosine (Loshchilov & Hutter 2017, SGDR Eq. 5 with one cycle) or linear decay to zero as ``progress``
    (the fraction of the run done, in [0, 1]) goes to 1."""
    warmup = min(1.0, (step + 1) / max(warmup_steps, 1))
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return warmup * (1 - progress)
    return warmup


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    last_loss: float
    stopped_by: str      # "steps", "time" or "interrupt"


class Trainer:
    def __init__(self, config: Config, resume: bool | str | Path = False, progress: bool = True,
                 dist: DistributedContext | None = None):
        self.config = config
        t = config.train
        self.dist = dist or distributed.single_process(t.device)
        check_step_layout(config, self.dist.world_size)
        check_objective(config)
        self.device = self.dist.device
        self.out_dir = Path(t.out_dir)
        self.progress = progress and self.dist.is_main
        torch.manual_seed(t.seed)                                 # initial weights, the same on every rank
        self.data = build_data(config.data)
        self.denoiser = build_denoiser(config).to(self.device)
        self.net = self.denoiser.net
        if t.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.ema = EMA(self.net, t.ema_halflife_images, t.ema_rampup_ratio)
        self.ema_denoiser = self.denoiser.with_net(self.ema.model)
        self.loss = build_loss(t.loss, t.vlb_weight, t.min_snr_gamma)
        self.timesteps = build_timestep_sampler(t.timestep_sampling, len(self.denoiser.schedule))
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=t.lr, betas=t.adam_betas,
                                           weight_decay=t.weight_decay)
        self.precision = Precision(t.precision, self.device)
        self.batches = EpochBatches(len(self.data), t.batch_size, t.seed)
        self.step = 0
        self.train_seconds = 0.0      # training time of the whole run, resumed invocations included
        self.invocation_start = time.perf_counter()
        if resume:
            self._resume(self.out_dir / CHECKPOINT_NAME if resume is True else Path(resume))
        self.parallel, self.train_denoiser = self._training_network()

    def _training_network(self) -> tuple[torch.nn.Module, Denoiser]:
        """The network as the training forward pass calls it: with gradient checkpointing, wrapped in DDP
        (more than one rank), then compiled; and a denoiser around that for the loss."""
        t = self.config.train
        if t.gradient_checkpointing:
            if not hasattr(self.net, "gradient_checkpointing"):
                raise DifflabError("train.gradient_checkpointing needs model.kind 'unet', "
                                   f"not {self.config.model.kind!r}")
            self.net.gradient_checkpointing = True
        parallel = distributed.data_parallel(self.net, self.dist)
        forward = torch.compile(parallel) if t.compile else parallel
        return parallel, self.denoiser.with_net(forward)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _resume(self, path: Path) -> None:
        if not path.exists():
            raise DifflabError(f"--resume: checkpoint {path} does not exist (refusing to start from scratch)")
        checkpoint = load_checkpoint(path)
        differences = config_differences(checkpoint.config, self.config)
        if differences:
            raise DifflabError(f"--resume: {path} does not match the config: " + "; ".join(differences[:3]))
        load_weights(self.net, checkpoint, "model")
        load_weights(self.ema.model, checkpoint, "ema")
        load_optimizer(self.optimizer, checkpoint)
        self.timesteps.load_state_tensors({k.removeprefix("timesteps."): v
                                           for k, v in checkpoint.section("train").items()})
        self.precision.load_state_dict(checkpoint.state.get("grad_scaler", {}))
        self.step = int(checkpoint.state["step"])
        self.train_seconds = float(checkpoint.state.get("train_seconds", 0.0))

    def save(self) -> Path:
        """Write the checkpoint (rank 0 only; every rank holds the same weights)."""
        path = self.out_dir / CHECKPOINT_NAME
        if not self.dist.is_main:
            return path
        state = {"step": self.step, "images_seen": self.step * self.config.train.batch_size,
                 "train_seconds": self.elapsed()}
        if self.precision.scaler is not None:
            state["grad_scaler"] = self.precision.state_dict()
        train_tensors = {f"timesteps.{k}": v for k, v in self.timesteps.state_tensors().items()}
        return save_checkpoint(path, self.config, state, self.net, self.ema.model, self.optimizer, train_tensors)

    # -- one step -------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds of training in the whole run: earlier invocations' (from the checkpoint) plus this one's."""
        return self.train_seconds + time.perf_counter() - self.invocation_start

    def run_fraction(self, step: int) -> float:
        """The fraction of the run done: of train.steps, or of train.max_minutes when that is nearer.

        With a time budget this reads the clock (the slowest rank's, so all ranks take the same rate), so a
        decaying learning rate makes the run depend on the machine's speed and resume is exact only up to
        that (with a constant rate it stays bit-exact)."""
        t = self.config.train
        done = step / max(t.steps, 1)
        if t.max_minutes is not None and t.lr_schedule != "constant":
            done = max(done, self.dist.max(self.elapsed()) / (60 * t.max_minutes))
        return done

    def lr_at(self, step: int) -> float:
        t = self.config.train
        return t.lr * lr_multiplier(t.lr_schedule, step, t.warmup_steps, self.run_fraction(step))

    def global_batch(self, step: int) -> StepBatch:
        """The whole step's examples, timesteps, noise and labels, the same on every rank (on the CPU)."""
        t = self.config.train
        g = step_generator(t.seed, step)
        x0, y = self.data.batch(self.batches.indices(step))
        y = y if self.config.data.conditional else None
        timesteps, weights = self.timesteps.sample(x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g)
        if y is not None:   # label dropout: the null label trains the unconditional model (Ho & Salimans 2021)
            drop = torch.rand(y.shape, generator=g) < t.label_dropout
            y = torch.where(drop, torch.full_like(y, self.data.num_classes), y)
        return StepBatch(x0, timesteps, noise, y, weights)

    def micro_batch_loss(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's (importance-weighted) mean loss, and each example's unweighted loss."""
        with self.precision.autocast():
            losses = self.loss(self.train_denoiser, batch.x0, batch.t, batch.noise, batch.y)
        weighted = losses * batch.weights if batch.weights is not None else losses
        return weighted.mean(), losses.detach()

    def train_step(self) -> float:
        """One optimiser step on the global batch; returns its mean loss (over all ranks)."""
        t = self.config.train
        torch.manual_seed(dropout_seed(t.seed, self.step, self.dist.rank))
        local = self.global_batch(self.step).shard(self.dist.rank, self.dist.world_size)
        micro_batches = local.to(self.device, t.channels_last).split(t.grad_accumulation)
        self.optimizer.zero_grad(set_to_none=True)
        loss, example_losses = torch.zeros((), device=self.device), []
        for i, micro in enumerate(micro_batches):
            with distributed.no_sync(self.parallel, skip=i < len(micro_batches) - 1):
                micro_loss, losses = self.micro_batch_loss(micro)
                self.precision.backward(micro_loss / len(micro_batches))
            loss += micro_loss.detach() / len(micro_batches)
            example_losses.append(losses)
        if isinstance(self.timesteps, ImportanceTimesteps):     # every rank records the whole global batch
            self.timesteps.update(self.dist.gather(local.t.to(self.device)).cpu(),
                                  self.dist.gather(torch.cat(example_losses)).cpu())
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.precision.step(self.optimizer, self.net, t.grad_clip)
        self.step += 1
        self.ema.update(self.net, self.step * t.batch_size, t.batch_size)
        return self.dist.mean(loss).item()

    # -- the loop -------------------------------------------------------------------------------------------
    def preview(self, name: str) -> None:
        """A grid (or scatter plot) from the EMA weights; rank 0 only."""
        if not self.dist.is_main:
            return
        n = self.config.train.num_sample_images if self.data.is_image else 4000
        labels = torch.arange(n) % self.data.num_classes if self.config.data.conditional else None
        samples = sample(self.ema_denoiser, self.config, n, labels=labels, device=self.device)
        save_samples(samples, self.out_dir / "samples", name)

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def out_of_time(self) -> bool:
        """Whether the run's train.max_minutes of training (over all its invocations) have passed, as rank 0's
        clock says to all ranks (they stop together)."""
        minutes = self.config.train.max_minutes
        if minutes is None:
            return False
        return self.dist.any(self.dist.is_main and self.elapsed() > 60 * minutes)

    def run(self) -> TrainResult:
        t = self.config.train
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=1) + "\n")
        self.invocation_start = window_start = time.perf_counter()
        losses = []
        stopped_by, loss = "steps", math.nan
        budget = f" (stops after {t.max_minutes:g} min)" if t.max_minutes is not None else ""
        bar = tqdm(total=t.steps, initial=self.step, desc=f"training{budget}", unit="step",
                   disable=not self.progress)
        try:
            while self.step < t.steps:
                loss = self.train_step()
                losses.append(loss)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    images_per_s = len(losses) * t.batch_size / max(elapsed, 1e-9)
                    record = {"step": self.step, "loss": sum(losses) / len(losses), "lr": self.lr_at(self.step - 1),
                              "images_per_s": images_per_s, "elapsed_s": self.elapsed()}
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                    window_start, losses = time.perf_counter(), []
                if self.step % t.checkpoint_every == 0:
                    self.save()
                if self.step % t.sample_every == 0:
                    self.preview(f"step_{self.step:07d}")
                if self.out_of_time():
                    stopped_by = "time"
                    break
        except KeyboardInterrupt:
            bar.close()
            self.save()
            raise
        bar.close()
        path = self.save()
        self.preview("final")
        self.dist.barrier()          # the other ranks return once the checkpoint is written
        return TrainResult(self.step, path, loss, stopped_by)
