"""Guidance on Fashion-MNIST: the fidelity/diversity trade-off and the saturation that thresholding prevents.

- classifier-free guidance (Ho & Salimans 2021) of a class-conditional model trained with label dropout,
  w in {0, 0.5, 1, 2, 4, 8} (diffusers' guidance_scale = 1 + w);
- classifier guidance (Dhariwal & Nichol 2021) of the unconditional preset model by the noise-aware
  classifier, over a range of gradient scales s;
- at high w, the share of saturated pixels with no, static and dynamic thresholding (Saharia et al. 2022).

Each setting: ``--n`` samples with balanced class labels, DDIM (eta = 0) with ``--steps`` steps uniform in
log-sigma from sigma = 80, scored by
``difflab.pipelines.evaluate.score_images`` (FID, precision, recall, class accuracy by the shipped
classifier). Saturation is measured on the final samples before they are quantised: the share of pixels
beyond the data range (|x| > 1, "overflow"), and the share at the range's ends (|x| >= 1 - 1/255, values that
quantise to 0 or 255), compared with the same share of real test images.

    python benchmarks/guidance_sweep.py --part cfg --model runs/fmnist_cond
    python benchmarks/guidance_sweep.py --part classifier --model runs/fashion_mnist --classifier runs/fmnist_noisy_classifier
    python benchmarks/guidance_sweep.py --part saturation --model runs/fmnist_cond
    python benchmarks/guidance_sweep.py --report          # the Markdown table from the parts' JSON files
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
from common import RESULTS_DIR, command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.data import load_fashion_mnist, to_uint8_images  # noqa: E402
from difflab.pipelines.ddpm import class_condition, load_model, sample  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, balanced_labels, score_images  # noqa: E402

CFG_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
CLASSIFIER_SCALES = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
SATURATION_WEIGHTS = (8.0,)
THRESHOLDS = {"none": {"clip_x0": False, "dynamic_threshold": None},
              "static": {"clip_x0": True, "dynamic_threshold": None},
              "dynamic": {"clip_x0": False, "dynamic_threshold": 0.995}}
EDGE = 1 - 1 / 255
# Start at sigma = 80 (Karras et al. 2022), not at the cosine schedule's last level (sigma ~ 2e4), where an
# unclipped x0 prediction is the eps error times 2e4: "no thresholding" then measures guidance, not that.
SIGMA_MAX = 80.0


def saturation(x: torch.Tensor) -> dict:
    """Shares of pixels beyond [-1, 1] and at its ends, of samples (or images) in the data's range."""
    return {"overflow": (x.abs() > 1).double().mean().item(), "at_ends": (x.abs() >= EDGE).double().mean().item()}


def run_setting(loaded, n: int, steps: int, labels: torch.Tensor, **overrides) -> dict:
    options = dataclasses.replace(loaded.config.sample, sampler="ddim", steps=steps, spacing="logsnr",
                                  sigma_max=SIGMA_MAX, eta=0.0, batch_size=250, **overrides)
    start = time.perf_counter()
    samples = sample(loaded, n, options, class_condition(labels), progress=True)
    seconds = time.perf_counter() - start
    metrics = score_images(to_uint8_images(samples), labels, EvalOptions(n=n, progress=False))["metrics"]
    keep = ("fid", "kid", "precision", "recall", "class_accuracy")
    return {**{k: metrics[k] for k in keep if k in metrics}, **saturation(samples), "sampling_seconds": seconds}


def part_path(part: str) -> Path:
    return RESULTS_DIR / f"guidance_{part}.json"


def run_part(args: argparse.Namespace) -> None:
    loaded = load_model(args.model)
    labels = balanced_labels(args.n, 10)
    path = part_path(args.part)
    done = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    if args.part == "cfg":
        settings = {f"w={w:g}": {"guidance": w} for w in CFG_WEIGHTS}
    elif args.part == "classifier":
        settings = {f"s={s:g}": {"classifier": str(args.classifier), "classifier_scale": s}
                    for s in CLASSIFIER_SCALES}
    else:                      # static thresholding is the cfg part's default: its rows serve for "static"
        settings = {f"w={w:g}, {name}": {"guidance": w, **THRESHOLDS[name]}
                    for w in SATURATION_WEIGHTS for name in ("none", "dynamic")}
    for name, overrides in settings.items():
        if name in done["rows"]:
            continue
        done["rows"][name] = run_setting(loaded, args.n, args.steps, labels, **overrides)
        print(name, json.dumps(done["rows"][name]), file=sys.stderr)
        done.update(model=str(loaded.path), step=loaded.step, n=args.n, steps=args.steps, command=command_line(),
                    machine=machine_info())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done, indent=1))


def report() -> None:
    parts = {p: json.loads(part_path(p).read_text()) for p in ("cfg", "classifier", "saturation")
             if part_path(p).exists()}
    real = saturation(load_fashion_mnist("test").batch(torch.arange(2000))[0])
    sections = ["# Guidance on Fashion-MNIST\n"]
    for part, title in (("cfg", "Classifier-free guidance (conditional model, label dropout 0.1)"),
                        ("classifier", "Classifier guidance (unconditional preset model + noise-aware classifier)")):
        if part not in parts:
            continue
        data = parts[part]
        rows = [[name, f"{r['fid']:.2f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                 f"{r['class_accuracy']:.3f}"] for name, r in data["rows"].items()]
        sections.append(f"## {title}\n\n`{data['command']}` ({data['model']}, step {data['step']}; {data['n']} "
                        f"samples, DDIM {data['steps']} steps uniform in log-sigma from 80)\n\n"
                        + markdown_table(["setting", "FID", "precision", "recall", "class accuracy"], rows))
    if "saturation" in parts:
        data = parts["saturation"]
        settings = dict(data["rows"])
        for w in SATURATION_WEIGHTS:
            static = parts.get("cfg", {}).get("rows", {}).get(f"w={w:g}")
            if static:
                settings[f"w={w:g}, static"] = static
        rows = [[name, f"{100 * r['overflow']:.2f}%", f"{100 * r['at_ends']:.1f}%", f"{r['fid']:.2f}",
                 f"{r['class_accuracy']:.3f}"] for name, r in sorted(settings.items())]
        rows.append(["real test images", "0.00%", f"{100 * real['at_ends']:.1f}%", "–", "–"])
        sections.append(f"## Saturation and thresholding\n\n`{data['command']}` ({data['n']} samples)\n\n"
                        + markdown_table(["setting", "pixels beyond [-1, 1]", "pixels at 0 or 255", "FID",
                                          "class accuracy"], rows))
    write_results("guidance_sweep", {"parts": parts, "real_saturation": real, "machine": machine_info()},
                  "\n\n".join(sections) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("cfg", "classifier", "saturation"))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--classifier", type=Path, default=Path("runs/fmnist_noisy_classifier"))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    if args.part:
        run_part(args)
    if args.report or not args.part:
        report()


if __name__ == "__main__":
    main()
