"""Training the noise-aware CLIP (GLIDE, Nichol et al. 2022, Sec. 2.4: CLIP models "trained on noised images")
that CLIP guidance uses (``clip_guidance.py``) and that gives image embeddings of clean images (t = 0).

Each step: a batch of captioned images (x_0, c), t uniform on the guided model's schedule, x_t = q_sample(x_0, t,
eps) except a ``train.clean_fraction`` of clean rows, and CLIP's symmetric contrastive loss of the batch's
image-caption logits with identical captions as shared positives (``objectives.NoisyCLIPObjective``), run by
the common training loop (``trainer.py``: AdamW, warm-up, EMA, time budget, exact resume, logs). The schedule is
saved with the weights; ``load_noisy_clip`` returns it, so guidance feeds the CLIP the inputs it was trained on.

The file is ``noisy_clip.safetensors``: model, EMA and optimiser tensors, the experiment config and the training
state (step, test evaluation) as JSON in its metadata, written atomically like checkpoints. A frozen MiniLM
text tower is not in it (its weights come from its package) and encodes the data's captions once, cached in
RUN/text_embeddings.safetensors, as a frozen-encoder text-to-image run does.

After training, the EMA weights are scored on the test split at each of ``train.eval_timesteps``
(``evaluate_noisy_clip``): image -> caption retrieval among the distinct captions of the scored images, and
zero-shot caption-class accuracy (each class's captions' embeddings averaged, Radford et al. 2021, Sec. 3.1.4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab import diffusion
from difflab.build import build_data, build_schedule
from difflab.checkpoint import Checkpoint, load_weights, read_experiment_file, save_checkpoint
from difflab.config import DataConfig, DiffusionConfig, TrainConfig, load_config
from difflab.data import InMemoryData
from difflab.data.base import CaptionedData
from difflab.errors import DifflabError
from difflab.nets.clip import NoisyCLIP, NoisyCLIPConfig
from difflab.schedules import NoiseSchedule
from difflab.train.diffusion import encode_captions
from difflab.train.distributed import single_process
from difflab.train.objectives import NoisyCLIPObjective
from difflab.train.trainer import RESUMABLE_CHANGES, Trainer

FORMAT = "difflab-noisy-clip/1"
CLIP_NAME = "noisy_clip.safetensors"


@dataclass
class ClipTrainConfig(TrainConfig):
    """The training loop's settings with CLIP's defaults (Radford et al. 2021, Sec. 2.5: AdamW, decoupled weight
    decay 0.2, linear warm-up, cosine decay; its 32,768-pair batches scaled down to 128), and the test evaluation
    after training. The trainer decays every parameter, CLIP exempts gains, biases and the temperature."""
    out_dir: str = "runs/noisy_clip"
    steps: int = 5000
    batch_size: int = 128                   # the contrastive batch: 127 negatives per image
    lr: float = 5e-4                        # CLIP's ResNet-50: 5e-4
    weight_decay: float = 0.2
    warmup_steps: int = 100                 # CLIP: 2000 of ~400,000
    lr_schedule: str = "cosine"
    grad_clip: float | None = None
    ema_halflife_images: float = 20_000.0
    ema_rampup_ratio: float | None = 0.1
    checkpoint_every: int = 500
    sample_every: int = 10 ** 12            # no previews
    clean_fraction: float = 0.25            # rows trained on x_0 itself at t = 0 (a clean-image CLIP too)
    eval_timesteps: tuple[int, ...] = (0, 250, 500, 750, 999)   # test retrieval at these t after training
    eval_examples: int = 2000               # test-split examples scored (0: no evaluation)


def captioned_data() -> DataConfig:
    return DataConfig(captions=True)


@dataclass
class ClipExperiment:
    name: str = "noisy_clip"
    data: DataConfig = field(default_factory=captioned_data)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)   # the guided model's schedule
    clip: NoisyCLIPConfig = field(default_factory=NoisyCLIPConfig)
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)


@dataclass
class ClipTrainResult:
    step: int
    checkpoint: Path
    last_loss: float
    evaluation: dict                        # evaluate_noisy_clip's record (empty without evaluation)
    stopped_by: str                         # "steps" or "time"


# -- config ---------------------------------------------------------------------------------------------------
def load_clip_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ClipExperiment:
    """A YAML experiment file plus ``--set key=value`` overrides, strictly checked like ``load_config``."""
    return load_config(path, overrides, cls=ClipExperiment)


def fit_to_data(config: NoisyCLIPConfig, data: InMemoryData) -> NoisyCLIPConfig:
    """Input channels and image size taken from the data (as ``build_net`` does for the U-Net)."""
    if not isinstance(data, CaptionedData):
        raise DifflabError(f"a noise-aware CLIP needs captioned images; data set {data.name!r} has none "
                           "(use data.captions: true)")
    channels, size, _ = data.sample_shape
    return dataclasses.replace(config, in_channels=channels, image_size=size)


# -- saving and loading ---------------------------------------------------------------------------------------
def save_noisy_clip(path: str | Path, experiment: ClipExperiment, state: dict, model: NoisyCLIP,
                    ema_model: NoisyCLIP | None = None, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Weights (``model.``, ``ema.``, ``optimizer.``) with the experiment and ``state`` as JSON metadata,
    written atomically, like a diffusion checkpoint; the experiment also as ``config.json`` beside it."""
    return save_checkpoint(path, experiment, state, model, ema_model, optimizer, file_format=FORMAT)


