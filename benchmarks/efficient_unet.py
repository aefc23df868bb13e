"""Imagen's Efficient U-Net against the ADM-style U-Net at equal parameters on Fashion-MNIST (issue #17;
Saharia et al. 2022, App. B.1).

- ``adm``: the Fashion-MNIST preset's U-Net (24 channels, multipliers 1-2-3, one block per level, attention at
  7x7): 1.07M parameters.
- ``efficient``: ``downsample_first`` (no block at 28x28), ``scale_skips``, ``level_res_blocks`` (1, 2) (more
  blocks at the low resolution), 32 channels, multipliers 1-2, attention at 7x7: 1.03M parameters.

Phases: ``time`` measures each network alone in a fresh process (one thread, the preset's batch of 32, bf16
autocast where the CPU has native bf16): training images/s (median of 30 steps after 5 warm-up steps) and the
process's peak resident memory; ``train NAME`` trains each for ``--minutes`` (30) of one thread, the two side
by side; ``sample NAME`` scores 10,000 samples with the preset's sampler (``difflab eval``); ``report`` writes
``benchmarks/results/efficient_unet.{json,md}``.

    python benchmarks/efficient_unet.py time
    python benchmarks/efficient_unet.py train adm        # and efficient, side by side
    python benchmarks/efficient_unet.py sample adm
    python benchmarks/efficient_unet.py report
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402
from fmnist_budget import cpu_has_fast_bf16  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "efficient"
PRESET = "configs/fashion_mnist.yaml"
MODELS = {
    "adm": [],
    "efficient": ["model.unet.model_channels=32", "model.unet.channel_mult=[1, 2]", "model.unet.downsample_first=true",
                  "model.unet.scale_skips=true", "model.unet.level_res_blocks=[1, 2]"],
}


def precision() -> str:
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def time_one(name: str) -> dict:
    """Training images/s and peak memory of one model, in this (fresh) process."""
    from difflab.config import load_config
    from difflab.train.diffusion import diffusion_trainer

    out = RUNS / f"time_{name}"
    config = load_config(REPO / PRESET, [f"train.out_dir={out}", "train.max_minutes=null", "train.steps=100000",
                                         f"train.precision={precision()}", *MODELS[name]])
    trainer = diffusion_trainer(config, progress=False, overwrite=True)
    times = []
    for step in range(35):
        start = time.perf_counter()
        trainer.train_step()
        if step >= 5:
            times.append(time.perf_counter() - start)
    return {"parameters": sum(p.numel() for p in trainer.net.parameters()),
            "train_images_per_s": config.train.batch_size / statistics.median(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_time(args: argparse.Namespace) -> None:
    results = {}
    for name in MODELS:
        output = subprocess.run([sys.executable, __file__, "time-one", name], check=True, capture_output=True,
                                text=True, cwd=REPO).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    (RUNS / "timing.json").parent.mkdir(parents=True, exist_ok=True)
    (RUNS / "timing.json").write_text(json.dumps(results, indent=1) + "\n")


def run_train(args: argparse.Namespace) -> None:
    command = [sys.executable, "-m", "difflab", "train", PRESET, "--quiet", "--set", f"train.out_dir={RUNS / args.model}",
               "--set", f"train.max_minutes={args.minutes}", "--set", f"train.precision={precision()}",
               *[item for o in MODELS[args.model] for item in ("--set", o)]]
    subprocess.run(command, check=True, cwd=REPO)


def run_sample(args: argparse.Namespace) -> None:
    subprocess.run([sys.executable, "-m", "difflab", "eval", str(RUNS / args.model), "--n", str(args.n), "--out",
                    str(RUNS / args.model / f"eval_n{args.n}.json")], check=True, cwd=REPO)


def run_report(args: argparse.Namespace) -> None:
    timing = json.loads((RUNS / "timing.json").read_text()) if (RUNS / "timing.json").is_file() else {}
    rows, results = [], {}
    for name in MODELS:
        evals = sorted((RUNS / name).glob("eval_n*.json"))
        metrics = json.loads(evals[-1].read_text())["metrics"] if evals else {}
        step = json.loads(evals[-1].read_text()).get("step") if evals else None
        results[name] = {**timing.get(name, {}), **{k: metrics.get(k) for k in ("fid", "precision", "recall")},
                         "training_steps": step}
        r = results[name]
        rows.append([name, f"{r.get('parameters', 0) / 1e6:.2f}M", f"{r.get('train_images_per_s', float('nan')):.1f}",
                     f"{r.get('peak_rss_mib', float('nan')):.0f}", str(step or ""),
                     f"{r['fid']:.2f}" if r.get("fid") is not None else "",
                     f"{r['precision']:.3f} / {r['recall']:.3f}" if r.get("fid") is not None else ""])
    table = markdown_table(["U-Net", "parameters", "train images/s", "peak memory MiB", "steps in 30 min", "FID, 10k",
                            "precision / recall"], rows)
    write_results("efficient_unet", {"results": results, "machine": machine_info(), "command": command_line()},
                  "# Efficient U-Net against the ADM U-Net\n\n" + (__doc__ or "") + "\n" + table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    sub.add_parser("time").set_defaults(func=run_time)
    one = sub.add_parser("time-one")
    one.add_argument("model", choices=sorted(MODELS))
    one.set_defaults(func=lambda a: print(json.dumps(time_one(a.model))))
    train = sub.add_parser("train")
    train.add_argument("model", choices=sorted(MODELS))
    train.add_argument("--minutes", type=float, default=30.0)
    train.set_defaults(func=run_train)
    draw = sub.add_parser("sample")
    draw.add_argument("model", choices=sorted(MODELS))
    draw.add_argument("--n", type=int, default=10000)
    draw.set_defaults(func=run_sample)
    sub.add_parser("report").set_defaults(func=run_report)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
