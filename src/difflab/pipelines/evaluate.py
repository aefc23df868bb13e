"""Evaluation pipeline: samples of a checkpoint (or saved samples) scored against Fashion-MNIST's test set.

Features and class probabilities come from the classifier shipped with difflab (its penultimate layer
stands in for Inception's pool3, see difflab.metrics.features); the test set's statistics are cached
(difflab.metrics.reference). Reported: FID, KID, precision/recall (k = 3, on equal-size sets), the
Inception-Score-style score, class accuracy of conditional samples, and optionally bits/dim on test images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.config import Config, SampleConfig
from difflab.data import load_fashion_mnist, load_image_folder, to_uint8_images
from difflab.data.folder import folder_index
from difflab.denoiser import VPPrecond
from difflab.errors import DifflabError
from difflab.files import write_text
from difflab.imageio import save_npz
from difflab.metrics import (FeatureExtractor, class_accuracy, extract, gaussian_fit, inception_score, kid,
                             load_fmnist_classifier, precision_recall, reference_stats)
from difflab.metrics.frechet import frechet_distance
from difflab.metrics.inception import InceptionExtractor
from difflab.metrics.likelihood import bits_per_dim
from difflab.pipelines.ddpm import LoadedModel, class_condition, load_model, sample

REFERENCE_DATASET = "fashion_mnist"
REFERENCE_SPLIT = "test"
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
PR_K = 3
IMAGE_SIZES = (28, 32)


@dataclass
class EvalOptions:
    n: int = 10000                          # samples to draw
    nll: int = 0                            # test images for bits/dim (0: skip)
    batch_size: int = 500                   # feature extraction batch
    seed: int = 0                           # subsets of KID and precision/recall
    cache_dir: str | Path | None = None     # reference statistics (default: difflab.metrics.default_cache_dir)
    progress: bool = True
    reference: str | Path | None = None     # an image folder to score against, instead of Fashion-MNIST's test set
    inception_weights: str | Path | None = None   # FID Inception-v3 weights (``metrics.inception``) instead of the
    #                                               shipped Fashion-MNIST classifier's features


# -- inputs ----------------------------------------------------------------------------------------------------
def load_samples_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (N, C, H, W) from an .npz holding 'images' (uint8 NHWC) and optionally 'labels'."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"samples file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DifflabError(f"{path}: is a single .npy array, expected an .npz archive with an 'images' array")
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # truncated, or object (pickled) arrays
        raise DifflabError(f"{path}: not a readable .npz file ({str(e).splitlines()[0]})") from None
    if "images" not in arrays:
        raise DifflabError(f"{path}: has no 'images' array (found: {', '.join(sorted(arrays)) or 'nothing'})")
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DifflabError(f"{path}: 'images' must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    labels = arrays.get("labels")
    if labels is not None and labels.shape != (len(images),):
        raise DifflabError(f"{path}: 'labels' has shape {labels.shape}, expected ({len(images)},)")
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels.astype(np.int64)) if labels is not None else None)


def balanced_labels(n: int, classes: int) -> torch.Tensor:
    """0, 1, ..., classes-1, 0, 1, ...: every class equally often."""
    return torch.arange(n) % classes


def check_fashion_mnist(config: Config, path: Path) -> None:
    if config.data.dataset != REFERENCE_DATASET:
        raise DifflabError(f"{path}: eval scores against Fashion-MNIST, but the checkpoint was trained on "
                           f"data.dataset {config.data.dataset!r}")


def draw_samples(loaded: LoadedModel, n: int, options: SampleConfig, device: str,
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n uint8 samples of the checkpoint; balanced class labels when it is class-conditional."""
    classes = loaded.spec.num_classes()
    labels = balanced_labels(n, classes) if classes else None
    images = sample(loaded, n, options, class_condition(labels), device, progress=progress)
    return to_uint8_images(images), labels