def read_noisy_clip(path: str | Path) -> Checkpoint:
    """The file's tensors, state and experiment (a ``ClipExperiment`` in ``Checkpoint.config``). ``path`` is the
    file or the run folder holding it."""
    return read_experiment_file(path, CLIP_NAME, FORMAT, "noise-aware CLIP", ClipExperiment)


def load_noisy_clip(path: str | Path, weights: str = "ema") -> tuple[NoisyCLIP, DiffusionConfig]:
    """The CLIP (in eval mode, no parameter gradients) and the diffusion config it was trained for.
    ``weights``: "ema" (the default; the raw weights when the file has none) or "model"."""
    if weights not in ("ema", "model"):
        raise DifflabError(f"unknown CLIP weights {weights!r}; choose 'ema' or 'model'")
    checkpoint = read_noisy_clip(path)
    experiment: ClipExperiment = checkpoint.config
    model = NoisyCLIP(experiment.clip)
    load_weights(model, checkpoint, "ema" if weights == "ema" and checkpoint.has_ema else "model")
    return model.eval().requires_grad_(False), experiment.diffusion


# -- evaluation -----------------------------------------------------------------------------------------------
def caption_pool(data: CaptionedData, n: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The distinct captions of the first ``n`` examples (in order of appearance), each example's index into
    them (n,), and each caption's class (the label of its first image; every class has its own names)."""
    captions = list(data.captions[:n])
    pool = list(dict.fromkeys(captions))
    position = {caption: i for i, caption in enumerate(pool)}
    index = torch.tensor([position[c] for c in captions], dtype=torch.long)
    first = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    return pool, index, data.labels[torch.tensor([first[c] for c in pool], dtype=torch.long)]


@torch.no_grad()
def evaluate_noisy_clip(model: NoisyCLIP, data: CaptionedData, schedule: NoiseSchedule,
                        timesteps: tuple[int, ...] = (0, 250, 500, 750, 999), batch_size: int = 500,
                        max_examples: int | None = None, seed: int = 0) -> dict:
    """The CLIP on ``data``'s images noised to each of ``timesteps`` (fixed noise per seed), against the distinct
    captions of those examples (the pool):

    - ``retrieval_top1``: the fraction of images whose best-scoring caption of the pool is exactly their own (a
      strict measure: another caption naming the same class and true attributes counts as a miss);
    - ``retrieved_class``: the fraction whose best-scoring caption names their class;
    - ``class_accuracy``: zero-shot classification, the class whose captions' mean embedding (renormalised:
      Radford et al. 2021's prompt ensembling, Sec. 3.1.4) scores highest against the image.

    Each is a dict timestep -> fraction; ``captions`` is the pool's size, ``examples`` the images scored."""
    n = len(data) if max_examples is None else min(max_examples, len(data))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pool, index, pool_class = caption_pool(data, n)
    text = torch.cat([model.encode_text(model.tokenize(pool[i:i + batch_size]).to(device))
                      for i in range(0, len(pool), batch_size)])                        # (P, d)
    classes = sorted(set(pool_class.tolist()))
    class_text = F.normalize(torch.stack([text[(pool_class == k).to(device)].mean(0) for k in classes]), dim=-1)
    pool_class, classes = pool_class.to(device), torch.tensor(classes, device=device)
    record = {"retrieval_top1": {}, "retrieved_class": {}, "class_accuracy": {}, "captions": len(pool),
              "examples": n}
    for step in timesteps:
        g = torch.Generator().manual_seed(seed)
        hits = {name: 0 for name in ("retrieval_top1", "retrieved_class", "class_accuracy")}
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n))
            x0, _ = InMemoryData.batch(data, rows)                    # the images alone (no tokens needed)
            t = torch.full((len(x0),), step, dtype=torch.long)
            xt = diffusion.q_sample(schedule, x0, t, torch.randn(x0.shape, generator=g))
            image = model.encode_image(xt.to(device), t.to(device))                     # (b, d)
            best = (image @ text.T).argmax(1)                                           # (b,) into the pool
            labels = data.labels[rows].to(device)
            hits["retrieval_top1"] += (best == index[rows].to(device)).sum().item()
            hits["retrieved_class"] += (pool_class[best] == labels).sum().item()
            hits["class_accuracy"] += (classes[(image @ class_text.T).argmax(1)] == labels).sum().item()
        for name, count in hits.items():
            record[name][int(step)] = count / n
    model.train(was_training)
    return record


