"""Training the noise-aware classifier p(y | x_t, t) that classifier guidance uses (Dhariwal & Nichol 2021,
Sec. 4.1: "we train a classifier on noisy images x_t ... with the same noise distribution as the diffusion
model"; ADM's ``scripts/classifier_train.py``).

Each step: a batch (x_0, y) of labelled images, t uniform on the diffusion model's schedule, x_t =
q_sample(x_0, t, eps), cross-entropy of classifier(x_t, t) against y, AdamW, EMA. The schedule must be the
one of the diffusion model the classifier will guide: it is saved with the weights, and
``load_noisy_classifier`` returns it for the caller to check. As in ``trainer.py``, each step is a pure
function of (weights, optimiser state, seed, step) (``batches.py``).

The file is ``noisy_classifier.safetensors``: model, EMA and optimiser tensors, the experiment config and
the training state (step, test accuracies) as JSON in its metadata, written atomically like checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from difflab import diffusion
from difflab.build import build_data, build_schedule
from difflab.checkpoint import Checkpoint, load_optimizer, load_weights, read_safetensors, save_checkpoint
from difflab.config import DataConfig, DiffusionConfig, from_dict, load_config
from difflab.data import InMemoryData
from difflab.errors import DifflabError
from difflab.nets.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from difflab.schedules import NoiseSchedule
from difflab.train.batches import EpochBatches, dropout_seed, step_generator
from difflab.train.distributed import resolve_device
from difflab.train.ema import EMA

FORMAT = "difflab-noisy-classifier/1"
CLASSIFIER_NAME = "noisy_classifier.safetensors"


@dataclass
class ClassifierTrainConfig:
    out_dir: str = "runs/noisy_classifier"
    steps: int = 5000
    max_minutes: float | None = None        # stop (and save) after this wall-clock budget
    batch_size: int = 64
    lr: float = 3e-4                        # ADM's classifiers: 3e-4 (6e-4 at 64x64), AdamW
    weight_decay: float = 0.05
    ema_halflife_images: float = 20_000.0   # as TrainConfig: EMA half-life in training images
    ema_rampup_ratio: float | None = 0.1
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    eval_timesteps: tuple[int, ...] = (0, 250, 500, 750, 999)   # test accuracy at these t after training
    eval_examples: int = 2000               # test-split examples scored (0: no evaluation)
    device: str = "auto"                    # cpu | cuda | auto


@dataclass
class ClassifierExperiment:
    name: str = "noisy_classifier"
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)   # the guided model's schedule
    classifier: NoisyClassifierConfig = field(default_factory=NoisyClassifierConfig)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)


@dataclass
class ClassifierTrainResult:
    step: int
    checkpoint: Path
    last_loss: float
    accuracy: dict[int, float]              # test accuracy by timestep (empty without evaluation)
    stopped_by: str                         # "steps" or "time"


# -- config ---------------------------------------------------------------------------------------------------
def load_classifier_experiment(path: str | Path | None = None,
                               overrides: list[str] | None = None) -> ClassifierExperiment:
    """A YAML experiment file plus ``--set key=value`` overrides, strictly checked like ``load_config``."""
    return load_config(path, overrides, cls=ClassifierExperiment)


def fit_to_data(config: NoisyClassifierConfig, data: InMemoryData) -> NoisyClassifierConfig:
    """Input channels, image size and classes taken from the data (as ``build_net`` does for the U-Net)."""
    if not data.is_image or data.labels is None or not data.num_classes:
        raise DifflabError(f"a noise-aware classifier needs labelled images; data set {data.name!r} has none "
                           "(use data.dataset: fashion_mnist)")
    channels, size, _ = data.sample_shape
    return dataclasses.replace(config, in_channels=channels, image_size=size, num_classes=data.num_classes)


# -- saving and loading ---------------------------------------------------------------------------------------
def save_noisy_classifier(path: str | Path, experiment: ClassifierExperiment, state: dict, model: NoisyClassifier,
                          ema_model: NoisyClassifier | None = None,
                          optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Weights (``model.``, ``ema.``, ``optimizer.``) with the experiment and ``state`` as JSON metadata,
    written atomically, like a diffusion checkpoint; the experiment also as ``config.json`` beside it."""
    return save_checkpoint(path, experiment, state, model, ema_model, optimizer, file_format=FORMAT)


