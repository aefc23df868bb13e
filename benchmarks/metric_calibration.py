"""What values of FID, KID, precision/recall and the IS-style score mean on Fashion-MNIST, in difflab's
default feature space (the shipped classifier's penultimate layer, difflab.metrics.features).

Real training images are scored against the test set (the reference of ``difflab eval``) as they are,
blurred (Gaussian, sigma in pixels) and noised (Gaussian, sigma in grey levels of 0..255), each with
N = 1k, 5k and 10k images: real images give the floor of each metric at that N, the degradations show
how fast each metric reacts; images of uniform noise show a failure mode of precision (they collapse to
one point of feature space that may fall inside the real manifold: high precision, zero recall).
Precision/recall use k = 3 and equal-size sets (N test images); KID uses 100 subsets of min(N, 1000).
Results: ``benchmarks/results/metric_calibration.{json,md}``. Usage::

    OMP_NUM_THREADS=1 python benchmarks/metric_calibration.py [--sizes 1000 5000 10000]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.data import load_fashion_mnist  # noqa: E402
from difflab.metrics import (class_accuracy, extract, gaussian_fit, inception_score, kid,  # noqa: E402
                             load_fmnist_classifier, precision_recall, reference_stats)
from difflab.metrics.frechet import frechet_distance  # noqa: E402

BLUR_SIGMAS = (0.5, 1.0)          # pixels
NOISE_SIGMAS = (8.0, 32.0)        # grey levels


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    out = images.float()
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.reshape(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.reshape(1, 1, -1, 1))
    return out.round().clamp(0, 255).to(torch.uint8)


def gaussian_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noisy = images.float() + sigma * torch.randn(images.shape, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


def variants(images: torch.Tensor) -> dict[str, torch.Tensor]:
    sets = {"train (real)": images}
    sets.update({f"blur sigma={s:g}px": gaussian_blur(images, s) for s in BLUR_SIGMAS})
    sets.update({f"noise sigma={s:g}/255": gaussian_noise(images, s) for s in NOISE_SIGMAS})
    sets["uniform noise images"] = torch.randint(0, 256, images.shape, dtype=torch.uint8,
                                                 generator=torch.Generator().manual_seed(0))
    return sets


def score(reference, outputs: dict, labels: torch.Tensor, n: int, rng: np.random.Generator) -> dict:
    features, probs = outputs["features"][:n], outputs["probs"][:n]
    real = reference.features[rng.choice(len(reference.features), n, replace=False)]
    kid_result = kid(reference.features, features, subsets=100, subset_size=1000)
    pr = precision_recall(real, features, k=3)
    return {"fid": frechet_distance(reference.fit, gaussian_fit(features)), "kid": kid_result.mean,
            "kid_std": kid_result.std, "precision": pr.precision, "recall": pr.recall,
            "is_score": inception_score(probs).mean, "class_accuracy": class_accuracy(probs, labels[:n])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    extractor = load_fmnist_classifier()
    reference = reference_stats("fashion_mnist", "test", 28, extractor,
                                lambda: load_fashion_mnist("test", image_size=28).data, args.cache_dir)
    train = load_fashion_mnist("train", image_size=28)
    count = max(args.sizes)
    rows = []
    for name, images in variants(train.data[:count]).items():
        outputs = extract(extractor, images)
        for n in args.sizes:
            metrics = score(reference, outputs, train.labels, n, np.random.default_rng(0))
            rows.append({"set": name, "n": n, **metrics})
            print(f"{name:22s} N={n:5d} FID {metrics['fid']:8.4g}  KID {metrics['kid']:.5f}  "
                  f"P {metrics['precision']:.3f}  R {metrics['recall']:.3f}  IS {metrics['is_score']:.2f}  "
                  f"acc {metrics['class_accuracy']:.3f}", flush=True)
    data = {"benchmark": "metric_calibration", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": command_line(), "machine": machine_info(), "features": extractor.name,
            "classifier": extractor.metadata, "reference": f"fashion_mnist/test ({len(reference.features)} images)",
            "seconds": round(time.perf_counter() - start, 1), "rows": rows}
    table = markdown_table(
        ["set (vs test)", "N", "FID", "KID x 1e3 (± std)", "precision", "recall", "IS-style", "class acc."],
        [[r["set"], r["n"], f"{r['fid']:.4g}", f"{1e3 * r['kid']:.3f} ± {1e3 * r['kid_std']:.3f}",
          f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['is_score']:.2f}", f"{r['class_accuracy']:.3f}"]
         for r in rows])
    markdown = (f"# Metric calibration on Fashion-MNIST\n\nFeatures: `{extractor.name}` (penultimate layer of the "
                f"shipped classifier, test accuracy {extractor.metadata.get('test_accuracy')}); reference: "
                f"{data['reference']}. Precision/recall: k = 3 on N test vs N candidate images; KID: 100 subsets "
                f"of min(N, 1000). Blur: Gaussian, sigma in pixels; noise: Gaussian, sigma in grey levels.\n\n"
                f"{table}\n\n`{data['command']}` ({data['seconds']} s on {data['machine']['cpu']}, "
                f"{data['machine']['torch_threads']} thread(s))\n")
    for path in write_results("metric_calibration", data, markdown):
        print(path)


if __name__ == "__main__":
    main()
