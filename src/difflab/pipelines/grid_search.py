"""Noise-level grids optimised for one ODE solver and one budget of network evaluations, from the model alone.

A few-step solver loses most of its accuracy to where its few noise levels sit, and the best places depend on
the model, the solver and the budget. Align Your Steps (Sabour et al. 2024) optimises the levels for a given
solver by minimising an upper bound on the KL divergence between the discretised and the exact reverse SDE,
estimated on data; here, as in the teacher-trajectory criteria of GITS (Chen et al. 2024, "On the Trajectory
Regularity of ODE-based Diffusion Sampling") and of Xue et al. 2024 ("Accelerating Diffusion Sampling with
Optimized Time Steps"), the target is the model's own probability-flow ODE, so no data is needed
("trajectory matching"):

1. reference: for n fixed seeds, x_ref(z) = a fine solve of the ODE (DPM-Solver++(2M), Lu et al. 2022, with
   ``reference_steps`` levels uniform in log-SNR from sigma_max to sigma_min) from x = z prior_std(sigma_max);
2. criterion: L(grid) = mean_i ||x_grid(z_i) - x_ref(z_i)|| / sqrt(D), the few-step solver started from the
   same z (at its own first level, x = z prior_std(sigma_0)). The pairs are one coupling of the two sample
   distributions, so L sqrt(D) bounds their Wasserstein-1 distance: lowering it draws the few-step samples
   to the model's distribution, not only to its trajectories. ``trajectory-mse`` averages the squares instead
   (a bound on W2^2, more sensitive to the few samples that land between modes);
3. parameters: the grid's N levels (N from the budget: ``steps_for_nfe``, Heun spends 2N - 1), unconstrained
   as theta_0 = log(sigma_max / sigma_0) reflected at 0 (so sigma_0 <= sigma_max) and theta_i =
   log log(sigma_{i-1} / sigma_i) (positive log-gaps: every theta is a decreasing grid); a grid whose last
   level falls below sigma_min is rejected (infinite loss). The last level matters most for the
   data-prediction solvers, whose final step returns D(x; sigma_{N-1});
4. search: Nelder-Mead (Nelder & Mead 1965) with the dimension-adapted coefficients of Gao & Han 2012, from
   the logsnr grid of the same N levels, so the result is never worse than that grid on the criterion.

Everything is seeded (the noise of sample i comes from seed ``seed + i``), so the same call gives the same
grid. A grid's cost is N_eval (about 60 per level) sampler runs of n samples plus one reference solve.
``tune_grid`` does this for a checkpoint and writes the grid beside it; ``load_grid`` reads it back for
``SampleConfig.sigmas`` / ``sampler``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from difflab.conditioning import Cond
from difflab.errors import DifflabError
from difflab.files import write_text
from difflab.pipelines.ddpm import class_condition, guided, load_model
from difflab.samplers import SAMPLERS, generate, logsnr_sigmas, steps_for_nfe

ODE_SAMPLERS = ("ddim", "euler", "heun", "dpmpp-2m", "unipc")     # deterministic: trajectories can be matched
CRITERIA = ("trajectory", "trajectory-mse")
REFERENCE_SAMPLER = "dpmpp-2m"
DEFAULT_SEED = 1_000_000      # search noise apart from the seeds 0, 1, ... that sampling and evaluation use
EVALS_PER_LEVEL = 60          # Nelder-Mead budget per level (twice as many: < 10% lower loss on a held-out mixture)
X_TOL, F_TOL = 1e-2, 1e-4     # stop when the simplex spans < 1% in log sigma and < 0.01% in loss
SIMPLEX_STEP = 0.5            # edges of the first simplex in theta: sigma_0 by a factor e^0.5, gaps likewise


@dataclass(frozen=True)
class OptimisedGrid:
    sampler: str
    nfe: int                          # the budget (Heun: 2 len(sigmas) - 1 <= nfe evaluations, others len(sigmas))
    sigmas: tuple[float, ...]         # decreasing, without the final 0: ``SampleConfig.sigmas``
    loss: float                       # the criterion at ``sigmas``
    start_sigmas: tuple[float, ...]   # the logsnr grid the search started from
    start_loss: float
    criterion: str
    reference: dict                   # the reference solve: sampler, steps, spacing, sigma_max, sigma_min
    n_samples: int
    seed: int
    evaluations: int

    def to_json(self) -> dict:
        return asdict(self)


# -- the criterion -------------------------------------------------------------------------------------------
def distance(x: torch.Tensor, reference: torch.Tensor, criterion: str) -> float:
    """Mean over samples of ||x - x_ref|| / sqrt(D) (``trajectory``) or of its square (``trajectory-mse``)."""
    per_sample = (x.double() - reference.double()).flatten(1).norm(dim=1) / math.sqrt(x[0].numel())
    return (per_sample if criterion == "trajectory" else per_sample ** 2).mean().item()


def grid_of(theta: Sequence[float], sigma_max: float) -> list[float]:
    """Step 3: theta -> sigma_0 = sigma_max exp(-|theta_0|) > sigma_1 > ..., log-gaps exp(theta_i)."""
    log_sigmas = [math.log(sigma_max) - abs(theta[0])]
    for t in theta[1:]:
        log_sigmas.append(log_sigmas[-1] - math.exp(t))
    return [math.exp(s) for s in log_sigmas]


def theta_of(sigmas: Sequence[float], sigma_max: float) -> list[float]:
    """The inverse of ``grid_of`` for a decreasing grid below sigma_max."""
    return [math.log(sigma_max / sigmas[0])] + [math.log(math.log(a / b)) for a, b in zip(sigmas, sigmas[1:])]


# -- the search ----------------------------------------------------------------------------------------------
def nelder_mead(f: Callable[[list[float]], float], start: Sequence[float], start_value: float,
                steps: Sequence[float], max_evals: int,
                on_eval: Callable[[float], None] = lambda value: None) -> tuple[list[float], float, int]:
    """Minimise f from ``start`` (where f is ``start_value``) over a first simplex of vertices start + steps[i]
    e_i (Nelder & Mead 1965; reflection, expansion, contraction and shrink coefficients 1, 1 + 2/n,
    3/4 - 1/(2n), 1 - 1/n of Gao & Han 2012). f may be inf (infeasible). Returns (x, f(x), evaluations of f,
    the start's included)."""
    n = len(start)
    alpha, gamma, rho, shrink = 1.0, 1 + 2 / n, 0.75 - 1 / (2 * n), 1 - 1 / n
    evals = 1

    def value(x: list[float]) -> float:
        nonlocal evals
        evals += 1
        y = f(x)
        on_eval(y)
        return y

    def towards(a: list[float], b: list[float], t: float) -> list[float]:       # a + t (b - a)
        return [ai + t * (bi - ai) for ai, bi in zip(a, b)]

    simplex = [list(start)] + [[s + (steps[i] if j == i else 0.0) for j, s in enumerate(start)] for i in range(n)]
    values = [start_value] + [value(x) for x in simplex[1:]]
    while evals < max_evals:
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        spread = max(abs(a - b) for x in simplex[1:] for a, b in zip(x, simplex[0]))
        if spread < X_TOL and values[-1] - values[0] <= F_TOL * abs(values[0]):
            break
        centroid = [sum(x[j] for x in simplex[:-1]) / n for j in range(n)]
        reflected = towards(centroid, simplex[-1], -alpha)
        f_r = value(reflected)
        if f_r < values[0]:                                                     # expand
            expanded = towards(centroid, reflected, gamma)
            f_e = value(expanded)
            simplex[-1], values[-1] = (expanded, f_e) if f_e < f_r else (reflected, f_r)
        elif f_r < values[-2]:                                                  # accept the reflection
            simplex[-1], values[-1] = reflected, f_r
        else:                                                                   # contract outside or inside
            contracted = towards(centroid, reflected if f_r < values[-1] else simplex[-1], rho)
            f_c = value(contracted)
            if f_c < min(f_r, values[-1]):
                simplex[-1], values[-1] = contracted, f_c
            else:                                                               # shrink towards the best
                for i in range(1, n + 1):
                    simplex[i] = towards(simplex[0], simplex[i], shrink)
                    values[i] = value(simplex[i])
    best = min(range(n + 1), key=values.__getitem__)
    return simplex[best], values[best], evals


def optimise_grid(model: Callable, sampler: str, nfe: int, shape: Sequence[int], n_samples: int = 256,
                  cond: Cond | None = None, sigma_max: float | None = None, sigma_min: float | None = None,
                  criterion: str = "trajectory", reference_steps: int = 100, max_evals: int | None = None,
                  seed: int = DEFAULT_SEED, batch_size: int = 256, device: torch.device | str = "cpu",
                  progress: bool = False) -> OptimisedGrid:
    """The grid of ``sampler`` for ``nfe`` network evaluations that minimises ``criterion`` for the denoiser
    ``model`` (D(x; sigma, cond), a ``Denoiser`` or a wrapper: guidance and thresholds are part of the ODE
    solved) on samples of ``shape`` from seeds ``seed .. seed + n_samples - 1``; ``cond`` holds one row per
    sample. Levels lie in [sigma_min, sigma_max] (default: the model's range, from at most sigma 80)."""
    if sampler not in ODE_SAMPLERS:
        raise DifflabError(f"grids are optimised for the deterministic samplers {ODE_SAMPLERS}, not {sampler!r}")
    if criterion not in CRITERIA:
        raise DifflabError(f"unknown grid criterion {criterion!r}; choose one of {CRITERIA}")
    if nfe < 1 or n_samples < 1 or reference_steps < 2:
        raise DifflabError(f"need nfe >= 1, n_samples >= 1 and reference_steps >= 2, got {nfe}, {n_samples}, "
                           f"{reference_steps}")
    precond = model.precond
    sigma_max = precond.default_sigma_max if sigma_max is None else sigma_max
    sigma_min = precond.sigma_min if sigma_min is None else sigma_min
    if not 0 < sigma_min < sigma_max:
        raise DifflabError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    seeds = list(range(seed, seed + n_samples))

    def run(name: str, sigmas: Sequence[float], show: bool = False) -> torch.Tensor:
        grid = torch.tensor([*sigmas, 0.0], dtype=torch.float64)
        return generate(SAMPLERS[name], model, grid, shape, seeds, batch_size, cond, device, show,
                        prior_std=precond.prior_std(sigmas[0]))

    # 1. the reference solve
    reference = run(REFERENCE_SAMPLER, logsnr_sigmas(reference_steps, sigma_min, sigma_max)[:-1].tolist(), progress)

    # 2. the criterion as a function of theta (3.)
    def loss(theta: list[float]) -> float:
        sigmas = grid_of(theta, sigma_max)
        if sigmas[-1] < sigma_min * (1 - 1e-9):                  # (the start's own last level, up to rounding)
            return math.inf
        return distance(run(sampler, sigmas), reference, criterion)

    # 4. Nelder-Mead from the logsnr grid
    levels = steps_for_nfe(sampler, nfe)
    start = logsnr_sigmas(levels, sigma_min, sigma_max)[:-1].tolist()
    max_evals = EVALS_PER_LEVEL * levels if max_evals is None else max_evals
    bar = tqdm(total=max_evals, desc=f"grid for {sampler}, NFE {nfe}", unit="run", disable=not progress)
    best = [math.inf]

    def on_eval(value: float) -> None:
        best[0] = min(best[0], value)
        bar.update(1)
        bar.set_postfix(loss=f"{best[0]:.5f}")

    theta0 = theta_of(start, sigma_max)
    start_loss = loss(theta0)
    on_eval(start_loss)
    # the start touches both bounds, so the first simplex steps inwards: sigma_0 lower, the gaps narrower
    inward = [SIMPLEX_STEP] + [-SIMPLEX_STEP] * (levels - 1)
    theta, value, evals = nelder_mead(loss, theta0, start_loss, inward, max_evals, on_eval)
    bar.close()
    sigmas = grid_of(theta, sigma_max) if value < start_loss else start      # the start is a vertex: value <= it
    reference_info = {"sampler": REFERENCE_SAMPLER, "steps": reference_steps, "spacing": "logsnr",
                      "sigma_max": sigma_max, "sigma_min": sigma_min}
    return OptimisedGrid(sampler, nfe, tuple(sigmas), value, tuple(start), start_loss, criterion, reference_info,
                         n_samples, seed, evals)


# -- grids stored with a checkpoint --------------------------------------------------------------------------
def grid_path(run_dir: str | Path, sampler: str, nfe: int) -> Path:
    return Path(run_dir) / "grids" / f"{sampler}_nfe{nfe}.json"


def tune_grid(checkpoint_path: str | Path, sampler: str, nfe: int, n_samples: int = 256,
              criterion: str = "trajectory", reference_steps: int = 100, max_evals: int | None = None,
              sigma_max: float | None = None, sigma_min: float | None = None, seed: int = DEFAULT_SEED,
              weights: str = "ema", batch_size: int = 256, device: str = "cpu", out: str | Path | None = None,
              progress: bool = True) -> dict:
    """Optimise the grid of ``sampler`` for ``nfe`` evaluations (``optimise_grid``, n_samples seeds from
    ``seed``) for a checkpoint (a run folder or its ``checkpoint.safetensors``; its EMA weights unless
    ``weights="model"``), with the thresholding and guidance of its preset (``config.sample``; a
    class-conditional model gets labels i % classes), and write it atomically to ``out``, by default
    RUN/grids/<sampler>_nfe<nfe>.json. Returns the file's content. ``sigma_max`` defaults to the preset's,
    else the model's; ``sigma_min`` to the model's."""
    started = time.perf_counter()
    loaded = load_model(checkpoint_path, weights, device)
    options = loaded.config.sample
    classes = loaded.spec.num_classes()
    cond = class_condition(torch.arange(n_samples) % classes) if classes else None
    model = guided(loaded.denoiser, loaded.spec, options, cond, device)
    result = optimise_grid(model, sampler, nfe, loaded.spec.sample_shape, n_samples, cond,
                           sigma_max if sigma_max is not None else options.sigma_max, sigma_min, criterion,
                           reference_steps, max_evals, seed, batch_size, device, progress)
    content = {**result.to_json(), "sigmas": list(result.sigmas), "start_sigmas": list(result.start_sigmas),
               "checkpoint": str(loaded.path), "step": loaded.step, "weights": loaded.weights,
               "guidance": options.guidance, "clip_x0": options.clip_x0,
               "dynamic_threshold": options.dynamic_threshold, "seconds": round(time.perf_counter() - started, 1)}
    path = Path(out) if out is not None else grid_path(loaded.path.parent, sampler, nfe)
    write_text(path, json.dumps(content, indent=1) + "\n")
    return content


def load_grid(path: str | Path) -> tuple[str, tuple[float, ...]]:
    """(sampler, sigmas) of a grid file written by ``tune_grid``: for ``SampleConfig.sampler`` and ``.sigmas``."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise DifflabError(f"grid file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DifflabError(f"cannot read grid file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DifflabError(f"grid file {path} is not valid JSON ({e})") from None
    if not isinstance(content, dict):
        raise DifflabError(f"grid file {path}: expected a JSON object with 'sampler' and 'sigmas'")
    sampler, sigmas = content.get("sampler"), content.get("sigmas")
    if not isinstance(sampler, str) or sampler not in SAMPLERS or sampler == "ancestral":
        raise DifflabError(f"grid file {path}: 'sampler' must be one of the sigma-space samplers "
                           f"{sorted(set(SAMPLERS) - {'ancestral'})}, got {sampler!r}")
    if (not isinstance(sigmas, list) or not sigmas
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in sigmas)):
        raise DifflabError(f"grid file {path}: 'sigmas' must be a non-empty list of numbers, got {sigmas!r}")
    if sigmas[-1] <= 0 or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise DifflabError(f"grid file {path}: 'sigmas' must be positive and decreasing (the final 0 is implied), "
                           f"got {sigmas}")
    nfe = content.get("nfe")
    if isinstance(nfe, int) and len(sigmas) != steps_for_nfe(sampler, nfe):
        raise DifflabError(f"grid file {path}: {len(sigmas)} levels do not match {sampler} at NFE {nfe} "
                           f"({steps_for_nfe(sampler, nfe)} levels)")
    return sampler, tuple(float(s) for s in sigmas)