def read_noisy_classifier(path: str | Path) -> Checkpoint:
    """The file's tensors, state and experiment (a ``ClassifierExperiment`` in ``Checkpoint.config``).
    ``path`` is the file or the run folder holding it."""
    path = Path(path)
    path = path / CLASSIFIER_NAME if path.is_dir() else path
    tensors, metadata = read_safetensors(path, FORMAT, "noise-aware classifier")
    try:
        experiment = from_dict(ClassifierExperiment, json.loads(metadata["config"]))
        state = json.loads(metadata.get("state", "{}"))
    except (KeyError, json.JSONDecodeError, DifflabError) as e:
        raise DifflabError(f"{path}: missing or invalid classifier config in metadata ({e})") from None
    return Checkpoint(path, experiment, state, tensors)


def load_noisy_classifier(path: str | Path, weights: str = "ema") -> tuple[NoisyClassifier, DiffusionConfig]:
    """The classifier (in eval mode, no parameter gradients) and the diffusion config it was trained for.
    ``weights``: "ema" (the default; the raw weights when the file has none) or "model"."""
    if weights not in ("ema", "model"):
        raise DifflabError(f"unknown classifier weights {weights!r}; choose 'ema' or 'model'")
    checkpoint = read_noisy_classifier(path)
    experiment: ClassifierExperiment = checkpoint.config
    model = NoisyClassifier(experiment.classifier)
    load_weights(model, checkpoint, "ema" if weights == "ema" and checkpoint.has_ema else "model")
    return model.eval().requires_grad_(False), experiment.diffusion


# -- evaluation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_noisy_classifier(model: torch.nn.Module, data: InMemoryData, schedule: NoiseSchedule,
                              timesteps: tuple[int, ...] = (0, 250, 500, 750, 999), batch_size: int = 500,
                              max_examples: int | None = None, seed: int = 0) -> dict[int, float]:
    """Accuracy of ``model(x_t, t)`` on ``data`` noised to each of ``timesteps`` (fixed noise per seed)."""
    n = len(data) if max_examples is None else min(max_examples, len(data))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    accuracy = {}
    for step in timesteps:
        g = torch.Generator().manual_seed(seed)
        correct = 0
        for start in range(0, n, batch_size):
            x0, y = data.batch(torch.arange(start, min(start + batch_size, n)))
            t = torch.full((len(x0),), step, dtype=torch.long)
            xt = diffusion.q_sample(schedule, x0, t, torch.randn(x0.shape, generator=g))
            correct += (model(xt.to(device), t.to(device)).argmax(1).cpu() == y).sum().item()
        accuracy[int(step)] = correct / n
    model.train(was_training)
    return accuracy


# -- training -------------------------------------------------------------------------------------------------
def classifier_step(model: NoisyClassifier, optimizer: torch.optim.Optimizer, data: InMemoryData,
                    batches: EpochBatches, schedule: NoiseSchedule, seed: int, step: int,
                    device: torch.device) -> tuple[float, float]:
    """One AdamW step of cross-entropy on (x_t, t, y); returns (loss, batch accuracy)."""
    g = step_generator(seed, step)
    x0, y = data.batch(batches.indices(step))
    t = torch.randint(0, len(schedule), (x0.shape[0],), generator=g)
    xt = diffusion.q_sample(schedule, x0, t, torch.randn(x0.shape, generator=g))
    torch.manual_seed(dropout_seed(seed, step))
    logits = model(xt.to(device), t.to(device))                   # (B, classes)
    loss = F.cross_entropy(logits, y.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), (logits.argmax(1) == y.to(device)).float().mean().item()


# Settings that may change when a run is resumed; any other difference is an error.
RESUMABLE_CHANGES = ("steps", "max_minutes", "log_every", "checkpoint_every", "eval_timesteps", "eval_examples",
                     "device")


