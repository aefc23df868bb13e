"""The training loop: L_simple with AdamW, warm-up, gradient clipping, EMA, logs, grids and checkpoints.

Each step is a pure function of (weights, optimiser state, seed, step): see ``batches.py``. That is what
makes ``resume`` bit-exact on the CPU.
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
from difflab.losses import simple_loss
from difflab.pipelines.ddpm import sample, save_samples
from difflab.train.batches import EpochBatches, derived_seed, step_generator
from difflab.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_optimizer, load_weights, save_checkpoint
from difflab.train.ema import EMA

# Settings that may change when a run is resumed; any other difference is an error.
RESUMABLE_CHANGES = {"name", "data.path", "data.download", "train.steps", "train.max_minutes",
                     "train.log_every", "train.sample_every", "train.checkpoint_every",
                     "train.num_sample_images"}


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


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    last_loss: float
    stopped_by: str      # "steps", "time" or "interrupt"


class Trainer:
    def __init__(self, config: Config, resume: bool | str | Path = False, progress: bool = True):
        self.config = config
        self.out_dir = Path(config.train.out_dir)
        self.progress = progress
        torch.manual_seed(config.train.seed)                      # initial weights
        self.data = build_data(config.data)
        self.denoiser = build_denoiser(config)
        self.net = self.denoiser.net
        self.ema = EMA(self.net, config.train.ema_halflife_images, config.train.ema_rampup_ratio)
        self.ema_denoiser = Denoiser(self.ema.model, self.denoiser.schedule, self.denoiser.prediction)
        t = config.train
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=t.lr, betas=t.adam_betas,
                                           weight_decay=t.weight_decay)
        self.batches = EpochBatches(len(self.data), t.batch_size, t.seed)
        self.step = 0
        if resume:
            self._resume(self.out_dir / CHECKPOINT_NAME if resume is True else Path(resume))

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
        self.step = int(checkpoint.state["step"])

    def save(self) -> Path:
        state = {"step": self.step, "images_seen": self.step * self.config.train.batch_size}
        return save_checkpoint(self.out_dir / CHECKPOINT_NAME, self.config, state, self.net, self.ema.model,
                               self.optimizer)

    # -- one step -------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        t = self.config.train
        return t.lr * min(1.0, (step + 1) / max(t.warmup_steps, 1))

    def train_step(self) -> float:
        t = self.config.train
        g = step_generator(t.seed, self.step)
        torch.manual_seed(derived_seed(t.seed, self.step, stream=3))    # dropout
        x0, y = self.data.batch(self.batches.indices(self.step))
        y = y if self.config.data.conditional else None
        timesteps = torch.randint(0, len(self.denoiser.schedule), (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if y is not None:   # label dropout: the null label trains the unconditional model (Ho & Salimans 2021)
            drop = torch.rand(y.shape, generator=g) < t.label_dropout
            y = torch.where(drop, torch.full_like(y, self.data.num_classes), y)
        loss = simple_loss(self.denoiser, x0, timesteps, noise, y).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), t.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.step()
        self.step += 1
        self.ema.update(self.net, self.step * t.batch_size, t.batch_size)
        return loss.item()

    # -- the loop -------------------------------------------------------------------------------------------
    def preview(self, name: str) -> None:
        n = self.config.train.num_sample_images if self.data.is_image else 4000
        labels = torch.arange(n) % self.data.num_classes if self.config.data.conditional else None
        samples = sample(self.ema_denoiser, self.config, n, labels=labels)
        save_samples(samples, self.out_dir / "samples", name)

    def log(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self) -> TrainResult:
        t = self.config.train
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(json.dumps(to_dict(self.config), indent=1) + "\n")
        start_time, window_start, losses = time.perf_counter(), time.perf_counter(), []
        stopped_by, loss = "steps", math.nan
        bar = tqdm(total=t.steps, initial=self.step, desc="training", unit="step", disable=not self.progress)
        try:
            while self.step < t.steps:
                loss = self.train_step()
                losses.append(loss)
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == t.steps:
                    elapsed = time.perf_counter() - window_start
                    images_per_s = len(losses) * t.batch_size / max(elapsed, 1e-9)
                    record = {"step": self.step, "loss": sum(losses) / len(losses), "lr": self.lr_at(self.step - 1),
                              "images_per_s": images_per_s, "elapsed_s": time.perf_counter() - start_time}
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{images_per_s:.0f}")
                    window_start, losses = time.perf_counter(), []
                if self.step % t.checkpoint_every == 0:
                    self.save()
                if self.step % t.sample_every == 0:
                    self.preview(f"step_{self.step:07d}")
                if t.max_minutes is not None and time.perf_counter() - start_time > 60 * t.max_minutes:
                    stopped_by = "time"
                    break
        except KeyboardInterrupt:
            bar.close()
            self.save()
            raise
        bar.close()
        path = self.save()
        self.preview("final")
        return TrainResult(self.step, path, loss, stopped_by)