# -- scoring -----------------------------------------------------------------------------------------------------
def folder_reference(folder: str | Path, images: torch.Tensor, extractor: FeatureExtractor, options: EvalOptions):
    """Statistics of an image folder's images at the samples' size and channels, cached under a digest of the
    folder's file names, sizes and modification times (an edited folder gets new statistics)."""
    files, _, _ = folder_index(folder)
    digest = hashlib.sha256("|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode())
    size, channels = images.shape[-1], images.shape[1]
    return reference_stats(f"folder-{digest.hexdigest()[:16]}", f"c{channels}", size, extractor,
                           lambda: load_image_folder(folder, size, channels).data, options.cache_dir,
                           options.batch_size, options.progress)


def reference_for(images: torch.Tensor, extractor: FeatureExtractor, resize: str, options: EvalOptions):
    size = images.shape[-1]
    if options.reference is not None:
        return folder_reference(options.reference, images, extractor, options)
    if images.shape[1] != 1 or images.shape[-2] != size or size not in IMAGE_SIZES:
        raise DifflabError(f"Fashion-MNIST samples must be grey {IMAGE_SIZES[0]}x{IMAGE_SIZES[0]} or "
                           f"{IMAGE_SIZES[1]}x{IMAGE_SIZES[1]} images, got shape {tuple(images.shape[1:])} (C, H, W)")
    name = REFERENCE_DATASET if resize == "pad" or size == 28 else f"{REFERENCE_DATASET}_{resize}"
    return reference_stats(name, REFERENCE_SPLIT, size, extractor,
                           lambda: load_fashion_mnist(REFERENCE_SPLIT, image_size=size, resize=resize).data,
                           options.cache_dir, options.batch_size, options.progress)


def score_images(images: torch.Tensor, labels: torch.Tensor | None, options: EvalOptions,
                 extractor: FeatureExtractor | None = None, resize: str = "pad") -> dict:
    """FID, KID, precision/recall, IS-style score (and class accuracy given labels) of uint8 images."""
    if len(images) < 2 * PR_K:
        raise DifflabError(f"need at least {2 * PR_K} images to score, got {len(images)}")
    if extractor is None:
        extractor = (InceptionExtractor(options.inception_weights) if options.inception_weights
                     else load_fmnist_classifier())
    reference = reference_for(images, extractor, resize, options)
    outputs = extract(extractor, images, options.batch_size, options.progress, what="samples")
    features = outputs["features"]
    rng = np.random.default_rng(options.seed)
    real_subset = reference.features[rng.choice(len(reference.features), min(len(features),
                                                len(reference.features)), replace=False)]
    kid_result = kid(reference.features, features, KID_SUBSETS, KID_SUBSET_SIZE, options.seed)
    pr = precision_recall(real_subset, features, PR_K)
    metrics = {"fid": frechet_distance(reference.fit, gaussian_fit(features, "sample features")),
               "kid": kid_result.mean, "kid_std": kid_result.std, "kid_subset_size": kid_result.subset_size,
               "precision": pr.precision, "recall": pr.recall, "pr_k": pr.k, "pr_set_size": len(real_subset)}
    if "probs" in outputs:
        score = inception_score(outputs["probs"], splits=min(10, len(images)))
        metrics.update(is_score=score.mean, is_score_std=score.std)
        if labels is not None:
            metrics["class_accuracy"] = class_accuracy(outputs["probs"], labels)
    return {"metrics": metrics, "n": len(images), "image_size": int(images.shape[-1]),
            "features": extractor.name, "reference": f"{options.reference or f'{REFERENCE_DATASET}/{REFERENCE_SPLIT}'} "
            f"({len(reference.features)} images)", **extractor_info(extractor)}


def extractor_info(extractor: FeatureExtractor) -> dict:
    metadata = getattr(extractor, "metadata", {})
    return {"classifier_test_accuracy": metadata["test_accuracy"]} if "test_accuracy" in metadata else {}


def nll_on_test_set(loaded: LoadedModel, count: int, sampling: SampleConfig, progress: bool) -> dict:
    """Bits/dim of the bound on the first ``count`` test images of the checkpoint's data, for the reverse
    process that ``sampling`` describes (its fixed variance, and whether x0_hat is clipped to [-1, 1])."""
    data = load_fashion_mnist(REFERENCE_SPLIT, loaded.config.data.path, loaded.config.data.image_size,
                              loaded.config.data.resize)
    count = min(count, len(data))
    if loaded.spec.is_latent:
        raise DifflabError(f"--nll: {loaded.path} is a latent model; its bound would be on latents, not pixels")
    if not isinstance(loaded.denoiser.precond, VPPrecond):
        raise DifflabError(f"--nll: the bound needs a model on a discrete schedule, {loaded.path} is "
                           f"{loaded.denoiser.precond.kind}")
    x0, _ = data.batch(torch.arange(count))
    result = bits_per_dim(loaded.denoiser, x0, sampling.variance, batch_size=1024, clip_x0=sampling.clip_x0,
                          progress=progress)
    return {"bits_per_dim": result.mean, "bits_per_dim_stderr": result.stderr, "nll_images": count,
            "nll_variance": sampling.variance, "nll_clip_x0": sampling.clip_x0,
            "bits_per_dim_prior": result.prior, "bits_per_dim_decoder": result.decoder}


# -- the two entry points ----------------------------------------------------------------------------------------
def evaluate(checkpoint: str | Path, options: EvalOptions | None = None, sampling: dict | SampleConfig | None = None,
             weights: str = "ema", device: str = "cpu", save_samples_to: str | Path | None = None) -> dict:
    """Sample a checkpoint and score it; ``sampling`` overrides its config's sample section (sampler, steps, ...;
    None values keep the config's), or replaces it (a ``SampleConfig``)."""
    options = options or EvalOptions()
    loaded = load_model(checkpoint, weights, device)
    if options.reference is None:
        check_fashion_mnist(loaded.config, loaded.path)
    if isinstance(sampling, SampleConfig):
        sample_options = sampling
    else:
        sample_options = dataclasses.replace(loaded.config.sample,
                                             **{k: v for k, v in (sampling or {}).items() if v is not None})
    start = time.perf_counter()
    images, labels = draw_samples(loaded, options.n, sample_options, device, options.progress)
    sampling_s = time.perf_counter() - start
    if save_samples_to is not None:
        extra = {"labels": labels.numpy()} if labels is not None else {}
        save_npz({"images": images.permute(0, 2, 3, 1).numpy(), **extra}, save_samples_to)
    report = score_images(images, labels, options, resize=loaded.config.data.resize)
    if options.nll:
        nll = nll_on_test_set(loaded, options.nll, sample_options, options.progress)
        report["metrics"].update(nll)
    report.update(checkpoint=str(loaded.path), step=loaded.step, weights=loaded.weights,
                  sampling=dataclasses.asdict(sample_options), sampling_seconds=round(sampling_s, 2))
    return report


def evaluate_samples(path: str | Path, options: EvalOptions | None = None) -> dict:
    """Score saved samples (.npz with uint8 NHWC 'images', optionally 'labels')."""
    images, labels = load_samples_npz(path)
    report = score_images(images, labels, options or EvalOptions())
    report["samples"] = str(path)
    return report


def default_report_path(report: dict) -> Path:
    """<samples>_eval.json beside scored samples; eval_<sampler>_<steps>steps_n<N>.json beside a checkpoint."""
    if "samples" in report:
        samples = Path(report["samples"])
        return samples.with_name(samples.stem + "_eval.json")
    sampling = report["sampling"]
    name = f"eval_{sampling['sampler']}_{sampling['steps']}steps_n{report['n']}.json"
    return Path(report["checkpoint"]).parent / name


def to_json(value, indent: int | None = 2) -> str:
    """Strict JSON: NaN and infinities (e.g. the standard error of one image) become null."""
    clean = json.loads(json.dumps(value, default=float), parse_constant=lambda constant: None)
    return json.dumps(clean, indent=indent, allow_nan=False)


def write_report(report: dict, path: str | Path) -> Path:
    """The report as JSON, written atomically."""
    return write_text(path, to_json(report) + "\n")
