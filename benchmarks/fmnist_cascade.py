"""Cascaded diffusion on Fashion-MNIST, 14x14 -> 28x28, and the noise-conditioning augmentation ablation
(Ho et al. 2021, Table 4 and Sec. 4.3; issue #17).

Models (``--minutes`` 15 of one CPU thread each, two side by side on the 2-core machine, bf16 autocast where the
CPU has native bf16, as the 30-minute single model they are compared with):

- ``base14``: ``configs/fmnist_base14.yaml``, the preset's U-Net at 14x14 (images averaged down 2x2);
- ``sr_none``, ``sr_gaussian``, ``sr_blur``: ``configs/fmnist_sr28.yaml`` with ``superres.augmentation`` none,
  gaussian (levels U[0, 0.5]) and blur (std up to 1 low-resolution pixel, levels U[0, 0.5]).

The single 28x28 model of equal total budget (15 + 15 minutes) is the 30-minute pixel U-Net of
``benchmarks/fmnist_latent.py`` (``runs/latent/pixel_unet``, the same preset and precision).

Every stage samples with the presets' Heun sampler (10 steps, 19 NFE, log-SNR grid 80 .. 0.1). The augmentation
level at sampling is chosen by a sweep (``sweep``: 1,000 cascade samples per level, seeds from 10^6, FID against
10,000 *training* images' features), so the scored samples (seeds 0 .., FID against the test set) never chose it.
Gaussian: non-truncated (base run to 0, then z_a ~ q(z_a | z_0)) and truncated (the base's sampler stopped at
level a). Also reported: how far each final image, averaged back down to 14x14, is from the base sample it was
made from (mean absolute error, pixels in [-1, 1]; non-truncated only: a truncated base's output is noisy).

    python benchmarks/fmnist_cascade.py train base14        # sr_none, sr_gaussian, sr_blur
    python benchmarks/fmnist_cascade.py sweep sr_gaussian   # --levels 0,0.05,...; --truncated
    python benchmarks/fmnist_cascade.py sample sr_gaussian --level 0.2 [--truncated]   # --n 10000
    python benchmarks/fmnist_cascade.py report              # benchmarks/results/fmnist_cascade.{json,md}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402
from fmnist_budget import cpu_has_fast_bf16, draw_samples  # noqa: E402

from difflab.data import load_fashion_mnist, to_uint8_images  # noqa: E402
from difflab.metrics import extract, gaussian_fit  # noqa: E402
from difflab.metrics.features import load_fmnist_classifier  # noqa: E402
from difflab.metrics.frechet import frechet_distance  # noqa: E402
from difflab.pipelines.cascade import sample_cascade  # noqa: E402
from difflab.pipelines.ddpm import load_model  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, score_images  # noqa: E402
from difflab.superres import downsample  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "cascade"
MODELS = {"base14": ("configs/fmnist_base14.yaml", []),
          "sr_none": ("configs/fmnist_sr28.yaml", ["superres.augmentation=none"]),
          "sr_gaussian": ("configs/fmnist_sr28.yaml", ["superres.augmentation=gaussian"]),
          "sr_blur": ("configs/fmnist_sr28.yaml", ["superres.augmentation=blur"])}
SINGLE = REPO / "runs" / "latent" / "pixel_unet"
SWEEP_LEVELS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
SWEEP_SEED = 10 ** 6


def run_train(args: argparse.Namespace) -> None:
    preset, overrides = MODELS[args.model]
    precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    command = [sys.executable, "-m", "difflab", "train", preset, "--quiet", "--set", f"train.out_dir={RUNS / args.model}",
               "--set", f"train.max_minutes={args.minutes}", "--set", f"train.precision={precision}",
               *[item for o in overrides for item in ("--set", o)]]
    subprocess.run(command, check=True, cwd=REPO)


def cascade_draw(model: str, level: float, truncated: bool, seed0: int):
    """A ``draw(first, count)`` of uint8 (final, base-averaged-down error) for ``draw_samples``."""
    stages = [load_model(RUNS / "base14"), load_model(RUNS / model)]

    def draw(first: int, count: int) -> torch.Tensor:
        base, final = sample_cascade(stages, count, level, truncated, seed=seed0 + first)
        return to_uint8_images(torch.cat([final, torch.nn.functional.interpolate(base, size=28)], dim=1))
    return draw


def variant(model: str, level: float, truncated: bool) -> str:
    return f"{model}_a{level:g}" + ("_truncated" if truncated else "")


def run_sample(args: argparse.Namespace) -> None:
    name = variant(args.model, args.level, args.truncated)
    draw_samples(lambda: cascade_draw(args.model, args.level, args.truncated, 0), RUNS / "samples" / name, args.n,
                 args.batch, name)


def train_reference(n: int = 10000):
    """The shipped classifier's features of the first ``n`` training images, as a Gaussian fit."""
    extractor = load_fmnist_classifier()
    images = load_fashion_mnist("train", image_size=28).data[:n]
    return gaussian_fit(extract(extractor, images, progress=False)["features"], "training images"), extractor