def check_resumable(saved: ClassifierExperiment, current: ClassifierExperiment, path: Path) -> None:
    keep = {name: getattr(current.train, name) for name in RESUMABLE_CHANGES}
    same_data = dataclasses.replace(saved.data, path=current.data.path, download=current.data.download)
    if (dataclasses.replace(saved, name=current.name, data=same_data, train=dataclasses.replace(saved.train, **keep))
            != current):
        raise DifflabError(f"--resume: {path} was trained with another configuration (only "
                           f"{', '.join('train.' + n for n in RESUMABLE_CHANGES)} may change)")


def train_noisy_classifier(experiment: ClassifierExperiment, progress: bool = True,
                           resume: bool = False) -> ClassifierTrainResult:
    """Train as ``experiment`` says, from scratch or (``resume``) from the out_dir's file, continuing exactly
    (each step is a pure function of weights, optimiser state, seed and step); writes metrics.jsonl and the
    classifier file to out_dir."""
    t = experiment.train
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)                                    # initial weights
    data = build_data(experiment.data)
    experiment = dataclasses.replace(experiment, classifier=fit_to_data(experiment.classifier, data))
    schedule = build_schedule(experiment.diffusion)
    model = NoisyClassifier(experiment.classifier).to(device)
    ema = EMA(model, t.ema_halflife_images, t.ema_rampup_ratio)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    batches = EpochBatches(len(data), t.batch_size, t.seed)
    out_dir, path = Path(t.out_dir), Path(t.out_dir) / CLASSIFIER_NAME
    step = 0
    if resume:
        if not path.exists():
            raise DifflabError(f"--resume: {path} does not exist (refusing to start from scratch)")
        checkpoint = read_noisy_classifier(path)
        check_resumable(checkpoint.config, experiment, path)
        load_weights(model, checkpoint, "model")
        load_weights(ema.model, checkpoint, "ema")
        load_optimizer(optimizer, checkpoint)
        step = int(checkpoint.state["step"])
    out_dir.mkdir(parents=True, exist_ok=True)

    def save(step: int, accuracy: dict | None = None) -> Path:
        state = {"step": step, "images_seen": step * t.batch_size, "test_accuracy": accuracy or {}}
        return save_noisy_classifier(path, experiment, state, model, ema.model, optimizer)

    start = window = time.perf_counter()
    losses, stopped_by, last_loss = [], "steps", math.nan
    budget = f" (stops after {t.max_minutes:g} min)" if t.max_minutes is not None else ""
    bar = tqdm(total=t.steps, initial=step, desc=f"training classifier{budget}", unit="step", disable=not progress)
    try:
        while step < t.steps:
            last_loss, batch_accuracy = classifier_step(model, optimizer, data, batches, schedule, t.seed, step, device)
            losses.append((last_loss, batch_accuracy))
            step += 1
            ema.update(model, step * t.batch_size, t.batch_size)
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                record = {"step": step, "loss": sum(l for l, _ in losses) / len(losses),
                          "accuracy": sum(a for _, a in losses) / len(losses),
                          "images_per_s": len(losses) * t.batch_size / max(time.perf_counter() - window, 1e-9),
                          "elapsed_s": time.perf_counter() - start}
                log(out_dir, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
                window, losses = time.perf_counter(), []
            if step % t.checkpoint_every == 0:
                save(step)
            if t.max_minutes is not None and time.perf_counter() - start > 60 * t.max_minutes:
                stopped_by = "time"
                break
    finally:
        bar.close()
        save(step)                                               # also when interrupted
    accuracy = {}
    if t.eval_examples > 0:                                      # the EMA weights, as load_noisy_classifier gives
        test = build_data(experiment.data, split="test")
        accuracy = evaluate_noisy_classifier(ema.model, test, schedule, t.eval_timesteps,
                                             max_examples=t.eval_examples, seed=t.seed)
        log(out_dir, {"step": step, "test_accuracy": accuracy})
    return ClassifierTrainResult(step, save(step, accuracy), last_loss, accuracy, stopped_by)


def log(out_dir: Path, record: dict) -> None:
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train_classifier_from_yaml(path: str | Path, overrides: list[str] | None = None,
                               progress: bool = True, resume: bool = False) -> ClassifierTrainResult:
    """What ``difflab train-classifier CONFIG.yaml [--set key=value ...] [--resume]`` runs."""
    return train_noisy_classifier(load_classifier_experiment(path, overrides), progress=progress, resume=resume)
