"""Experiment configuration: plain dataclasses, one YAML file per experiment, ``--set key=value`` overrides.

Loading is strict: an unknown key, or a value of the wrong type, is an error that names the key and file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from difflab.errors import DifflabError
from difflab.typed import from_dict, to_dict

__all__ = ["Config", "ControlConfig", "DataConfig", "DiffusionConfig", "DistillConfig", "ModelConfig", "SampleConfig",
           "SuperResConfig", "TrainConfig", "UnclipConfig", "apply_overrides", "config_from_json", "from_dict",
           "load_config", "to_dict"]


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"      # fashion_mnist | folder | toy | emoji (captioned colour emoji, 32x32)
    path: str | None = None             # Fashion-MNIST folder or image folder; None searches the defaults
    image_size: int = 32
    resize: str = "pad"                 # pad | resize | area (28x28 Fashion-MNIST to image_size; area: block means,
    #                                     the downsampler of cascades)
    channels: int = 3                   # image folders: 1 (grey) or 3 (RGB)
    toy: str = "eight_gaussians"        # which 2-D set when dataset is toy
    num_points: int = 20000
    download: bool = False
    conditional: bool = False           # train with class labels (Fashion-MNIST; image folders with class subfolders)
    captions: bool = False              # train on captions (text-to-image, model.kind text_unet): Fashion-MNIST's
    #                                     templated captions, or the emoji set's names (dataset: emoji)
    held_out_captions: bool = False     # Fashion-MNIST: the held-out paraphrases instead (evaluation only)
    hflip: bool = False                 # mirror training images left-right at random (half of them)
    stream: bool = False                # image folders: read the images from disk for every batch (larger than RAM)
    autoencoder: str | None = None      # latent diffusion: a difflab autoencoder's run folder or checkpoint; the
    #                                     model trains on its scaled posterior samples (Rombach et al. 2022)
    cache_latents: bool = True          # keep the encoded data set beside the autoencoder (latents/)
    clip: str | None = None             # unCLIP (unclip.stage): a noise-aware CLIP's run or file (difflab
    #                                     train-clip); every image and caption is encoded once through it at t = 0


@dataclass
class ModelConfig:
    """The network: ``kind`` names an entry of ``difflab.nets.registry.NETWORKS`` and the section of the same
    name holds its options (checked by the registry when the network is built); in/out sizes and classes are
    taken from the data.  YAML: ``model: {kind: unet, unet: {model_channels: 24, ...}}``."""
    kind: str = "unet"
    options: dict = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: dict, prefix: str = "") -> "ModelConfig":
        kind = values.get("kind", cls.kind)
        if not isinstance(kind, str):
            raise DifflabError(f"{prefix}kind: {kind!r} is not a valid str")
        extra = sorted(set(values) - {"kind", kind})
        if extra:
            raise DifflabError(f"unknown config key '{prefix}{extra[0]}' (model.kind is {kind!r}: its options go "
                               f"under {prefix}{kind})")
        options = values.get(kind) or {}
        if not isinstance(options, dict):
            raise DifflabError(f"{prefix}{kind}: expected a mapping of network options, got {options!r}")
        return cls(kind, dict(options))

    def to_mapping(self) -> dict:
        return {"kind": self.kind, self.kind: dict(self.options)}


@dataclass
class DiffusionConfig:
    precond: str = "vp"                 # vp (a discrete schedule and a prediction type) | edm (Karras et al. 2022)
    # vp: the discrete schedule
    schedule: str = "linear"            # linear | cosine | geometric (NCSN's noise levels, Song & Ermon 2019)
    timesteps: int = 1000               # T; for geometric, the number L of noise levels
    prediction: str = "eps"             # eps | x0 | v
    learn_variance: bool = False        # the network also outputs the reverse variance (Nichol & Dhariwal 2021)
    sigma_min: float = 0.01             # geometric: smallest and largest noise level sigma (VE, data in [-1, 1]);
    sigma_max: float = 50.0             # edm: the range sampling grids span (Karras et al.: 0.002 and 80)
    # edm: Karras et al. 2022, Table 1 and Sec. 5
    sigma_data: float | None = None     # the data's standard deviation; None: measured on the training data
    p_mean: float = -1.2                # training noise levels: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 10000
    max_minutes: float | None = None    # stop (and checkpoint) after this much training time (resumes included)
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 200
    lr_schedule: str = "constant"            # constant | cosine | linear: after warm-up, decay to 0 at the run's end
    grad_clip: float | None = 1.0
    ema_halflife_images: float = 500_000.0   # EMA half-life counted in training images (Karras et al. 2024)
    ema_rampup_ratio: float | None = 0.05    # half-life at most this fraction of images seen so far
    label_dropout: float = 0.1               # conditional models: probability of the null label (CFG)
    caption_dropout: float = 0.2             # text-to-image: probability of the empty caption (CFG; GLIDE: 20%)
    loss: str = "simple"                     # simple | hybrid | vlb (Nichol & Dhariwal 2021, Sec. 3) | sliced
    #                                          (sliced score matching, Song et al. 2019, NCSN-weighted)
    sliced_projections: int = 1              # sliced: random projections v per example (M of Song et al. 2019)
    sliced_distribution: str = "rademacher"  # sliced: v's distribution, rademacher | gaussian
    vlb_weight: float = 0.001                # lambda of L_hybrid = L_simple + lambda L_vlb
    min_snr_gamma: float | None = None       # Min-SNR-gamma loss weighting of L_simple (Hang et al. 2023); None: off
    timestep_sampling: str = "uniform"       # uniform | importance (p_t ~ sqrt(E[L_t^2]), for loss: vlb)
    nonfinite: str = "stop"                  # a nan/inf loss or gradient: stop (keeping the last checkpoint) | skip
    seed: int = 0
    log_every: int = 50
    csv_log: bool = False                    # also write the log records to metrics.csv (and evals.csv)
    tensorboard: bool = False                # also write them as TensorBoard scalars to RUN/tensorboard (extra)
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 0                # also keep the newest N milestones (EMA weights only) in milestones/
    num_sample_images: int = 64
    eval_samples: int = 0                    # > 0: FID/KID/precision/recall of this many samples (the sample
    #                                          section's sampler) against the test set at every preview, logged
    #                                          to metrics.jsonl (Fashion-MNIST models; 0: off)
    # How steps are computed: the same steps up to float rounding (channels_last: other dropout masks).
    device: str = "auto"                     # cpu | cuda | auto (cuda when available); torchrun: cuda:LOCAL_RANK
    precision: str = "fp32"                  # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling, CUDA only)
    grad_accumulation: int = 1               # micro-batches per step; batch_size stays the whole (global) batch
    channels_last: bool = False              # NHWC memory format for network and images (faster convs on GPU)
    compile: bool = False                    # torch.compile the network
    gradient_checkpointing: bool = False     # U-Net: recompute each stage in the backward pass (less memory)


@dataclass
class SampleConfig:
    """How ``difflab sample`` / ``eval`` sample by default; a preset's ``sample`` section is its recommendation.
    The defaults are Karras et al. 2022's: Heun, 18 steps (35 evaluations) on their rho = 7 grid."""
    sampler: str = "heun"               # ancestral | ddim | euler | heun | dpmpp-2m | unipc | euler-ancestral | ...
    steps: int | str = 18               # steps; ancestral also takes respacing sections such as "10,10,20"
    variance: str = "beta_tilde"        # ancestral: beta | beta_tilde (Ho et al. 2020, Sec. 3.2)
    clip_x0: bool = True                # static thresholding of D to the data range (image models only)
    batch_size: int = 256
    seed: int = 0
    spacing: str = "karras"             # all but ancestral: karras | logsnr | uniform | leading | trailing
    rho: float = 7.0                    # karras spacing: Karras et al. 2022, Eq. 5
    sigma_min: float | None = None      # karras, logsnr: last noise level before the final denoising step
    sigma_max: float | None = None      # karras, logsnr: first noise level (None: the model's, at most 80)
    sigmas: tuple[float, ...] | None = None   # an explicit grid, decreasing (a final 0 is appended): replaces steps/spacing
    eta: float | None = None            # ddim, euler-ancestral (Song et al. 2021, Eq. 16); None: 0 / 1
    s_churn: float = 0.0                # euler, heun: Karras et al. 2022, Alg. 2 (0: deterministic)
    s_tmin: float = 0.0
    s_tmax: float | None = None         # None: no upper limit
    s_noise: float = 1.0
    langevin_steps: int = 10            # langevin: steps per noise level (T of Song & Ermon 2019, Alg. 1); pc: corrector steps
    step_size: float = 2e-5             # langevin: epsilon of Song & Ermon 2019, Alg. 1 (step = epsilon sigma_i^2 / sigma_L^2)
    snr: float = 0.16                   # pc: signal-to-noise ratio r of the corrector (Song et al. 2021, Alg. 5)
    guidance: float = 0.0               # classifier-free guidance weight w (guidance_scale = 1 + w elsewhere)
    control_scale: float = 1.0          # ControlNet models: the scale of the control residuals (0: the base model)
    dynamic_threshold: float | None = None   # percentile p of Saharia et al. 2022 (replaces clip_x0 when set)
    classifier: str | None = None       # noise-aware classifier file for classifier guidance (difflab train-classifier)
    classifier_scale: float = 0.0       # its gradient scale s (Dhariwal & Nichol 2021, Alg. 1 and 2)
    clip: str | None = None             # noise-aware CLIP file or run for CLIP guidance (difflab train-clip)
    clip_scale: float = 0.0             # its gradient scale s (GLIDE, Nichol et al. 2022, Sec. 2.4); needs prompts


