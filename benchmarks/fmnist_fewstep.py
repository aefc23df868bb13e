"""Few-step generation on Fashion-MNIST: progressive distillation, consistency distillation (CD), consistency
training (CT) and improved consistency training (iCT) at 1, 2, 4 and 8 network evaluations, beside their
teacher at 20 and at the same few evaluations with its own ODE samplers (issue 15).

- teacher: the 30-minute v-prediction preset of the budget race (``benchmarks/fmnist_budget.py``,
  ``runs/budget/difflab``); its 20-NFE row is the race's (Heun, 10 steps on the log-SNR grid 80 .. 0.1),
  its few-step rows use DDIM on the trailing grid (the grid its distilled students use), DPM-Solver++(2M)
  on the log-SNR grid 80 .. 0.1 (the preset's grid; at 4, 5 and 8 steps), and any grid optimised for the
  model that ``difflab.pipelines.grid_search`` stored in ``runs/budget/difflab/grids`` (chosen without data,
  by matching the model's own 100-step ODE solutions);
- progressive: ``configs/fmnist_progressive.yaml`` from that teacher, each student sampled with DDIM on
  its own grid (the N-step student at N steps);
- cd: ``configs/fmnist_cd.yaml`` from the same teacher; ct, ict: ``configs/fmnist_ct.yaml``,
  ``configs/fmnist_ict.yaml``, from scratch; all sampled with Song et al. 2023's Alg. 1 on the Karras
  (rho = 7) levels of their config (1 step: sigma_max alone).

Every row draws 10,000 samples (seeds 0..9999) on one thread and is scored against the test set with the
shipped classifier's features (``difflab.pipelines.evaluate``); nothing here was chosen on the test set.
Training minutes are one thread's, from the checkpoints (progressive: the sum of its rounds down to
each column's student, 1-step first; the teacher's 30 minutes come on top for progressive and cd).

    python benchmarks/fmnist_fewstep.py sample teacher progressive cd ct ict   # --steps 1,2,4,5,8 --n 10000
    python benchmarks/fmnist_fewstep.py report             # benchmarks/results/fmnist_fewstep.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.checkpoint import load_checkpoint  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, evaluate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEACHER = REPO / "runs/budget/difflab"
RUNS = REPO / "runs/fewstep"
STEPS = (1, 2, 4, 5, 8)
METHODS = ("progressive", "cd", "ct", "ict")
TEACHER_SAMPLERS = {        # the teacher's own ODE samplers at few steps, and the step counts they are run at
    "ddim, trailing": ({"sampler": "ddim", "spacing": "trailing", "sigma_min": None, "sigma_max": None},
                       (1, 2, 4, 8)),
    "dpmpp-2m, logsnr 80..0.1": ({"sampler": "dpmpp-2m", "spacing": "logsnr", "sigma_min": 0.1, "sigma_max": 80.0},
                                 (4, 5, 8)),     # at 1 and 2 steps DPM-Solver++(2M) is DDIM on another grid
}


def checkpoint_of(method: str, steps: int) -> Path:
    if method == "teacher":
        return TEACHER / "checkpoint.safetensors"
    if method == "progressive":
        return RUNS / "progressive" / f"steps_{steps:04d}" / "checkpoint.safetensors"
    return RUNS / method / "checkpoint.safetensors"


def training_minutes(method: str, steps: int) -> float:
    """One thread's training minutes of the model behind a row (progressive: its rounds down to ``steps``)."""
    if method == "teacher":
        return float(load_checkpoint(checkpoint_of("teacher", 1)).state["train_seconds"]) / 60
    if method == "progressive":
        rounds = [p for p in (RUNS / "progressive").glob("steps_*") if int(p.name[6:]) >= steps]
        return sum(float(load_checkpoint(p / "checkpoint.safetensors").state["train_seconds"]) for p in rounds) / 60
    return float(load_checkpoint(checkpoint_of(method, steps)).state["train_seconds"]) / 60


def row_samplings(method: str, steps: int) -> dict[str, dict]:
    """The sampler settings of a method's rows at ``steps`` evaluations, by label."""
    if method != "teacher":
        return {"own": {"steps": steps}}
    rows = {label: {**options, "steps": steps} for label, (options, at) in TEACHER_SAMPLERS.items() if steps in at}
    for grid in sorted((TEACHER / "grids").glob(f"*_nfe{steps}.json")):
        saved = json.loads(grid.read_text())
        rows[f"{saved['sampler']}, optimised grid"] = {"sampler": saved["sampler"], "sigmas": tuple(saved["sigmas"])}
    return rows


def eval_path(method: str, label: str, steps: int, n: int) -> Path:
    slug = label.replace(", ", "_").replace(" ", "_").replace("..", "-")
    return RUNS / "evals" / f"{method}_{slug}_{steps}steps_n{n}.json"