def run_sweep(args: argparse.Namespace) -> None:
    reference, extractor = train_reference()
    levels = [float(v) for v in args.levels.split(",")] if args.levels else SWEEP_LEVELS
    path = RUNS / f"sweep_{args.model}{'_truncated' if args.truncated else ''}.json"
    for level in levels:
        name = "sweep_" + variant(args.model, level, args.truncated)
        pairs, _ = draw_samples(lambda: cascade_draw(args.model, level, args.truncated, SWEEP_SEED),
                                RUNS / "samples" / name, args.n, args.batch, name)
        features = extract(extractor, pairs[:, :1].contiguous(), progress=False)["features"]
        fid = frechet_distance(reference, gaussian_fit(features, "samples"))
        print(json.dumps({"level": level, "fid_vs_train": fid}), flush=True)
        # read again before writing: two processes may sweep different levels of one model
        results = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**results, f"{level:g}": fid}, indent=1) + "\n")


def load_pairs(folder: Path) -> torch.Tensor | None:
    parts = sorted(p for p in folder.glob("*-*.npz") if not p.name.endswith(".tmp.npz"))
    return torch.cat([torch.from_numpy(np.load(p)["images"]) for p in parts]) if parts else None


def single_model() -> dict | None:
    """The equal-budget single 28x28 model: its own evaluation if ``SINGLE`` is here, else the one recorded by
    ``benchmarks/fmnist_latent.py`` (same preset, precision and budget, trained on this kind of machine)."""
    own = SINGLE / "eval_n10000.json"
    recorded = REPO / "benchmarks" / "results" / "fmnist_latent.json"
    if own.is_file():
        metrics, n, source = json.loads(own.read_text())["metrics"], 10000, str(own)
    elif recorded.is_file():
        entry = json.loads(recorded.read_text())["evals"]["pixel_unet"]
        metrics, n, source = entry["metrics"], entry["n"], f"{recorded.relative_to(REPO)} (evals.pixel_unet)"
    else:
        return None
    return {**{k: metrics[k] for k in ("fid", "kid", "precision", "recall")}, "n": n, "source": source}


def training_record(run: Path) -> dict:
    """Steps and images each stage trained in its budget (the last record of its metrics.jsonl)."""
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    last = next((json.loads(line) for line in reversed(lines) if '"loss"' in line), {})
    return {"steps": last.get("step"), "seconds": last.get("elapsed_s")}


def run_report(args: argparse.Namespace) -> None:
    rows, results = [], {}
    single = single_model()
    if single:
        results["single_28x28"] = single
        rows.append(["single 28x28 U-Net, 30 min", str(single["n"]), f"{single['fid']:.2f}",
                     f"{single['precision']:.3f} / {single['recall']:.3f}", ""])
    results["training"] = {name: training_record(RUNS / name) for name in MODELS if (RUNS / name).is_dir()}
    for folder in sorted((RUNS / "samples").glob("sr_*")):
        pairs = load_pairs(folder)
        if pairs is None or len(pairs) < 1000:
            continue
        final, base = pairs[:, :1].contiguous(), pairs[:, 1:].float() / 127.5 - 1
        scored = score_images(final, None, EvalOptions(n=len(final), progress=False))["metrics"]
        error = None if folder.name.endswith("_truncated") else \
            (downsample(final.float() / 127.5 - 1, 14) - downsample(base, 14)).abs().mean().item()
        results[folder.name] = {**{k: scored[k] for k in ("fid", "kid", "precision", "recall")},
                                "low_res_error": error, "n": len(final)}
        rows.append([folder.name, str(len(final)), f"{scored['fid']:.2f}", f"{scored['precision']:.3f} / "
                     f"{scored['recall']:.3f}", "" if error is None else f"{error:.4f}"])
    sweeps = {p.stem: json.loads(p.read_text()) for p in RUNS.glob("sweep_*.json")}
    table = markdown_table(["model", "samples", "FID (test set)", "precision / recall", "|down(final) - base|"], rows)
    sweep_table = markdown_table(["sweep", *[f"a = {a:g}" for a in SWEEP_LEVELS]],
                                 [[name, *[f"{values[f'{a:g}']:.2f}" if f"{a:g}" in values else "" for a in SWEEP_LEVELS]]
                                  for name, values in sweeps.items()])
    write_results("fmnist_cascade", {"results": results, "sweeps": sweeps, "machine": machine_info(),
                                     "command": command_line()},
                  "# Cascade on Fashion-MNIST\n\n" + (__doc__ or "") + "\n" + table + "\n\nLevel sweeps (FID of 1,000 "
                  "samples against 10,000 training images):\n\n" + sweep_table + "\n")
    print(table)
    print(sweep_table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    train = sub.add_parser("train")
    train.add_argument("model", choices=sorted(MODELS))
    train.add_argument("--minutes", type=float, default=15.0)
    train.set_defaults(func=run_train)
    for name, func in (("sample", run_sample), ("sweep", run_sweep)):
        phase = sub.add_parser(name)
        phase.add_argument("model", choices=[m for m in MODELS if m != "base14"])
        phase.add_argument("--truncated", action="store_true")
        phase.add_argument("--batch", type=int, default=250)
        if name == "sample":
            phase.add_argument("--level", type=float, default=0.0)
            phase.add_argument("--n", type=int, default=10000)
        else:
            phase.add_argument("--levels", default=None, help="comma-separated levels (default: 0 .. 0.5)")
            phase.add_argument("--n", type=int, default=1000)
        phase.set_defaults(func=func)
    report = sub.add_parser("report")
    report.set_defaults(func=run_report)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
