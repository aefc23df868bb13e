"""Consistency models on the exact Gaussian mixture: CD with the teacher's Heun or Euler step, L2 or
pseudo-Huber distance, against CT and iCT, by the sliced Wasserstein distance of 1- and 2-step samples to
the true distribution (issue 15: "the teacher's Heun step (and Euler, to compare)").

The teacher is the Bayes-optimal denoiser of an 8-component ring mixture (``difflab.references``) on a
linear VP schedule of 1000 steps, so CD's only error is the student's; the student is a 3-layer MLP (128
wide) with ``ConsistencyPrecond`` (sigma_data measured on its 20,000 training points). Every run trains
``--steps`` steps of batch 512 (AdamW 2e-3, EMA for sampling) from the same seed; CD uses N = 18 levels and
a target EMA of 0.9. The floor of the distance is that of a second set of true samples.

    python benchmarks/consistency_mixture.py [--steps 600]   # benchmarks/results/consistency_mixture.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.config import Config, TrainConfig  # noqa: E402
from difflab.data import InMemoryData  # noqa: E402
from difflab.denoiser import ConsistencyPrecond, Denoiser, VPPrecond  # noqa: E402
from difflab.metrics import sliced_wasserstein  # noqa: E402
from difflab.nets.mlp import MLP, MLPConfig  # noqa: E402
from difflab.references import ExactEpsNet, GaussianMixture  # noqa: E402
from difflab.samplers import generate, karras_sigmas, sample_consistency  # noqa: E402
from difflab.schedules import NoiseSchedule  # noqa: E402
from difflab.train.consistency import ConsistencyObjective  # noqa: E402
from difflab.train.trainer import Trainer  # noqa: E402

MIXTURE = GaussianMixture.ring(8, radius=1.5, std=0.15)
SCHEDULE = NoiseSchedule.from_name("linear", 1000)
RUNS = {                                       # name: (method, solver, distance)
    "CD, Heun, L2": ("cd", "heun", "l2"),
    "CD, Euler, L2": ("cd", "euler", "l2"),
    "CD, Heun, pseudo-Huber": ("cd", "heun", "pseudo_huber"),
    "CD, Euler, pseudo-Huber": ("cd", "euler", "pseudo_huber"),
    "CT, L2": ("ct", "heun", "l2"),
    "iCT, pseudo-Huber": ("ict", "heun", "pseudo_huber"),
}
N_SAMPLES = 10000


def train(method: str, solver: str, distance: str, steps: int, folder: Path) -> tuple[Denoiser, float]:
    torch.manual_seed(0)
    data = InMemoryData(MIXTURE.sample(20000, torch.Generator().manual_seed(5)).float(), name="ring")
    precond = ConsistencyPrecond(data.data.std().item(), SCHEDULE.sigmas[0].item(), 80.0)
    student = Denoiser(MLP(MLPConfig(dim=2, hidden=128, depth=3)), precond)
    teacher = Denoiser(ExactEpsNet(MIXTURE, SCHEDULE), VPPrecond(SCHEDULE, "eps")) if method == "cd" else None
    objective = ConsistencyObjective(student, method, steps, teacher, solver, distance, levels=18, target_ema=0.9)
    config = Config(train=TrainConfig(out_dir=str(folder), steps=steps, batch_size=512, lr=2e-3, warmup_steps=20,
                                      ema_halflife_images=20000, ema_rampup_ratio=0.1, log_every=100,
                                      sample_every=10 ** 9, checkpoint_every=10 ** 9))
    start = time.perf_counter()
    trainer = Trainer(config, objective, data, progress=False)
    trainer.run()
    return student.with_net(trainer.ema.model).eval(), time.perf_counter() - start


def distance_to_truth(model: Denoiser, steps: int, truth: torch.Tensor) -> float:
    levels = karras_sigmas(steps + 1, model.precond.sigma_min, 80.0)
    grid = torch.cat([levels[:-2], levels[-1:]])                         # Alg. 1's levels, as ``difflab sample``
    samples = generate(sample_consistency, model, grid, (2,), list(range(N_SAMPLES)), batch_size=N_SAMPLES,
                       prior_std=80.0)
    return sliced_wasserstein(samples.double(), truth, 128, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    truth = MIXTURE.sample(N_SAMPLES, torch.Generator().manual_seed(9)).double()
    floor = sliced_wasserstein(MIXTURE.sample(N_SAMPLES, torch.Generator().manual_seed(10)).double(), truth, 128, seed=0)
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, solver, distance) in RUNS.items():
            model, seconds = train(method, solver, distance, args.steps, Path(tmp) / method / solver / distance)
            results[name] = {"method": method, "solver": solver, "distance": distance, "train_seconds": seconds,
                             **{f"sw_{k}step": distance_to_truth(model, k, truth) for k in (1, 2)}}
            rows.append([name, f"{results[name]['sw_1step']:.4f}", f"{results[name]['sw_2step']:.4f}", f"{seconds:.0f}"])
            print(name, results[name], file=sys.stderr)
    markdown = (f"# Consistency models on the exact Gaussian mixture\n\n`{command_line()}`: {args.steps} steps of "
                f"batch 512 each; sliced Wasserstein-1 of {N_SAMPLES} samples to as many true ones (floor: "
                f"{floor:.4f}, a second true set).\n\n"
                + markdown_table(["run", "1 step", "2 steps", "training s"], rows) + "\n")
    write_results("consistency_mixture", {"results": results, "floor": floor, "steps": args.steps,
                                           "command": command_line(), "machine": machine_info()}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