@dataclass
class DistillConfig:
    """Few-step generators (``difflab.train.fewstep``). ``method``:

    - ``progressive``: progressive distillation (Salimans & Ho 2022, Alg. 2) of ``teacher``: rounds of
      ``start_steps`` -> ``start_steps / 2`` -> ... -> ``end_steps`` DDIM steps on the schedule's trailing grid,
      each a run of ``train.steps`` / ``minutes_per_round`` in ``train.out_dir/steps_NNNN``;
    - ``cd``: consistency distillation of ``teacher`` (Song et al. 2023, Alg. 2), its ``solver`` step between
      adjacent levels of a Karras grid of ``levels`` levels, the target an EMA (``target_ema``) of the student;
    - ``ct``: consistency training (Song et al. 2023, Alg. 3) with the N(k), mu(k) schedules of App. C;
    - ``ict``: improved consistency training (Song & Dhariwal 2023): no EMA target, pseudo-Huber distance,
      doubling N(k), log-normal level sampling, lambda = 1 / (sigma_{i+1} - sigma_i).

    The consistency models are ``diffusion.precond: consistency`` (sigma_min, sigma_max, sigma_data there)."""
    method: str | None = None           # None: ordinary diffusion training | progressive | cd | ct | ict
    teacher: str | None = None          # progressive, cd: the teacher's run folder or checkpoint
    # progressive distillation
    start_steps: int = 256              # the first student's DDIM steps (its teacher takes twice as many)
    end_steps: int = 1
    minutes_per_round: float | None = None   # each round's time budget (train.steps also bounds it)
    weighting: str = "snr_plus_one"     # x0-error weight: snr_plus_one (= v-MSE) | truncated_snr (max(SNR, 1))
    # consistency models
    solver: str = "heun"                # cd: the teacher's ODE step, heun | euler
    levels: int = 18                    # cd: N, the Karras grid's levels (Song et al. 2023: 18 on CIFAR-10)
    target_ema: float = 0.95            # cd: mu of the target network
    distance: str = "l2"                # l2 | pseudo_huber (iCT: c = 0.00054 sqrt(d))
    rho: float = 7.0                    # the Karras grid of the levels
    s0: int | None = None               # ct, ict: initial / final number of levels (None: the paper's, ct 2
    s1: int | None = None               # and 150, ict 10 and 1280)
    mu0: float = 0.9                    # ct: the target EMA at the start
    p_mean: float = -1.1                # ict: log-normal level sampling (Song & Dhariwal 2023, Sec. 3.5)
    p_std: float = 2.0