# -- training -------------------------------------------------------------------------------------------------
RESUMABLE = RESUMABLE_CHANGES | {"train.eval_timesteps", "train.eval_examples"}


def train_noisy_clip(experiment: ClipExperiment, progress: bool = True, resume: bool = False,
                     overwrite: bool = False) -> ClipTrainResult:
    """Train as ``experiment`` says, from scratch or (``resume``) from the out_dir's file, continuing exactly;
    writes metrics.jsonl and the CLIP file to out_dir, then scores the EMA weights on the test split."""
    t = experiment.train
    if t.grad_accumulation != 1:
        raise DifflabError("train.grad_accumulation: the contrastive batch is the whole step's batch; set it to 1 "
                           "(a smaller micro-batch would be a smaller contrastive batch)")
    dist = single_process(t.device)
    torch.manual_seed(t.seed)                                    # initial weights
    data = build_data(experiment.data)
    experiment = dataclasses.replace(experiment, clip=fit_to_data(experiment.clip, data))
    schedule = build_schedule(experiment.diffusion)
    clip = NoisyCLIP(experiment.clip)
    data.tokenize(clip.tokenize)                                 # the captions in the CLIP's tokenizer, once
    try:
        objective = NoisyCLIPObjective(clip.to(dist.device), schedule, t.clean_fraction)
    except ValueError as e:
        raise DifflabError(f"train.clean_fraction: {e}") from None
    trainer = Trainer(experiment, objective, data, resume=resume, progress=progress, dist=dist,
                      file_format=FORMAT, checkpoint_name=CLIP_NAME, resumable=RESUMABLE, overwrite=overwrite)
    encode_captions(clip, data, Path(t.out_dir))                 # a frozen MiniLM: once, cached in the run
    result = trainer.run()
    evaluation = {}
    if t.eval_examples > 0:                                      # the EMA weights, as load_noisy_clip gives
        test = build_data(experiment.data, split="test")
        evaluation = evaluate_noisy_clip(trainer.ema.model, test, schedule, t.eval_timesteps,
                                         max_examples=t.eval_examples, seed=t.seed)
        trainer.log({"step": result.step, "test_retrieval": evaluation})
        trainer.extra_state["test_retrieval"] = evaluation
        trainer.save()
    return ClipTrainResult(result.step, result.checkpoint, result.last_loss, evaluation, result.stopped_by)


def train_clip_from_yaml(path: str | Path, overrides: list[str] | None = None, progress: bool = True,
                         resume: bool = False, overwrite: bool = False) -> ClipTrainResult:
    """What ``difflab train-clip CONFIG.yaml [--set key=value ...] [--resume | --overwrite]`` runs."""
    return train_noisy_clip(load_clip_experiment(path, overrides), progress=progress, resume=resume,
                            overwrite=overwrite)
