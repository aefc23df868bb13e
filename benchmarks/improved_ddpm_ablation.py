"""Nichol & Dhariwal 2021 ("Improved DDPM") ablation on Fashion-MNIST:
(linear, cosine) x (L_simple with a fixed variance, L_hybrid with a learned variance), equal training budgets.

Each variant is the Fashion-MNIST preset (configs/fashion_mnist.yaml) with its schedule and objective
changed, trained for the same number of steps (same images seen), then:
- test NLL in bits/dim through the full bound (``difflab.metrics.likelihood``) on the first ``--nll`` test
  images, with its standard error (fixed-variance models: sigma^2 = beta and beta-tilde);
- FID and KID (shipped classifier's features, Fashion-MNIST test set) of ``--n`` ancestral samples at each
  of ``--sample-steps`` respaced steps (fixed-variance models with both fixed variances).

Work already done is kept in <out-dir>/<variant>/ablation.json, so the script can be stopped and rerun.

    python benchmarks/improved_ddpm_ablation.py --train-steps 600 --n 500 --nll 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.checkpoint import CHECKPOINT_NAME, load_checkpoint  # noqa: E402
from difflab.config import load_config  # noqa: E402
from difflab.pipelines.ddpm import load_model  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, draw_samples, nll_on_test_set, score_images  # noqa: E402
from difflab.train.trainer import Trainer  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist.yaml"
VARIANTS = {
    "linear_simple": ["diffusion.schedule=linear"],
    "cosine_simple": ["diffusion.schedule=cosine"],
    "linear_hybrid": ["diffusion.schedule=linear", "diffusion.learn_variance=true", "train.loss=hybrid"],
    "cosine_hybrid": ["diffusion.schedule=cosine", "diffusion.learn_variance=true", "train.loss=hybrid"],
}
FIXED_VARIANCES = ("beta", "beta_tilde")


def train(name: str, out_dir: Path, steps: int) -> Path:
    """Train (or finish training) one variant for exactly ``steps`` steps; returns its checkpoint."""
    overrides = VARIANTS[name] + [f"train.out_dir={out_dir}", f"train.steps={steps}", "train.max_minutes=null",
                                  "train.sample_every=1000000", f"name=ablation_{name}"]
    config = load_config(PRESET, overrides)
    path = out_dir / CHECKPOINT_NAME
    resume = path.exists()
    if resume and load_checkpoint(path).state["step"] >= steps:
        return path
    start = time.perf_counter()
    Trainer(config, resume=resume).run()
    print(f"{name}: trained {steps} steps in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def evaluate(name: str, checkpoint: Path, n: int, nll: int, sample_steps: list[int]) -> dict:
    """NLL and FID/KID of one variant, resuming from its ablation.json."""
    record_path = checkpoint.parent / "ablation.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"nll": {}, "fid": {}}
    loaded = load_model(checkpoint)
    variances = ("learned",) if loaded.config.diffusion.learn_variance else FIXED_VARIANCES
    options = EvalOptions(n=n, progress=False)
    for variance in variances:
        if nll and f"{variance}/{nll}" not in record["nll"]:
            sampling = dataclasses.replace(loaded.config.sample, variance=variance if variance != "learned" else "beta",
                                           clip_x0=False)
            start = time.perf_counter()
            record["nll"][f"{variance}/{nll}"] = {**nll_on_test_set(loaded, nll, sampling, progress=True),
                                                   "seconds": time.perf_counter() - start}
            record_path.write_text(json.dumps(record, indent=1))
        for steps in sample_steps:
            key = f"{variance}/{steps}/{n}"
            if key in record["fid"]:
                continue
            sampling = dataclasses.replace(loaded.config.sample, sampler="ancestral", steps=steps,
                                           variance=variance if variance != "learned" else "beta", batch_size=250)
            start = time.perf_counter()
            images, labels = draw_samples(loaded, n, sampling, "cpu", progress=True)
            seconds = time.perf_counter() - start
            metrics = score_images(images, labels, options)["metrics"]
            record["fid"][key] = {"fid": metrics["fid"], "kid": metrics["kid"], "kid_std": metrics["kid_std"],
                                  "precision": metrics["precision"], "recall": metrics["recall"],
                                  "sampling_seconds": seconds}
            print(f"{name} {variance} {steps} steps: FID {metrics['fid']:.2f}", file=sys.stderr)
            record_path.write_text(json.dumps(record, indent=1))
    record["step"] = loaded.step
    return record


def report(results: dict, args: argparse.Namespace) -> str:
    steps = args.sample_steps
    rows = []
    for name, record in results.items():
        for key, nll in record["nll"].items():
            variance = key.split("/")[0]
            row = [name, variance, f"{nll['bits_per_dim']:.3f} ± {nll['bits_per_dim_stderr']:.3f}"]
            for s in steps:
                fid = record["fid"].get(f"{variance}/{s}/{args.n}")
                row.append(f"{fid['fid']:.1f} / {1000 * fid['kid']:.1f}" if fid else "–")
            rows.append(row)
    headers = ["variant", "reverse variance", f"NLL bits/dim ({args.nll} test images)",
               *(f"FID / KIDx1000 @ {s} steps" for s in steps)]
    return (f"# Improved-DDPM ablation on Fashion-MNIST\n\n`{command_line()}`\n\n"
            f"Each model: the Fashion-MNIST preset trained {args.train_steps} steps x 64 images; FID/KID of "
            f"{args.n} ancestral samples against the test set (shipped classifier features; FID of {args.n} "
            f"samples is biased upwards, compare within the table). KID is unbiased.\n\n"
            + markdown_table(headers, rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--n", type=int, default=500, help="samples per FID")
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
    results = {name: evaluate(name, path, args.n, args.nll, args.sample_steps) for name, path in checkpoints.items()}
    data = {"machine": machine_info(), "command": command_line(), "train_steps": args.train_steps,
            "batch_size": 64, "n": args.n, "nll_images": args.nll, "results": results}
    for path in write_results("improved_ddpm_ablation", data, report(results, args)):
        print(path)


if __name__ == "__main__":
    main()
