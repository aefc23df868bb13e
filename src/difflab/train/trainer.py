"""The training loop, for any objective (``objectives.py``): AdamW, warm-up, learning-rate decay, gradient
clipping, EMA, precision, gradient accumulation, data parallelism, logs, previews and checkpoints.

Each step is a pure function of (weights, optimiser state, seed, step): see ``batches.py``. That is what
makes ``resume`` bit-exact on the CPU. The one exception is a learning rate that decays over a time
budget (``train.lr_schedule`` with ``train.max_minutes``): it reads the clock. ``train.max_minutes`` counts
the training time of the whole run, resumed invocations included (the checkpoint keeps it).

Data-parallel training (``distributed.py``): every rank draws the step's whole global batch (examples and
the objective's noise, levels and condition dropout) and trains on its slice; DistributedDataParallel
averages the gradients, so N ranks take the step one process would take with the same batch, up to float
rounding (and dropout masks: each rank draws its own). Each rank then applies the same update, so weights and
EMA stay identical; only rank 0 writes files. How steps are computed (device, precision, gradient
accumulation, channels_last, compile, gradient checkpointing) may change when a run is resumed, and so may the
number of ranks. Preview grids come from a callback (``preview(ema_module, name)``), so this layer knows
nothing of sampling pipelines.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from difflab.checkpoint import CHECKPOINT_NAME, FORMAT, load_checkpoint, load_optimizer, load_weights, save_checkpoint
from difflab.conditioning import Cond
from difflab.config import TrainConfig, to_dict
from difflab.data import InMemoryData
from difflab.data.augment import random_hflip
from difflab.errors import DifflabError
from difflab.files import append_line, write_text
from difflab.train import distributed
from difflab.train.batches import EpochBatches, StepBatch, dropout_seed, step_generator
from difflab.train.distributed import DistributedContext
from difflab.train.ema import EMA
from difflab.train.objectives import Objective
from difflab.train.precision import Precision
from difflab.train.run_folder import RunLock, check_occupied

# Settings that may change when a run is resumed; any other difference is an error.
RESUMABLE_CHANGES = {"name", "data.path", "data.download", "data.stream", "train.out_dir", "train.steps", "train.max_minutes",
                     "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.num_sample_images", "train.eval_samples", "train.csv_log", "train.tensorboard", "train.device", "train.precision", "train.grad_accumulation",
                     "train.channels_last", "train.compile", "train.gradient_checkpointing", "train.nonfinite"}
NONFINITE = ("stop", "skip")


class NonFiniteLoss(DifflabError):
    """Training diverged: a loss or gradient is nan or inf (the last finite checkpoint is kept)."""


def flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: Any, current: Any, resumable: set[str] = RESUMABLE_CHANGES) -> list[str]:
    a, b = flatten(to_dict(saved)), flatten(to_dict(current))
    return [f"{k}: checkpoint has {a.get(k)!r}, config has {b.get(k)!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in resumable and not k.startswith("sample.")]


def check_step_layout(train: TrainConfig, world_size: int) -> None:
    """The global batch must split evenly into ranks, and each rank's share into micro-batches."""
    if train.grad_accumulation < 1:
        raise DifflabError(f"train.grad_accumulation must be at least 1, got {train.grad_accumulation}")
    if train.batch_size % (world_size * train.grad_accumulation):
        raise DifflabError(f"train.batch_size {train.batch_size} (the global batch) is not divisible by "
                           f"{world_size} ranks x train.grad_accumulation {train.grad_accumulation}")
    if train.nonfinite not in NONFINITE:
        raise DifflabError(f"unknown train.nonfinite {train.nonfinite!r}; choose one of {NONFINITE}")
    if train.lr_schedule not in LR_SCHEDULES:
        raise DifflabError(f"unknown train.lr_schedule {train.lr_schedule!r}; choose one of {LR_SCHEDULES}")


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


