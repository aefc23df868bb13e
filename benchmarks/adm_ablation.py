"""ADM's architecture ablation at small scale (Dhariwal & Nichol 2021, Table 1; issue #24): the Fashion-MNIST
preset's U-Net (24 channels, multipliers 1-2-3, one block per level, attention at 7x7 with 4 heads), and each of
ADM's changes added to it alone, at an equal 30-minute budget of one thread (bf16 autocast where the CPU has
native bf16), trained two at a time side by side; FID of 10,000 samples with the preset's sampler against the
test set (``difflab eval``, the shipped classifier).

The paper's direction for each change (Table 1, FID at 700K iterations on ImageNet 128, lower is better):

- ``resblock_updown``: BigGAN residual blocks for up/downsampling; helps (-1.0 FID in Table 1).
- ``attention_multi``: attention at 14x14 and 7x7 instead of 7x7 only ("attention at 32, 16, 8"); helps.
- ``head_channels``: a fixed 8 channels per head (9 heads at 72 channels) instead of 4 heads of 18 (ADM: 64
  channels per head, more heads); helps.
- ``rescale_residual``: residual blocks return (skip + h) / sqrt(2); hurts (ADM did not keep it).

    python benchmarks/adm_ablation.py train resblock_updown      # two at a time, side by side
    python benchmarks/adm_ablation.py sample resblock_updown
    python benchmarks/adm_ablation.py report

``baseline`` is the preset itself; ``--baseline-run DIR`` reports an already trained preset run instead
(the Efficient U-Net benchmark's ``adm`` model, trained the same way).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402
from fmnist_budget import cpu_has_fast_bf16  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "adm_ablation"
PRESET = "configs/fashion_mnist.yaml"
VARIANTS = {
    "baseline": [],
    "resblock_updown": ["model.unet.resblock_updown=true"],
    "attention_multi": ["model.unet.attention_resolutions=[14, 7]"],
    "head_channels": ["model.unet.num_head_channels=8"],
    "rescale_residual": ["model.unet.rescale_residual=true"],
}
PAPER = {"baseline": "", "resblock_updown": "helps", "attention_multi": "helps", "head_channels": "helps",
         "rescale_residual": "hurts"}


def run_folder(name: str, args: argparse.Namespace) -> Path:
    if name == "baseline" and args.baseline_run:
        return Path(args.baseline_run)
    return RUNS / name


def run_train(args: argparse.Namespace) -> None:
    precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    command = [sys.executable, "-m", "difflab", "train", PRESET, "--quiet", "--set",
               f"train.out_dir={run_folder(args.variant, args)}", "--set", f"train.max_minutes={args.minutes}",
               "--set", f"train.precision={precision}", *[item for o in VARIANTS[args.variant] for item in ("--set", o)]]
    subprocess.run(command, check=True, cwd=REPO)


def run_sample(args: argparse.Namespace) -> None:
    folder = run_folder(args.variant, args)
    subprocess.run([sys.executable, "-m", "difflab", "eval", str(folder), "--n", str(args.n), "--out",
                    str(folder / f"eval_n{args.n}.json")], check=True, cwd=REPO)


def run_report(args: argparse.Namespace) -> None:
    rows, results = [], {}
    for name in VARIANTS:
        folder = run_folder(name, args)
        evals = sorted(folder.glob("eval_n*.json"))
        if not evals:
            continue
        record = json.loads(evals[-1].read_text())
        metrics = record["metrics"]
        config = json.loads((folder / "config.json").read_text())
        results[name] = {"fid": metrics["fid"], "precision": metrics["precision"], "recall": metrics["recall"],
                         "training_steps": record.get("step"), "n": record.get("n"), "run": str(folder),
                         "unet": config["model"]["unet"]}
        rows.append([name, str(record.get("step")), f"{metrics['fid']:.2f}",
                     f"{metrics['precision']:.3f} / {metrics['recall']:.3f}", PAPER[name]])
    table = markdown_table(["U-Net", "steps in 30 min", "FID, 10k", "precision / recall", "ADM's Table 1"], rows)
    write_results("adm_ablation", {"results": results, "machine": machine_info(), "command": command_line()},
                  "# ADM's architecture ablation on Fashion-MNIST\n\n" + (__doc__ or "") + "\n" + table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-run", default=None, help="an already trained preset run to report as baseline")
    sub = parser.add_subparsers(dest="phase", required=True)
    train = sub.add_parser("train")
    train.add_argument("variant", choices=sorted(VARIANTS))
    train.add_argument("--minutes", type=float, default=30.0)
    train.set_defaults(func=run_train)
    draw = sub.add_parser("sample")
    draw.add_argument("variant", choices=sorted(VARIANTS))
    draw.add_argument("--n", type=int, default=10000)
    draw.set_defaults(func=run_sample)
    sub.add_parser("report").set_defaults(func=run_report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