def run_sample(args: argparse.Namespace) -> None:
    for method in args.methods:
        for steps in args.steps:
            for label, sampling in row_samplings(method, steps).items():
                out = eval_path(method, label, steps, args.n)
                if out.exists() or (args.samplers and label not in args.samplers):
                    continue
                checkpoint = checkpoint_of(method, steps)
                options = dataclasses.replace(load_checkpoint(checkpoint).config.sample, **sampling)
                report = evaluate(checkpoint, EvalOptions(n=args.n, progress=False), options)
                result = {"method": method, "sampler": label, "steps": steps, "n": args.n,
                          "sampling": report["sampling"], "sampling_seconds": report["sampling_seconds"],
                          "threads": torch.get_num_threads(), "checkpoint": report["checkpoint"],
                          "train_minutes": training_minutes(method, steps), "command": command_line(),
                          "metrics": {k: report["metrics"][k] for k in ("fid", "kid", "precision", "recall")}}
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1))
                print(f"{method} / {label} / {steps}: FID {result['metrics']['fid']:.2f}", file=sys.stderr)


def run_report(args: argparse.Namespace) -> None:
    results = [json.loads(p.read_text()) for p in sorted((RUNS / "evals").glob(f"*_n{args.n}.json"))]
    race = json.loads((TEACHER / f"eval_nfe20_n{args.n}.json").read_text())
    teacher_fid = race["metrics"]["fid"]
    cell = {(r["method"], r["sampler"], r["steps"]): r for r in results}
    labels = sorted({(r["method"], r["sampler"]) for r in results},
                    key=lambda m: (["teacher", *METHODS].index(m[0]), m[1]))
    header = ["method", "sampler", *(f"{s} step{'s' if s > 1 else ''}" for s in STEPS), "training minutes"]
    rows = [["teacher", f"{race['sampler']}: FID {teacher_fid:.2f} at 19 NFE", *([""] * len(STEPS)),
             f"{race['train']['seconds'] / 60:.0f}"]]
    for method, label in labels:
        fids = [cell.get((method, label, s)) for s in STEPS]
        minutes = [f"{r['train_minutes']:.0f}" for r in fids if r is not None]
        rows.append([method, label, *(f"{r['metrics']['fid']:.2f}" if r else "" for r in fids),
                     " / ".join(dict.fromkeys(minutes))])
    targets = []

    def fid(method: str, steps: int) -> float | None:
        r = cell.get((method, "own", steps))
        return r["metrics"]["fid"] if r else None
    for method, steps, bar, what in (("cd", 1, 2.0, "CD 1 step"), ("cd", 2, 1.5, "CD 2 steps"),
                                     ("progressive", 4, 1.5, "progressive distillation 4 steps")):
        value = fid(method, steps)
        if value is not None:
            targets.append(f"- {what}: FID {value:.2f} = {value / teacher_fid:.2f} x the teacher's 20-NFE "
                           f"{teacher_fid:.2f} (target at most {bar:g} x): {'met' if value <= bar * teacher_fid else 'not met'}")
    if fid("ict", 1) is not None:
        value = fid("ict", 1)
        targets.append(f"- iCT from scratch, 1 step: FID {value:.2f} = {value / 3.03:.2f} x the preset's 3.03 "
                       f"(target at most 3 x): {'met' if value <= 3 * 3.03 else 'not met'}")
    markdown = (f"# Few-step generation on Fashion-MNIST\n\n`{command_line()}`: FID of {args.n} samples per cell "
                f"(seeds 0..{args.n - 1}) against the test set, the shipped classifier's features; one CPU thread. "
                f"Columns are network evaluations (NFE). Teacher: the 30-minute budget-race model "
                f"(v-prediction), FID {teacher_fid:.2f} at 19 NFE.\n\n" + "\n".join(targets) + "\n\n"
                + markdown_table(header, rows) + "\n")
    write_results(f"fmnist_fewstep_n{args.n}", {"results": results, "teacher_20nfe": race, "command": command_line(),
                                                 "machine": machine_info()}, markdown)
    print(markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="draw and score a method's rows")
    sample.add_argument("methods", nargs="+", choices=("teacher", *METHODS))
    sample.add_argument("--steps", type=lambda s: [int(v) for v in s.split(",")], default=list(STEPS))
    sample.add_argument("--n", type=int, default=10000)
    sample.add_argument("--samplers", type=lambda s: s.split(";"), default=None,
                        help="only the teacher rows of these labels (separated by ;)")
    report = commands.add_parser("report", help="the table")
    report.add_argument("--n", type=int, default=10000)
    args = parser.parse_args(argv)
    run_sample(args) if args.command == "sample" else run_report(args)


if __name__ == "__main__":
    main()
