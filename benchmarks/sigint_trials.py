"""Ctrl-C at random moments: every interrupted and resumed run must equal the uninterrupted one, bit for bit.

A tiny toy run (``configs/toy.yaml``, hidden 16, depth 1, batch 16) is trained once without interruption.
Then, ``--trials`` times: ``difflab train`` starts in a fresh folder, receives SIGINT at a uniformly random
moment between the start of training (its run-folder lock appears) and the uninterrupted run's training
time (measured the same way),
and is resumed with ``--resume`` to the end. The final checkpoint's tensors (model, EMA, optimiser) are
compared with the uninterrupted run's. Results: ``benchmarks/results/sigint_trials.{json,md}``.

    python benchmarks/sigint_trials.py --trials 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
SETTINGS = ["model.mlp.hidden=16", "model.mlp.depth=1", "train.batch_size=16", "train.log_every=100",
            "train.checkpoint_every=250", "train.sample_every=100000"]


def train_command(out: Path, steps: int, resume: bool = False) -> list[str]:
    sets = [arg for s in SETTINGS + [f"train.out_dir={out}", f"train.steps={steps}"] for arg in ("--set", s)]
    return [sys.executable, "-m", "difflab", "train", str(REPO / "configs/toy.yaml"), "--quiet", *sets,
            *(["--resume"] if resume else [])]


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint.safetensors"))


def trial(out: Path, steps: int, duration: float, rng: random.Random) -> dict:
    process = subprocess.Popen(train_command(out, steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=ONE_THREAD)
    while not (out / ".lock").exists() and process.poll() is None:
        time.sleep(0.002)
    delay = rng.uniform(0, duration)
    time.sleep(delay)
    interrupted = process.poll() is None
    if interrupted:
        process.send_signal(signal.SIGINT)
    code = process.wait()
    stderr = process.stderr.read().decode()
    step = None
    if (out / "checkpoint.safetensors").exists():
        with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as f:
            step = json.loads(f.metadata()["state"])["step"]
    resumed = subprocess.run(train_command(out, steps, resume=True), capture_output=True, text=True,
                             env=ONE_THREAD)
    return {"delay_s": round(delay, 4), "interrupted": interrupted, "exit_code": code, "saved_step": step,
            "traceback": "Traceback" in stderr, "resume_exit_code": resumed.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=REPO / "runs/sigint")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    reference = args.runs / "reference"
    subprocess.run(["rm", "-rf", str(args.runs)], check=True)
    process = subprocess.Popen(train_command(reference, args.steps), stdout=subprocess.DEVNULL, env=ONE_THREAD)
    while not (reference / ".lock").exists() and process.poll() is None:
        time.sleep(0.002)
    start = time.perf_counter()                      # training time only: from the lock to the end
    if process.wait() != 0:
        sys.exit("sigint_trials: the reference run failed")
    duration = time.perf_counter() - start
    expected = final_tensors(reference)
    rows, results = [], []
    for i in range(args.trials):
        out = args.runs / f"trial_{i:03d}"
        result = trial(out, args.steps, duration, rng)
        final = final_tensors(out)
        result["identical"] = final.keys() == expected.keys() and all(torch.equal(final[k], expected[k])
                                                                      for k in expected)
        results.append(result)
        rows.append([i, f"{result['delay_s']:.3f}", result["interrupted"], result["exit_code"], result["saved_step"],
                     result["identical"]])
        print(i, result, file=sys.stderr)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    interrupted = [r for r in results if r["exit_code"] == 130]          # stopped by the Ctrl-C mid-run
    summary = {"trials": len(results), "interrupted": len(interrupted),
               "after_training": sum(r["interrupted"] and r["exit_code"] == 0 for r in results),
               "identical": sum(r["identical"] for r in results),
               "interrupted_and_identical": sum(r["identical"] for r in interrupted),
               "tracebacks": sum(r["traceback"] for r in results), "reference_seconds": duration}
    markdown = (f"# Ctrl-C at random moments\n\n`{command_line()}`: {summary['interrupted']} of {summary['trials']} "
                f"runs were stopped by SIGINT during training (exit code 130; {summary['after_training']} more "
                f"received it after the last step, while writing the final checkpoint or preview, and finished "
                f"normally); {summary['interrupted_and_identical']} of the stopped ones, after "
                f"`--resume`, are bit-identical to the uninterrupted run (model, EMA and optimiser tensors); "
                f"{summary['tracebacks']} printed a traceback.\n\n"
                + markdown_table(["trial", "delay s", "interrupted", "exit code", "saved step", "identical"], rows)
                + "\n")
    write_results("sigint_trials", {"summary": summary, "trials": results, "command": command_line(),
                                    "machine": machine_info()}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