@dataclass
class ControlConfig:
    """ControlNet training (Zhang et al. 2023; ``model.kind: controlnet``): the frozen ``base`` model and the
    control images made from each training image by ``hint`` (``difflab.data.hints``). The base's
    preconditioning, schedule and conditions are the controlled model's (its label dropout is
    ``train.label_dropout``: the paper replaces half of the prompts by the empty one)."""
    base: str | None = None             # the base model's run folder or checkpoint (a U-Net)
    hint: str = "canny"                 # canny | silhouette | sketch
    canny_sigma: float = 1.0            # canny: Gaussian smoothing (pixels)
    silhouette_threshold: float = 0.05  # silhouette: grey level in [0, 1] above which a pixel is the object
    sketch_factor: int = 4              # sketch: block size of the low-resolution image


@dataclass
class SuperResConfig:
    """A super-resolution stage of a cascade (Ho et al. 2021, "CDM"): a model of ``data.image_size`` images
    conditioned on them downsampled to ``low_res`` (``difflab.superres.downsample``) and augmented by
    ``augmentation`` at a level drawn per example, uniform in [0, max_level], which the model is told."""
    low_res: int | None = None          # None: not a super-resolution model
    augmentation: str = "gaussian"      # none | gaussian | blur (Gaussian blur of max_blur pixels at level 1)
    max_level: float = 0.5
    max_blur: float = 1.0


