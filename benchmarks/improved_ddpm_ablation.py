"""Nichol & Dhariwal 2021 ("Improved DDPM") ablation on Fashion-MNIST:
(linear, cosine) x (L_simple with a fixed variance, L_hybrid with a learned variance), equal training budgets.

Each variant is the Fashion-MNIST preset (configs/fashion_mnist.yaml) at a third of its cost (16 base
channels, multipliers 1-2-2: sampling 1000 steps for every variant has to fit a CPU budget) with its
schedule and objective changed, trained for the same number of steps (same images seen), then:
- test NLL in bits/dim through the full bound (``difflab.metrics.likelihood``) on the first ``--nll`` test
  images, with its standard error (fixed-variance models: sigma^2 = beta and beta-tilde), with x0_hat clipped
  to [-1, 1] as in the paper's ``image_nll.py`` (unclipped, the cosine schedule's last step, where beta is
  clipped at 0.999 and 1 / sqrt(alpha-bar) ~ 2e4, turns eps errors into bits: +3 bits/dim here);
- FID and KID (shipped classifier's features, Fashion-MNIST test set) of ``--n`` ancestral samples at each
  of ``--sample-steps`` respaced steps (``--n-full`` samples at the full T steps, to fit the CPU budget) (fixed-variance models with both fixed variances, except at the full
  T steps, where only beta is sampled: there the two give nearly the same samples, Ho et al. 2020, Sec. 4.3).

Work already done is kept in <out-dir>/<variant>/ablation.json, so the script can be stopped and rerun.

    python benchmarks/improved_ddpm_ablation.py --train-steps 600 --n 250 --n-full 100 --nll 32

Every variant's bits/dim are measured on the same test images with the same noise, so differences between
variants are paired: the report gives each one's difference to linear/L_simple with its paired standard error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.checkpoint import CHECKPOINT_NAME, load_checkpoint  # noqa: E402
from difflab.config import load_config  # noqa: E402
from difflab.pipelines.ddpm import load_model  # noqa: E402
from difflab.data import load_fashion_mnist  # noqa: E402
from difflab.metrics.likelihood import bits_per_dim  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, draw_samples, score_images  # noqa: E402
from difflab.train.diffusion import diffusion_trainer  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist.yaml"
MODEL = ["model.unet.model_channels=16", "model.unet.channel_mult=[1, 2, 2]"]
# the preset as it was when these results were made (Ho et al.'s eps and L_simple, batch 64 at a constant
# 1e-3); the preset has since moved on for the budget race (v, Min-SNR-5, batch 32 at a decayed 2e-3)
RECIPE = ["diffusion.prediction=eps", "train.batch_size=64", "train.lr=0.001", "train.lr_schedule=constant",
          "train.min_snr_gamma=null"]
VARIANTS = {
    "linear_simple": ["diffusion.schedule=linear"],
    "cosine_simple": ["diffusion.schedule=cosine"],
    "linear_hybrid": ["diffusion.schedule=linear", "diffusion.learn_variance=true", "train.loss=hybrid"],
    "cosine_hybrid": ["diffusion.schedule=cosine", "diffusion.learn_variance=true", "train.loss=hybrid"],
}
FIXED_VARIANCES = ("beta", "beta_tilde")


def train(name: str, out_dir: Path, steps: int) -> Path:
    """Train (or finish training) one variant for exactly ``steps`` steps; returns its checkpoint."""
    overrides = MODEL + RECIPE + VARIANTS[name] + [f"train.out_dir={out_dir}", f"train.steps={steps}",
                                                   "train.max_minutes=null", "train.sample_every=1000000",
                                                   f"name=ablation_{name}"]
    config = load_config(PRESET, overrides)
    path = out_dir / CHECKPOINT_NAME
    resume = path.exists()
    if resume and load_checkpoint(path).state["step"] >= steps:
        return path
    start = time.perf_counter()
    diffusion_trainer(config, resume=resume).run()
    print(f"{name}: trained {steps} steps in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def evaluate(name: str, checkpoint: Path, n: int, n_full: int, nll: int, sample_steps: list[int]) -> dict:
    """NLL and FID/KID of one variant, resuming from its ablation.json."""
    record_path = checkpoint.parent / "ablation.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"nll": {}, "fid": {}}
    loaded = load_model(checkpoint)
    variances = ("learned",) if loaded.config.diffusion.learn_variance else FIXED_VARIANCES
    options = EvalOptions(n=n, progress=False)
    for variance in variances:
        if nll and f"{variance}/{nll}/clip" not in record["nll"]:
            x0, _ = load_fashion_mnist("test", image_size=loaded.config.data.image_size).batch(torch.arange(nll))
            start = time.perf_counter()
            result = bits_per_dim(loaded.denoiser, x0, "beta" if variance == "learned" else variance, clip_x0=True,
                                  progress=True)
            record["nll"][f"{variance}/{nll}/clip"] = {"bits_per_dim": result.mean, "bits_per_dim_stderr": result.stderr,
                                                   "per_image": result.per_image.tolist(),
                                                   "prior": result.prior, "decoder": result.decoder,
                                                   "seconds": time.perf_counter() - start}
            record_path.write_text(json.dumps(record, indent=1))
        for steps in sample_steps:
            count = n_full if steps >= len(loaded.denoiser.precond.schedule) else n
            key = f"{variance}/{steps}/{count}"
            if key in record["fid"] or (variance == "beta_tilde" and steps >= len(loaded.denoiser.precond.schedule)):
                continue
            sampling = dataclasses.replace(loaded.config.sample, sampler="ancestral", steps=steps,
                                           variance=variance if variance != "learned" else "beta", batch_size=250)
            start = time.perf_counter()
            images, labels = draw_samples(loaded, count, sampling, "cpu", progress=True)
            seconds = time.perf_counter() - start
            metrics = score_images(images, labels, dataclasses.replace(options, n=count))["metrics"]
            record["fid"][key] = {"fid": metrics["fid"], "kid": metrics["kid"], "kid_std": metrics["kid_std"],
                                  "precision": metrics["precision"], "recall": metrics["recall"],
                                  "sampling_seconds": seconds}
            print(f"{name} {variance} {steps} steps: FID {metrics['fid']:.2f}", file=sys.stderr)
            record_path.write_text(json.dumps(record, indent=1))
    record["step"] = loaded.step
    return record


def report(results: dict, args: argparse.Namespace) -> str:
    steps = args.sample_steps
    baseline = results.get("linear_simple", {}).get("nll", {}).get(f"beta/{args.nll}/clip")
    rows = []
    for name, record in results.items():
        for key, nll in record["nll"].items():
            if not key.endswith("/clip"):          # earlier runs without x0 clipping, kept in the JSON only
                continue
            variance = key.split("/")[0]
            paired = "–"
            if baseline is not None:
                diff = np.array(nll["per_image"]) - np.array(baseline["per_image"])
                paired = f"{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}"
            row = [name, variance, f"{nll['bits_per_dim']:.3f} ± {nll['bits_per_dim_stderr']:.3f}", paired]
            for s in steps:
                count = args.n_full if s >= 1000 else args.n
                fid = record["fid"].get(f"{variance}/{s}/{count}")
                row.append(f"{fid['fid']:.1f} / {1000 * fid['kid']:.1f}" if fid else "–")
            rows.append(row)
    headers = ["variant", "reverse variance", f"NLL bits/dim ({args.nll} test images)",
               "paired difference to linear_simple (beta)",
               *(f"FID / KIDx1000 @ {s} steps (n={args.n_full if s >= 1000 else args.n})" for s in steps)]
    return (f"# Improved-DDPM ablation on Fashion-MNIST\n\n`{command_line()}`\n\n"
            f"Each model: the Fashion-MNIST preset at 16 base channels (1-2-2, 0.30M parameters) trained "
            f"{args.train_steps} steps x 64 images; FID/KID of ancestral samples against the test set (shipped "
            f"classifier features; FID of a few hundred samples is biased upwards, compare within a column; KID "
            f"is unbiased). Bits/dim on the same test images and noise for every variant (paired).\n\n"
            + markdown_table(headers, rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--n", type=int, default=250, help="samples per FID")
    parser.add_argument("--n-full", type=int, default=100, help="samples per FID at the full T steps")
    parser.add_argument("--nll", type=int, default=32, help="test images for bits/dim")
    parser.add_argument("--sample-steps", type=lambda s: [int(v) for v in s.split(",")], default=[1000, 100, 50, 25])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoints = {name: train(name, args.out_dir / name, args.train_steps) for name in args.variants}
    if args.train_only:
        return
    results = {name: evaluate(name, path, args.n, args.n_full, args.nll, args.sample_steps)
               for name, path in checkpoints.items()}
    data = {"machine": machine_info(), "command": command_line(), "train_steps": args.train_steps,
            "batch_size": 64, "n": args.n, "nll_images": args.nll, "results": results}
    for path in write_results("improved_ddpm_ablation", data, report(results, args)):
        print(path)


if __name__ == "__main__":
    main()