def append_csv(path: Path, record: dict) -> None:
    """One record as a CSV row; the file's header (its first record's keys) fixes the columns, so a resumed run
    appends to the same columns (a key the header lacks is left out, a missing one left empty)."""
    columns = list(record)
    if path.is_file() and path.stat().st_size:
        with open(path, newline="") as f:
            columns = next(csv.reader(f), columns)
    else:
        append_line(path, ",".join(columns))
    append_line(path, ",".join("" if record.get(c) is None else str(record[c]) for c in columns))


def summary_writer_class():
    """torch's TensorBoard ``SummaryWriter``, or a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DifflabError("train.tensorboard needs the tensorboard package: pip install 'difflab[tensorboard]'") from None
    return SummaryWriter


def tensorboard_writer(out_dir: Path):
    """A ``SummaryWriter`` on RUN/tensorboard (a resumed run adds an event file beside the old one)."""
    return summary_writer_class()(log_dir=str(out_dir / "tensorboard"))


def write_scalars(writer, record: dict) -> None:
    """A log record's numbers as TensorBoard scalars at its step."""
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, record["step"])
    writer.flush()


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    last_loss: float
    stopped_by: str      # "steps", "time" or "interrupt"


class Trainer:
    """Runs ``objective`` on ``data`` as ``config.train`` says; ``config`` (the whole experiment) is saved in
    the checkpoint with ``metadata`` (e.g. the model's description), in the file format ``file_format``.
    Build the objective after seeding ``torch.manual_seed(config.train.seed)`` (the initial weights) and on
    ``dist.device``."""

    def __init__(self, config: Any, objective: Objective, data: InMemoryData, resume: bool | str | Path = False,
                 progress: bool = True, dist: DistributedContext | None = None,
                 preview: Callable[[torch.nn.Module, str], None] | None = None, metadata: dict | None = None,
                 file_format: str = FORMAT, checkpoint_name: str = CHECKPOINT_NAME,
                 resumable: set[str] = RESUMABLE_CHANGES, overwrite: bool = False,
                 frozen: dict[str, torch.nn.Module] | None = None):
        self.config, self.objective, self.data = config, objective, data
        self.frozen = dict(frozen or {})             # modules saved with every checkpoint, never trained
        t = self.train_config = config.train
        self.dist = dist or distributed.single_process(t.device)
        check_step_layout(t, self.dist.world_size)
        self.device = self.dist.device
        self.out_dir = Path(t.out_dir)
        self.progress = progress and self.dist.is_main
        self.preview_callback, self.metadata = preview, dict(metadata or {})
        self.file_format, self.checkpoint_name, self.resumable = file_format, checkpoint_name, resumable
        self.overwrite = overwrite
        if self.dist.is_main:
            check_occupied(self.out_dir, checkpoint_name, bool(resume), overwrite)
        self.net = objective.trained
        if t.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.ema = EMA(self.net, t.ema_halflife_images, t.ema_rampup_ratio)
        self.optimizer = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=t.lr,
                                           betas=t.adam_betas, weight_decay=t.weight_decay)   # not frozen parts
        self.precision = Precision(t.precision, self.device)
        self.batches = EpochBatches(len(self.data), t.batch_size, t.seed)
        self.extras: dict[str, list[float]] = {}     # the objective's values to log, since the last record
        self.extra_state: dict = {}                  # saved in the checkpoint's state (e.g. test accuracies)
        self.mid_step = False                        # parameters, optimiser or EMA are being updated
        self.interrupt_requested = False             # Ctrl-C: stop at the next step boundary
        self.tensorboard = None                      # train.tensorboard: its SummaryWriter, opened on first log
        if getattr(t, "tensorboard", False):
            summary_writer_class()                   # fail now, not at the first log record
        self.step = 0
        self.train_seconds = 0.0      # training time of the whole run, resumed invocations included
        self.invocation_start = time.perf_counter()
        if resume:
            self._resume(self.out_dir / checkpoint_name if resume is True else Path(resume))
        self.parallel, self.forward = self._training_network()

    def _training_network(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The trained module as the training forward pass calls it: with gradient checkpointing, wrapped in
        DDP (more than one rank), then compiled."""
        t = self.train_config
        if t.gradient_checkpointing:
            if not hasattr(self.net, "gradient_checkpointing"):
                raise DifflabError(f"train.gradient_checkpointing needs a U-Net, not {type(self.net).__name__}")
            self.net.gradient_checkpointing = True
        parallel = distributed.data_parallel(self.net, self.dist)
        return parallel, torch.compile(parallel) if t.compile else parallel

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _resume(self, path: Path) -> None:
        if not path.exists():
            raise DifflabError(f"--resume: checkpoint {path} does not exist (refusing to start from scratch)")
        checkpoint = load_checkpoint(path, self.file_format, type(self.config))
        differences = config_differences(checkpoint.config, self.config, self.resumable)
        if differences:
            raise DifflabError(f"--resume: {path} does not match the config: " + "; ".join(differences[:3]))
        load_weights(self.net, checkpoint, "model")
        load_weights(self.ema.model, checkpoint, "ema")
        load_optimizer(self.optimizer, checkpoint)
        if hasattr(self.objective, "load_state_tensors"):
            self.objective.load_state_tensors(checkpoint.section("train"))
        self.precision.load_state_dict(checkpoint.state.get("grad_scaler", {}))
        try:
            self.step = int(checkpoint.state["step"])
            self.train_seconds = float(checkpoint.state.get("train_seconds", 0.0))
        except (KeyError, TypeError, ValueError):
            raise DifflabError(f"--resume: {path} holds no valid training step in its state") from None
        self.extra_state = {k: v for k, v in checkpoint.state.items() if k in ("nonfinite_skipped",)}

    def save(self) -> Path:
        """Write the checkpoint (rank 0 only; every rank holds the same weights)."""
        path = self.out_dir / self.checkpoint_name
        if not self.dist.is_main:
            return path
        if not all(torch.isfinite(p).all() for p in self.net.parameters()):
            raise NonFiniteLoss(f"step {self.step}: the weights hold nan or inf; not overwriting {path}")
        state = {"step": self.step, "images_seen": self.step * self.train_config.batch_size,
                 "train_seconds": self.elapsed(), **self.extra_state}
        if self.precision.scaler is not None:
            state["grad_scaler"] = self.precision.state_dict()
        train_tensors = self.objective.state_tensors() if hasattr(self.objective, "state_tensors") else {}
        saved = save_checkpoint(path, self.config, state, self.net, self.ema.model, self.optimizer, train_tensors,
                                self.file_format, self.metadata, frozen=self.frozen)
        if self.train_config.keep_checkpoints:
            self.save_milestone(state)
        return saved

    def save_milestone(self, state: dict) -> None:
        """``milestones/step_NNNNNNN.safetensors``: the EMA weights alone (a small file that ``difflab sample``
        reads like a checkpoint), keeping the newest ``train.keep_checkpoints``."""
        folder = self.out_dir / "milestones"
        save_checkpoint(folder / f"step_{self.step:07d}.safetensors", self.config, {**state, "weights": "ema"},
                        self.ema.model, file_format=self.file_format, records=self.metadata, write_config=False,
                        frozen=self.frozen)
        for old in sorted(folder.glob("step_*.safetensors"))[:-self.train_config.keep_checkpoints]:
            old.unlink()

    # -- one step -------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        """Seconds of training in the whole run: earlier invocations' (from the checkpoint) plus this one's."""
        return self.train_seconds + time.perf_counter() - self.invocation_start

    def run_fraction(self, step: int) -> float:
        """The fraction of the run done: of train.steps, or of train.max_minutes when that is nearer.

        With a time budget this reads the clock (the slowest rank's, so all ranks take the same rate), so a
        decaying learning rate makes the run depend on the machine's speed and resume is exact only up to
        that (with a constant rate it stays bit-exact)."""
        t = self.train_config
        done = step / max(t.steps, 1)
        if t.max_minutes is not None and t.lr_schedule != "constant":
            done = max(done, self.dist.max(self.elapsed()) / (60 * t.max_minutes))
        return done

    def lr_at(self, step: int) -> float:
        t = self.train_config
        return t.lr * lr_multiplier(t.lr_schedule, step, t.warmup_steps, self.run_fraction(step))

    def global_batch(self, step: int) -> StepBatch:
        """The whole step's examples and the objective's draws, the same on every rank (on the CPU)."""
        g = step_generator(self.train_config.seed, step)
        x0, y = self.data.batch(self.batches.indices(step), g)
        if getattr(self.config.data, "hflip", False) and x0.ndim == 4:
            x0 = random_hflip(x0, g)
        cond = y if isinstance(y, Cond) or y is None else Cond(label=y)         # a record (captions), or labels
        return self.objective.draw(x0, cond, g, step)

    def micro_batch_loss(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The micro-batch's (importance-weighted) mean loss, each example's unweighted loss, and the
        objective's other values to log."""
        with self.precision.autocast():
            out = self.objective.loss(batch, self.forward)
        losses, extras = out if isinstance(out, tuple) else (out, {})
        weighted = losses * batch.weights if batch.weights is not None else losses
        return weighted.mean(), losses.detach(), extras

    def train_step(self) -> float:
        """One optimiser step on the global batch; returns its mean loss (over all ranks)."""
        t = self.train_config
        torch.manual_seed(dropout_seed(t.seed, self.step, self.dist.rank))
        local = self.global_batch(self.step).shard(self.dist.rank, self.dist.world_size)
        micro_batches = local.to(self.device, t.channels_last).split(t.grad_accumulation)
        self.optimizer.zero_grad(set_to_none=True)
        loss, example_losses = torch.zeros((), device=self.device), []
        for i, micro in enumerate(micro_batches):
            with distributed.no_sync(self.parallel, skip=i < len(micro_batches) - 1):
                micro_loss, losses, extras = self.micro_batch_loss(micro)
                self.precision.backward(micro_loss / len(micro_batches))
            loss += micro_loss.detach() / len(micro_batches)
            example_losses.append(losses)
            for key, value in extras.items():
                self.extras.setdefault(key, []).append(value)
        mean_loss = self.dist.mean(loss).item()              # the same on every rank, as are the gradients
        self.mid_step = True                  # from here to the end the state changes: no checkpoint mid-way
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        if not math.isfinite(mean_loss) or not self.precision.step(self.optimizer, self.net, t.grad_clip):
            self.skip_nonfinite(mean_loss)
            return mean_loss
        if hasattr(self.objective, "observe") and local.t is not None:  # every rank records the global batch
            self.objective.observe(self.dist.gather(local.t.to(self.device)).cpu(),
                                   self.dist.gather(torch.cat(example_losses)).cpu())
        self.step += 1
        self.ema.update(self.net, self.step * t.batch_size, t.batch_size)
        if hasattr(self.objective, "after_step"):          # e.g. a consistency model's target network
            self.objective.after_step(self.step)
        self.mid_step = False
        return mean_loss

    def skip_nonfinite(self, loss: float) -> None:
        """A nan/inf loss or gradient: stop (train.nonfinite 'stop'), or count the step and move on without
        updating anything ('skip'); the weights, and so every checkpoint, stay finite either way."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.train_config.nonfinite == "stop":
            self.mid_step = False
            raise NonFiniteLoss(f"training diverged at step {self.step + 1}: the loss ({loss}) or its gradient is "
                                f"not finite; the last checkpoint is kept (lower train.lr, or set "
                                f"train.nonfinite: skip to skip such steps)")
        self.extra_state["nonfinite_skipped"] = self.extra_state.get("nonfinite_skipped", 0) + 1
        self.step += 1
        self.mid_step = False

    # -- the loop -------------------------------------------------------------------------------------------
    def preview(self, name: str) -> None:
        """The preview callback on the EMA weights (a grid of samples, say); rank 0 only. Metrics it returns
        (e.g. an FID of samples) are logged with the step."""
        if self.dist.is_main and self.preview_callback is not None:
            metrics = self.preview_callback(self.ema.model, name)
            if isinstance(metrics, dict) and metrics:
                self.log({"step": self.step, **metrics})

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            append_line(self.out_dir / "metrics.jsonl", json.dumps(record))
            if getattr(self.train_config, "csv_log", False):
                append_csv(self.out_dir / ("evals.csv" if "loss" not in record else "metrics.csv"), record)
            if getattr(self.train_config, "tensorboard", False):
                if self.tensorboard is None:
                    self.tensorboard = tensorboard_writer(self.out_dir)
                write_scalars(self.tensorboard, record)

    def stop_reason(self) -> str | None:
        """"interrupt" once Ctrl-C was pressed on any rank, "time" once the run's train.max_minutes of training
        (over all its invocations) have passed on rank 0's clock, else None; one agreement between the ranks
        per step, so they stop together."""
        minutes = self.train_config.max_minutes
        out_of_time = minutes is not None and self.dist.is_main and self.elapsed() > 60 * minutes
        agreed = self.dist.max(2.0 * self.interrupt_requested + out_of_time)
        return "interrupt" if agreed >= 2 else "time" if agreed >= 1 else None

    def progress_position(self) -> int:
        """Where the bar stands: steps done, or seconds trained when the time budget ends the run first."""
        t = self.train_config
        if t.max_minutes is None:
            return self.step
        return min(int(self.elapsed()), round(60 * t.max_minutes))

    def progress_bar(self) -> tqdm:
        """A bar whose total is what will end the run: train.steps, or train.max_minutes in seconds (so its
        estimate of the time left is the budget's, not that of steps that will never run)."""
        t = self.train_config
        if t.max_minutes is None:
            return tqdm(total=t.steps, initial=self.step, desc="training", unit="step", disable=not self.progress)
        return tqdm(total=round(60 * t.max_minutes), initial=self.progress_position(), smoothing=0,
                    desc=f"training for {t.max_minutes:g} min", unit="s", disable=not self.progress,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")

    def run(self) -> TrainResult:
        """Train to train.steps or the time budget. Ctrl-C stops at the end of the current step and writes a
        checkpoint of that step (a second Ctrl-C stops at once and keeps the last checkpoint written)."""
        lock = RunLock(self.out_dir) if self.dist.is_main else None
        if lock is not None:
            lock.acquire()
        previous_handler = self.catch_interrupts()
        try:
            return self.train_loop()
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
            if lock is not None:
                lock.release()

    def catch_interrupts(self):
        """Install a SIGINT handler that asks the loop to stop at the next step boundary (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def request(signum, frame):
            if self.interrupt_requested:                           # the second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.interrupt_requested = True
        return signal.signal(signal.SIGINT, request)

    def train_loop(self) -> TrainResult:
        t = self.train_config
        if self.dist.is_main:
            if self.overwrite and not self.step:
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            write_text(self.out_dir / "config.json", json.dumps(to_dict(self.config), indent=1) + "\n")
        self.invocation_start = window_start = time.perf_counter()
        losses = []
        stopped_by, loss = "steps", math.nan
        bar = self.progress_bar()
        try:
            while self.step < t.steps:
                loss = self.train_step()
                losses.append(loss)
                bar.update(self.progress_position() - bar.n)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    images_per_s = len(losses) * t.batch_size / max(elapsed, 1e-9)
                    record = {"step": self.step, "loss": sum(losses) / len(losses), "lr": self.lr_at(self.step - 1),
                              **{k: sum(v) / len(v) for k, v in self.extras.items()},
                              "images_per_s": images_per_s, "elapsed_s": self.elapsed()}
                    self.extras = {}
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                    window_start, losses = time.perf_counter(), []
                if self.step % t.checkpoint_every == 0:
                    self.save()
                if self.step % t.sample_every == 0:
                    self.preview(f"step_{self.step:07d}")
                reason = self.stop_reason()
                if reason == "interrupt":
                    raise KeyboardInterrupt
                if reason == "time":
                    stopped_by = "time"
                    break
        except KeyboardInterrupt:
            bar.close()
            if not self.mid_step:              # a torn step is never saved: the last checkpoint stays
                self.save()
            raise
        bar.close()
        path = self.save()
        self.preview("final")
        self.dist.barrier()          # the other ranks return once the checkpoint is written
        return TrainResult(self.step, path, loss, stopped_by)

