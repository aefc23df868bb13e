"""ControlNet on Fashion-MNIST Canny edges (issue #20): adherence to the edges, fidelity, and the zero-convolution
ablation, against the frozen base model.

Models (one CPU thread each, two side by side on the 2-core machine):

- ``base``: ``configs/fashion_mnist.yaml`` with ``data.conditional=true`` for ``--base-minutes`` (30), the frozen
  base (class-conditional: each sample gets its hint image's label);
- ``controlnet``: ``configs/fmnist_controlnet.yaml`` on that base for ``--minutes`` (30): zero convolutions;
- ``controlnet_no_zero``: the same with ``model.controlnet.zero_init=false`` (the paper's ablation: the joining
  convolutions and the hint encoder's last layer at PyTorch's default initialisation).

Each model is sampled with the preset's sampler (Heun, 10 steps = 19 NFE, log-SNR grid 80 .. 0.1), seed i for
sample i, no guidance, from two sets of hints:

- ``train``: the Canny edges (and labels) of the first 10,000 *training* images. Their samples are scored for FID
  etc. against the test set with the shipped classifier: samples made from test-set edges would copy test images
  and flatter FID.
- ``test``: the edges of the first 2,000 *test* images (never seen in training): edge F1 between each hint and
  the Canny edges of its sample (``difflab.metrics.edges``; exact pixels, and with one pixel of tolerance).

The base ignores hints: its F1 is that of a sample of the same class and seed, the chance level of the metric.

"Sudden convergence" (``curve`` phase): the ControlNets keep their EMA weights every 50 steps
(``train.keep_checkpoints``); the edge F1 of 128 other test images' samples (test images 5000-5127, apart from
the scored 2,000) at steps 50, 100, 150, ... shows when the model starts to follow the edges, and the report gives
the first step at which it reaches half-way from the base's F1 to the final one.

    python benchmarks/fmnist_controlnet.py train base            # then controlnet and controlnet_no_zero
    python benchmarks/fmnist_controlnet.py sample controlnet train   # --n 10000; `test` hints: --n 2000
    python benchmarks/fmnist_controlnet.py curve controlnet      # edge F1 over the training steps
    python benchmarks/fmnist_controlnet.py report                # benchmarks/results/fmnist_controlnet.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402
from fmnist_budget import draw_samples  # noqa: E402

from difflab.build import build_data  # noqa: E402
from difflab.conditioning import Cond  # noqa: E402
from difflab.config import load_config  # noqa: E402
from difflab.data import to_uint8_images  # noqa: E402
from difflab.data.hints import HintOptions, make_hints  # noqa: E402
from difflab.metrics.edges import binary_f1  # noqa: E402
from difflab.pipelines.control import save_pairs, with_control  # noqa: E402
from difflab.pipelines.ddpm import load_model, sample  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, score_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "control"
MODELS = {                                   # name: (preset, overrides)
    "base": ("configs/fashion_mnist.yaml", ["data.conditional=true"]),
    "controlnet": ("configs/fmnist_controlnet.yaml", [f"control.base={RUNS / 'base_cond'}"]),
    "controlnet_no_zero": ("configs/fmnist_controlnet.yaml", [f"control.base={RUNS / 'base_cond'}",
                                                              "model.controlnet.zero_init=false"]),
}
FOLDERS = {"base": "base_cond", "controlnet": "controlnet", "controlnet_no_zero": "controlnet_no_zero"}
HINT_SETS = {"train": 10000, "test": 2000}
CURVE_IMAGES = range(5000, 5128)                       # test images for the training curve, apart from the scored
CURVE_STEPS = (50, 100, 150, 200, 300, 400, 500, 700, 1000, 1500, 2000, 3000, 4000, 6000, 8000)
MILESTONES = ["train.checkpoint_every=50", "train.keep_checkpoints=400", "train.sample_every=500"]
HINT = HintOptions("canny", canny_sigma=1.0)          # the preset's


def run_train(args: argparse.Namespace) -> None:
    preset, overrides = MODELS[args.model]
    minutes = args.base_minutes if args.model == "base" else args.minutes
    command = [sys.executable, "-m", "difflab", "train", preset, "--quiet", "--set",
               f"train.out_dir={RUNS / FOLDERS[args.model]}", "--set", f"train.max_minutes={minutes}",
               *[item for o in overrides + (MILESTONES if args.model != "base" else [])
                 for item in ("--set", o)]]
    subprocess.run(command, check=True, cwd=REPO)


def hint_set(split: str, n: int | range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``n`` images of the split (or those of the range), their labels and their Canny edges."""
    data = build_data(load_config(REPO / "configs/fmnist_controlnet.yaml").data, split)
    images, labels = data.batch(torch.arange(n) if isinstance(n, int) else torch.tensor(list(n)))
    return images, labels, make_hints(images, HINT)