@dataclass
class UnclipConfig:
    """unCLIP (Ramesh et al. 2022, ``difflab.clip_embeddings``): ``stage`` prior, a diffusion model of the frozen
    CLIP's (``data.clip``) image embeddings z_i given the caption's text embedding z_t (Sec. 2.2), or decoder,
    a diffusion model of images given z_i (Sec. 2.1; a decoder with a text encoder also reads the caption,
    dropped at ``train.caption_dropout``, the paper's 50%). ``embedding_dropout``: the probability that the
    condition embedding (z_t, z_i) is the null one, zeros (the paper's 10% for both)."""
    stage: str | None = None            # None: not an unCLIP model | prior | decoder
    embedding_dropout: float = 0.1


@dataclass
class Config:
    name: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    superres: SuperResConfig = field(default_factory=SuperResConfig)
    unclip: UnclipConfig = field(default_factory=UnclipConfig)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise DifflabError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DifflabError(f"--set {item!r}: '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise DifflabError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return values


# -- value ranges, checked when a config is loaded ---------------------------------------------------------------
def _positive(v) -> bool:
    return v > 0


def _at_least_one(v) -> bool:
    return v >= 1


def _non_negative(v) -> bool:
    return v >= 0


def _probability(v) -> bool:
    return 0 <= v <= 1


RANGES: dict[str, tuple[Any, str]] = {
    "data.image_size": (_at_least_one, "at least 1"),
    "data.channels": (lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    "data.num_points": (_at_least_one, "at least 1"),
    "diffusion.timesteps": (lambda v: v >= 2, "at least 2"),
    "diffusion.sigma_min": (_positive, "positive"),
    "diffusion.sigma_max": (_positive, "positive"),
    "diffusion.sigma_data": (_positive, "positive (or null: measured on the data)"),
    "diffusion.p_std": (_positive, "positive"),
    "train.steps": (_at_least_one, "at least 1"),
    "train.max_minutes": (_positive, "positive (or null: no time budget)"),
    "train.batch_size": (_at_least_one, "at least 1"),
    "train.lr": (_positive, "positive"),
    "train.weight_decay": (_non_negative, "at least 0"),
    "train.adam_betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "train.warmup_steps": (_non_negative, "at least 0"),
    "train.grad_clip": (_positive, "positive (or null: no clipping)"),
    "train.ema_halflife_images": (_positive, "positive"),
    "train.ema_rampup_ratio": (_positive, "positive (or null: no ramp-up)"),
    "train.label_dropout": (_probability, "a probability in [0, 1]"),
    "train.vlb_weight": (_non_negative, "at least 0"),
    "train.sliced_projections": (_at_least_one, "at least 1"),
    "train.sliced_distribution": (lambda v: v in ("rademacher", "gaussian"), "rademacher or gaussian"),
    "train.log_every": (_at_least_one, "at least 1"),
    "train.sample_every": (_at_least_one, "at least 1"),
    "train.checkpoint_every": (_at_least_one, "at least 1"),
    "train.num_sample_images": (_at_least_one, "at least 1"),
    "train.eval_samples": (lambda v: v == 0 or v >= 6, "0 (off) or at least 6"),
    "train.keep_checkpoints": (_non_negative, "at least 0"),
    "train.grad_accumulation": (_at_least_one, "at least 1"),
    "distill.start_steps": (_at_least_one, "at least 1"),
    "distill.end_steps": (_at_least_one, "at least 1"),
    "distill.minutes_per_round": (_positive, "positive (or null: train.steps alone)"),
    "distill.levels": (lambda v: v >= 2, "at least 2"),
    "distill.target_ema": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "distill.s0": (lambda v: v >= 2, "at least 2"),
    "distill.s1": (lambda v: v >= 2, "at least 2"),
    "distill.mu0": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "distill.p_std": (_positive, "positive"),
    "control.hint": (lambda v: v in ("canny", "silhouette", "sketch"), "canny, silhouette or sketch"),
    "control.canny_sigma": (_non_negative, "at least 0"),
    "control.silhouette_threshold": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "control.sketch_factor": (_at_least_one, "at least 1"),
    "superres.low_res": (lambda v: v >= 2, "at least 2"),
    "superres.augmentation": (lambda v: v in ("none", "gaussian", "blur"), "none, gaussian or blur"),
    "superres.max_level": (lambda v: 0 < v < 1, "in (0, 1)"),
    "superres.max_blur": (_positive, "positive"),
    "unclip.stage": (lambda v: v in ("prior", "decoder"), "prior or decoder (or null: not an unCLIP model)"),
    "unclip.embedding_dropout": (_probability, "a probability in [0, 1]"),
    "sample.batch_size": (_at_least_one, "at least 1"),
    "sample.steps": (lambda v: not isinstance(v, int) or v >= 1, "at least 1"),
    "sample.rho": (_positive, "positive"),
    "sample.sigma_min": (_positive, "positive"),
    "sample.sigma_max": (_positive, "positive"),
    "sample.sigmas": (lambda v: len(v) >= 1 and all(a > b for a, b in zip(v, v[1:])) and v[-1] > 0,
                      "a decreasing list of positive noise levels"),
    "sample.eta": (_probability, "in [0, 1]"),
    "sample.s_churn": (_non_negative, "at least 0"),
    "sample.langevin_steps": (_at_least_one, "at least 1"),
    "sample.step_size": (_positive, "positive"),
    "sample.snr": (_positive, "positive"),
    "sample.guidance": (_non_negative, "at least 0"),
    "sample.control_scale": (_non_negative, "at least 0"),
    "sample.dynamic_threshold": (lambda v: 0 < v <= 1, "a percentile in (0, 1]"),
}


def check_ranges(config: Any, prefix: str = "") -> None:
    """Every field with a rule in ``RANGES`` (by its dotted name; None always passes) is in its range."""
    import dataclasses

    for f in dataclasses.fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
        elif value is not None and key in RANGES and not RANGES[key][0](value):
            raise DifflabError(f"{key}: {value!r} must be {RANGES[key][1]}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """An experiment of dataclass ``cls`` (``Config``, or e.g. a classifier experiment) from a YAML file
    plus ``key=value`` overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DifflabError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise DifflabError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise DifflabError(f"{path}: expected a mapping of config sections at the top level")
        if not values:
            raise DifflabError(f"{path}: the config file is empty")
    values = apply_overrides(values, overrides or [])
    try:
        config = from_dict(cls, values)
        check_ranges(config)
        return config
    except DifflabError as e:
        raise DifflabError(f"{path}: {e}" if path else str(e)) from None


def config_from_json(text: str, source: str, cls: type = Config) -> Any:
    try:
        return from_dict(cls, upgrade_config(json.loads(text)))
    except (json.JSONDecodeError, DifflabError) as e:
        raise DifflabError(f"{source}: invalid difflab config ({e})") from None


def upgrade_config(values: Any) -> Any:
    """A config saved by difflab <= 0.1.0 (every network's section under ``model``) in today's layout."""
    model = values.get("model") if isinstance(values, dict) else None
    if isinstance(model, dict) and isinstance(model.get("kind"), str):
        values = {**values, "model": {"kind": model["kind"], model["kind"]: model.get(model["kind"]) or {}}}
    return values
