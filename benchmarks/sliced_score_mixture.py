"""Sliced against denoising score matching on the exact Gaussian mixture (issue 24): the relative score error
E||s_theta - s||^2 / E||s||^2 of the same network, trained for the same steps, at several noise levels.

The data are an 8-component ring mixture (radius 1.5, std 0.15; ``difflab.references``), in 2-D and embedded
in more dimensions (the ring in the first two coordinates, N(0, 0.15^2) in the others), where the sliced
estimator's projections v^T (ds/dx) v carry more variance. The model is NCSN's: a VP eps network on a geometric
schedule of 100 noise levels from 0.01 to 5 (Song & Ermon 2019), so both losses weight the levels by sigma^2,
and the same 3-layer MLP (128 wide) from the same seed. Each run trains ``--steps`` steps of batch 512 (Adam
2e-3) with the trainer and the objective that ``train.loss`` builds: L_simple (denoising score matching) or
the sliced loss (SSM-VR, with M Rademacher or Gaussian projections). The error is that of the EMA weights'
score (D - x) / sigma^2 against the mixture's exact score of p_sigma, on samples of p_sigma; an untrained
(zero-output) network's error is 1.

    python benchmarks/sliced_score_mixture.py [--steps 2000] [--dims 2 16]
        # benchmarks/results/sliced_score_mixture.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.config import Config, TrainConfig  # noqa: E402
from difflab.data import InMemoryData  # noqa: E402
from difflab.denoiser import Denoiser, VPPrecond  # noqa: E402
from difflab.losses import build_loss, denoiser_score  # noqa: E402
from difflab.nets.mlp import MLP, MLPConfig  # noqa: E402
from difflab.references import GaussianMixture  # noqa: E402
from difflab.schedules import NoiseSchedule, geometric_betas  # noqa: E402
from difflab.train.objectives import DiffusionObjective, SlicedScoreObjective, diffusion_levels  # noqa: E402
from difflab.train.trainer import Trainer  # noqa: E402

SCHEDULE = NoiseSchedule.from_betas(geometric_betas(100, 0.01, 5.0))
RUNS = {                                       # name: (loss, projections, distribution)
    "DSM (L_simple)": ("simple", 0, ""),
    "SSM-VR, Rademacher, M=1": ("sliced", 1, "rademacher"),
    "SSM-VR, Gaussian, M=1": ("sliced", 1, "gaussian"),
    "SSM-VR, Rademacher, M=4": ("sliced", 4, "rademacher"),
}
EVAL_SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
N_TRAIN, N_EVAL = 20000, 20000


def ring(dim: int) -> GaussianMixture:
    return GaussianMixture.ring(8, radius=1.5, std=0.15, dim=dim)


def objective(denoiser: Denoiser, loss: str, projections: int, distribution: str):
    levels = diffusion_levels(denoiser, "uniform", 0.0, 1.0)
    if loss == "sliced":
        return SlicedScoreObjective(denoiser, levels, projections, distribution)
    return DiffusionObjective(denoiser, build_loss(loss), levels)


def train(mixture: GaussianMixture, loss: str, projections: int, distribution: str, steps: int, batch: int,
          folder: Path) -> tuple[Denoiser, float]:
    torch.manual_seed(0)
    data = InMemoryData(mixture.sample(N_TRAIN, torch.Generator().manual_seed(5)).float(), name="ring")
    denoiser = Denoiser(MLP(MLPConfig(dim=mixture.dim, hidden=128, depth=3)), VPPrecond(SCHEDULE, "eps"))
    config = Config(train=TrainConfig(out_dir=str(folder), steps=steps, batch_size=batch, lr=2e-3,
                                      warmup_steps=min(100, steps // 10), ema_halflife_images=50000,
                                      ema_rampup_ratio=0.1, log_every=max(1, steps // 10), sample_every=10 ** 9,
                                      checkpoint_every=10 ** 9))
    start = time.perf_counter()
    trainer = Trainer(config, objective(denoiser, loss, projections, distribution), data, progress=False)
    trainer.run()
    return denoiser.with_net(trainer.ema.model).eval(), time.perf_counter() - start


def exact_score(mixture: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The score of p_sigma (x = x0 + sigma z): the mixture with variances s_k^2 + sigma^2."""
    return GaussianMixture(mixture.means, (mixture.stds ** 2 + sigma ** 2).sqrt(), mixture.weights).score(x, 1.0)


def score_error(model: Denoiser, mixture: GaussianMixture, sigma: float) -> float:
    """E||s_theta - s||^2 / E||s||^2 on N_EVAL samples of p_sigma."""
    g = torch.Generator().manual_seed(9)
    x = mixture.sample(N_EVAL, g) + sigma * torch.randn(N_EVAL, mixture.dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        s = denoiser_score(model, x.float(), torch.full((N_EVAL,), sigma, dtype=torch.float64)).double()
    exact = exact_score(mixture, x, sigma)
    return ((s - exact).square().sum(1).mean() / exact.square().sum(1).mean()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    results: dict = {}
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for dim in args.dims:
            mixture, rows = ring(dim), []
            results[f"dim_{dim}"] = {}
            for name, (loss, projections, distribution) in RUNS.items():
                folder = Path(tmp) / f"{dim}" / f"{loss}_{projections}_{distribution}"
                model, seconds = train(mixture, loss, projections, distribution, args.steps, args.batch, folder)
                errors = {str(sigma): score_error(model, mixture, sigma) for sigma in EVAL_SIGMAS}
                results[f"dim_{dim}"][name] = {"loss": loss, "projections": projections,
                                               "distribution": distribution or None, "train_seconds": seconds,
                                               "relative_score_error": errors}
                rows.append([name, *(f"{errors[str(sigma)]:.4f}" for sigma in EVAL_SIGMAS), f"{seconds:.1f}"])
                print(dim, name, results[f"dim_{dim}"][name], file=sys.stderr)
            sections.append(f"## {dim} dimensions\n\n"
                            + markdown_table(["run", *(f"sigma {s:g}" for s in EVAL_SIGMAS), "training s"], rows))
    markdown = (f"# Sliced vs denoising score matching on the exact Gaussian mixture\n\n`{command_line()}`: "
                f"{args.steps} steps of batch {args.batch} for every run; relative score error "
                f"E||s_theta - s||^2 / E||s||^2 of the EMA weights on {N_EVAL} samples of p_sigma (an untrained "
                f"network: 1).\n\n" + "\n\n".join(sections) + "\n")
    write_results("sliced_score_mixture", {"results": results, "steps": args.steps, "batch": args.batch,
                                            "eval_sigmas": list(EVAL_SIGMAS), "command": command_line(),
                                            "machine": machine_info()}, markdown, args.out_dir)
    print(markdown)


if __name__ == "__main__":
    main()