def run_curve(args: argparse.Namespace) -> None:
    """Edge F1 of the milestones' samples (EMA weights) at ``CURVE_STEPS`` and at the end, into curve.json."""
    folder = RUNS / FOLDERS[args.model]
    _, labels, hints = hint_set("test", CURVE_IMAGES)
    final = load_model(folder)
    milestones = {int(p.stem.split("_")[1]): p for p in (folder / "milestones").glob("step_*.safetensors")}
    points = [(step, milestones[step]) for step in CURVE_STEPS if step in milestones]
    curve = []
    for step, path in [*points, (final.step, folder)]:
        loaded = load_model(path)
        images = to_uint8_images(sample(loaded, len(hints), loaded.config.sample,
                                        with_control(Cond(label=labels), hints)))
        curve.append({"step": step, **edge_scores(images, hints)})
        print(json.dumps(curve[-1]), flush=True)
    (folder / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")


def samples_path(model: str, split: str) -> Path:
    return RUNS / "samples" / f"{model}_{split}"


def run_sample(args: argparse.Namespace) -> None:
    n = args.n or HINT_SETS[args.split]
    _, labels, hints = hint_set(args.split, n)

    def make_draw():
        loaded = load_model(RUNS / FOLDERS[args.model])
        controlled = "control" in loaded.spec.condition_fields()

        def draw(first: int, count: int) -> torch.Tensor:
            rows = slice(first, first + count)
            cond = Cond(label=labels[rows])
            cond = with_control(cond, hints[rows]) if controlled else cond
            options = dataclasses.replace(loaded.config.sample, seed=first)
            return to_uint8_images(sample(loaded, count, options, cond))
        return draw

    draw_samples(make_draw, samples_path(args.model, args.split), n, args.batch, "heun-10-logsnr")


def load_samples(model: str, split: str) -> torch.Tensor | None:
    parts = sorted(samples_path(model, split).glob("*-*.npz"))
    parts = [p for p in parts if not p.name.endswith(".tmp.npz")]
    if not parts:
        return None
    return torch.cat([torch.from_numpy(np.load(p)["images"]) for p in parts])


def edge_scores(images: torch.Tensor, hints: torch.Tensor) -> dict:
    edges = make_hints(images.float() / 127.5 - 1, HINT)
    exact, loose = binary_f1(hints, edges), binary_f1(hints, edges, tolerance=1)
    return {"edge_f1": exact.mean().item(), "edge_f1_std_error": (exact.std() / len(exact) ** 0.5).item(),
            "edge_f1_1px": loose.mean().item(), "n": len(images)}


def convergence(model: str, base_f1: float | None) -> dict:
    """The edge F1 over training (``curve``), and the first step half-way from the base's F1 to the final."""
    path = RUNS / FOLDERS[model] / "curve.json"
    if not path.is_file():
        return {}
    curve = [(point["step"], point["edge_f1"]) for point in json.loads(path.read_text())]
    step = None
    if base_f1 is not None:
        half = base_f1 + 0.5 * (curve[-1][1] - base_f1)
        step = next((s for s, value in curve if value >= half), None)
    return {"curve": curve, "half_way_step": step}


def run_report(args: argparse.Namespace) -> None:
    results, rows = {}, []
    for model in MODELS:
        result = {}
        for split, n in HINT_SETS.items():
            images = load_samples(model, split)
            if images is None:
                continue
            _, labels, hints = hint_set(split, len(images))
            result[f"{split}_hints"] = edge_scores(images, hints)
            if split == "train" and len(images) >= 1000:
                scored = score_images(images, labels, EvalOptions(n=len(images), progress=False))
                result["scores"] = {k: scored["metrics"][k] for k in ("fid", "kid", "precision", "recall",
                                                                       "class_accuracy")}
                result["scores"]["n"] = len(images)
            if split == "test" and model != "base":
                save_pairs(hints[:16], images[:16].float() / 127.5 - 1,
                           REPO / "benchmarks" / "results" / f"fmnist_{model}_pairs.png", scale=2)
        if result:
            results[model] = result
    base_f1 = results.get("base", {}).get("test_hints", {}).get("edge_f1")
    base_fid = results.get("base", {}).get("scores", {}).get("fid")
    for model, result in results.items():
        test, scores = result.get("test_hints", {}), result.get("scores", {})
        if model != "base":
            result.update(convergence(model, base_f1))
        rows.append([model, f"{test.get('edge_f1', float('nan')):.3f} ± {test.get('edge_f1_std_error', 0):.3f}",
                     f"{test.get('edge_f1_1px', float('nan')):.3f}",
                     f"{result.get('train_hints', {}).get('edge_f1', float('nan')):.3f}",
                     f"{scores.get('fid', float('nan')):.2f}",
                     f"{scores['fid'] / base_fid:.2f}" if base_fid and "fid" in scores else "",
                     f"{scores.get('precision', float('nan')):.3f}", f"{scores.get('recall', float('nan')):.3f}",
                     str(result.get("half_way_step", ""))])
    table = markdown_table(["model", "edge F1, test hints", "F1 (1 px)", "edge F1, train hints", "FID", "FID / base",
                            "precision", "recall", "half-way step"], rows)
    curves = {model: dict(result["curve"]) for model, result in results.items() if result.get("curve")}
    steps = sorted({step for curve in curves.values() for step in curve})
    curve_table = markdown_table(["step", *[f"{model} edge F1" for model in curves]],
                                 [[str(step), *[f"{curve[step]:.3f}" if step in curve else "" for curve in curves.values()]]
                                  for step in steps])
    write_results("fmnist_controlnet", {"results": results, "machine": machine_info(), "command": command_line()},
                  "# ControlNet on Fashion-MNIST Canny edges\n\n" + (__doc__ or "") + "\n" + table + "\n\n"
                  "Edge F1 over training (128 other test images; the last row of each is its final step):\n\n"
                  + curve_table + "\n")
    print(table)
    print(curve_table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    train = sub.add_parser("train")
    train.add_argument("model", choices=sorted(MODELS))
    train.add_argument("--minutes", type=float, default=30.0)
    train.add_argument("--base-minutes", type=float, default=30.0)
    train.set_defaults(func=run_train)
    draw = sub.add_parser("sample")
    draw.add_argument("model", choices=sorted(MODELS))
    draw.add_argument("split", choices=sorted(HINT_SETS))
    draw.add_argument("--n", type=int, default=None)
    draw.add_argument("--batch", type=int, default=250)
    draw.set_defaults(func=run_sample)
    curve = sub.add_parser("curve")
    curve.add_argument("model", choices=["controlnet", "controlnet_no_zero"])
    curve.set_defaults(func=run_curve)
    report = sub.add_parser("report")
    report.set_defaults(func=run_report)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
