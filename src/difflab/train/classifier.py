"""Training the noise-aware classifier p(y | x_t, t) that classifier guidance uses (Dhariwal & Nichol 2021,
Sec. 4.1: "we train a classifier on noisy images x_t ... with the same noise distribution as the diffusion
model"; ADM's ``scripts/classifier_train.py``).

Each step: a batch (x_0, y) of labelled images, t uniform on the diffusion model's schedule, x_t =
q_sample(x_0, t, eps), cross-entropy of classifier(x_t, t) against y (``objectives.NoisyClassifierObjective``),
run by the common training loop (``trainer.py``: AdamW, EMA, time budget, exact resume, logs). The schedule is
saved with the weights; ``load_noisy_classifier`` returns it, so guidance feeds the classifier the inputs it
was trained on (``classifier_guidance.py``).

The file is ``noisy_classifier.safetensors``: model, EMA and optimiser tensors, the experiment config and
the training state (step, test accuracies) as JSON in its metadata, written atomically like checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflab import diffusion
from difflab.build import build_data, build_schedule
from difflab.checkpoint import Checkpoint, load_weights, read_experiment_file, save_checkpoint
from difflab.config import DataConfig, DiffusionConfig, TrainConfig, load_config
from difflab.data import InMemoryData
from difflab.errors import DifflabError
from difflab.nets.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from difflab.schedules import NoiseSchedule
from difflab.train.distributed import single_process
from difflab.train.objectives import NoisyClassifierObjective
from difflab.train.trainer import RESUMABLE_CHANGES, Trainer

FORMAT = "difflab-noisy-classifier/1"
CLASSIFIER_NAME = "noisy_classifier.safetensors"


@dataclass
class ClassifierTrainConfig(TrainConfig):
    """The training loop's settings with a classifier's defaults (ADM's: AdamW 3e-4, weight decay 0.05,
    constant rate, no warm-up or clipping), and the test evaluation after training."""
    out_dir: str = "runs/noisy_classifier"
    steps: int = 5000
    batch_size: int = 64
    lr: float = 3e-4                        # ADM's classifiers: 3e-4 (6e-4 at 64x64), AdamW
    weight_decay: float = 0.05
    warmup_steps: int = 0
    grad_clip: float | None = None
    ema_halflife_images: float = 20_000.0
    ema_rampup_ratio: float | None = 0.1
    checkpoint_every: int = 500
    sample_every: int = 10 ** 12            # no previews
    eval_timesteps: tuple[int, ...] = (0, 250, 500, 750, 999)   # test accuracy at these t after training
    eval_examples: int = 2000               # test-split examples scored (0: no evaluation)


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
    return read_experiment_file(path, CLASSIFIER_NAME, FORMAT, "noise-aware classifier", ClassifierExperiment)


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
RESUMABLE = RESUMABLE_CHANGES | {"train.eval_timesteps", "train.eval_examples"}


def train_noisy_classifier(experiment: ClassifierExperiment, progress: bool = True,
                           resume: bool = False, overwrite: bool = False) -> ClassifierTrainResult:
    """Train as ``experiment`` says, from scratch or (``resume``) from the out_dir's file, continuing exactly;
    writes metrics.jsonl and the classifier file to out_dir, then scores the EMA weights on the test split."""
    t = experiment.train
    dist = single_process(t.device)
    torch.manual_seed(t.seed)                                    # initial weights
    data = build_data(experiment.data)
    experiment = dataclasses.replace(experiment, classifier=fit_to_data(experiment.classifier, data))
    schedule = build_schedule(experiment.diffusion)
    objective = NoisyClassifierObjective(NoisyClassifier(experiment.classifier).to(dist.device), schedule)
    trainer = Trainer(experiment, objective, data, resume=resume, progress=progress, dist=dist,
                      file_format=FORMAT, checkpoint_name=CLASSIFIER_NAME, resumable=RESUMABLE, overwrite=overwrite)
    result = trainer.run()
    accuracy = {}
    if t.eval_examples > 0:                                      # the EMA weights, as load_noisy_classifier gives
        test = build_data(experiment.data, split="test")
        accuracy = evaluate_noisy_classifier(trainer.ema.model, test, schedule, t.eval_timesteps,
                                             max_examples=t.eval_examples, seed=t.seed)
        trainer.log({"step": result.step, "test_accuracy": accuracy})
        trainer.extra_state["test_accuracy"] = accuracy
        trainer.save()
    return ClassifierTrainResult(result.step, result.checkpoint, result.last_loss, accuracy, result.stopped_by)


def train_classifier_from_yaml(path: str | Path, overrides: list[str] | None = None,
                               progress: bool = True, resume: bool = False,
                               overwrite: bool = False) -> ClassifierTrainResult:
    """What ``difflab train-classifier CONFIG.yaml [--set key=value ...] [--resume | --overwrite]`` runs."""
    return train_noisy_classifier(load_classifier_experiment(path, overrides), progress=progress, resume=resume,
                                  overwrite=overwrite)
