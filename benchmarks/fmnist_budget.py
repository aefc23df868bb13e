"""Fashion-MNIST under a fixed CPU budget: difflab's preset against the diffusers and lucidrains recipes.

Each contestant trains for the same wall-clock budget (``--minutes``, 30 by default) on one CPU thread
(``--threads``; with one thread the budget is also CPU time), then draws ``--n`` samples (10,000) with 20
network evaluations (NFE) from its EMA weights. FID, KID and precision/recall of the samples against the
Fashion-MNIST test set use the features of difflab's shipped classifier (``difflab.pipelines.evaluate``);
the peers' 32x32 samples are centre-cropped to the 28x28 of the data, whose padding they are.

Contestants, each with its own recipe's defaults (nothing tuned here):

- ``difflab``: ``configs/fashion_mnist.yaml`` with ``train.max_minutes`` set to the budget (1.07M-parameter
  U-Net on 28x28, cosine schedule, v-prediction, Min-SNR-5 loss weighting, batch 32, AdamW 2e-3 decayed to
  zero by a cosine over the time budget, EMA), in bf16 autocast where the CPU has native bf16 (AVX512-BF16
  or AMX; fp32 elsewhere); sampled as the preset recommends (its ``sample`` section): Heun's method on a
  log-SNR grid, 10 steps = 19 NFE (the best 20-NFE sampler on the 6-minute preset,
  ``benchmarks/results/fmnist_samplers_ddpm.md``, chosen before this benchmark first ran), from sigma 80
  (EDM's sigma_max, Karras et al. 2022, Sec. 5) down to sigma 0.1, then one jump to the denoised x_0. The
  cosine schedule's own range (2e4 .. 0.0064) spends 3 of the 10 steps above sigma 100 and the last on noise
  far below a grey level; the range was chosen on the first 30-minute model against 10,000 *training* images
  with seeds disjoint from the scored samples' (``benchmarks/results/fmnist_budget_tuning.md``), so the test
  set scored here played no part in it.
- ``difflab_edm``: ``configs/fashion_mnist_edm.yaml``, the same U-Net, data, optimiser and budget trained as
  EDM (Karras et al. 2022: Table 1's preconditioning with sigma_data measured on the training data, log-normal
  training sigmas, lambda = 1 / c_out^2); sampled as that preset recommends, EDM's own Heun sampler on the
  the same Heun 10 steps on the log-SNR grid from 80 to 0.1 (chosen against 10,000 *training* images on the
  first 30-minute EDM model, 2,000 samples with seeds 100000+: FID 5.04, EDM's own rho = 7 grid to 0.002
  6.81; the test set played no part).
- ``diffusers``: the recipe of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
  (``UNet2DModel`` + ``DDPMScheduler`` with 1000 linear-beta steps, eps, batch 16, AdamW 1e-4 with betas
  (0.95, 0.999) and weight decay 1e-6, 500 warm-up steps, gradient clipping at 1, ``EMAModel`` with
  decay 0.9999 and the inverse-gamma warm-up (power 3/4)). The model is sized for 32x32 on a CPU:
  block_out_channels (32, 64, 64), one ResNet layer per block, attention at 16x16 (1.11M parameters,
  0.51 GFLOP per image). The example decays the learning rate by a cosine over a known number of epochs;
  under a time budget the number of steps is not known in advance, so the rate is constant after warm-up
  (as difflab's). Sampled with ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M)), 20 steps = 20 NFE.
- ``lucidrains``: denoising-diffusion-pytorch's ``Unet`` (dim 16, its default dim_mults (1, 2, 4, 8);
  2.44M parameters, 0.31 GFLOP per image) and ``GaussianDiffusion`` defaults (1000 steps, sigmoid schedule,
  v-prediction), trained as its ``Trainer`` does (batch 16, Adam 1e-4 with betas (0.9, 0.99), gradient
  clipping at 1, ``ema_pytorch.EMA`` with beta 0.995 updated every 10 steps); sampled by its own DDIM
  (``sampling_timesteps=20``, eta 0) = 20 NFE. The README's dim 64 (35.7M parameters, 3.6 GFLOP per image)
  could not draw 10,000 samples here in any reasonable time, so its width is the smallest one (16).

The package imports torchvision (and pytorch-fid) at module level for its ``Trainer`` and FID helper,
neither of which is used here; PyPI's torchvision builds do not load against torch 2.13's CPU build, so
stand-in modules are put in ``sys.modules`` before the import. Install the peers with::

    pip install diffusers && pip install --no-deps denoising-diffusion-pytorch==2.3.4 \
        && pip install einops ema-pytorch accelerate

Steps, each resumable by contestant (runs land in ``--runs``, default ``runs/budget``)::

    python benchmarks/fmnist_budget.py train difflab        # likewise diffusers, lucidrains
    python benchmarks/fmnist_budget.py sample difflab       # --n 10000 samples at 20 NFE, scored
    python benchmarks/fmnist_budget.py report               # benchmarks/results/fmnist_budget_n10000.{json,md}

Two contestants can train side by side on the 2-core machine (one thread each); more would share cores.

Sampling batches of 100 are the peers' fastest on one thread (diffusers 235 s and lucidrains 361 s per 1,000
samples, against 319 s and 517 s in batches of 500, on the Zen 4 EPYC). The README has the latest results
and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402

from difflab.data import load_fashion_mnist, to_uint8_images  # noqa: E402
from difflab.imageio import save_grid  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, score_images  # noqa: E402
from difflab.samplers import steps_for_nfe  # noqa: E402

CONTESTANTS = ("difflab", "difflab_edm", "diffusers", "lucidrains")
DIFFLAB_PRESETS = {"difflab": "configs/fashion_mnist.yaml", "difflab_edm": "configs/fashion_mnist_edm.yaml"}
DIFFUSERS_SOLVERS = {"dpmsolver++": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}
REPO = Path(__file__).resolve().parents[1]
NFE = 20


# -- shared training harness for the peers ------------------------------------------------------------------

def train_for_budget(step, data: torch.Tensor, batch_size: int, minutes: float, seed: int) -> dict:
    """Run ``step(batch)`` on random batches of ``data`` until ``minutes`` of wall clock have passed.

    The clock starts at the first step, after the model and data are built, as difflab's trainer does.
    """
    g = torch.Generator().manual_seed(seed)
    steps, start = 0, time.perf_counter()
    losses = []
    bar = tqdm(desc="training", unit="step", total=None)
    while time.perf_counter() - start < 60 * minutes:
        losses.append(step(data[torch.randint(len(data), (batch_size,), generator=g)]))
        steps += 1
        bar.update()
        if steps % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    bar.close()
    return {"steps": steps, "images": steps * batch_size, "seconds": time.perf_counter() - start,
            "last_loss": float(np.mean(losses[-200:]))}


def write_run(out: Path, state: dict[str, torch.Tensor], info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "ema.safetensors"))
    (out / "run.json").write_text(json.dumps(info, indent=1))


def padded_train_images() -> torch.Tensor:
    """Fashion-MNIST's training images zero-padded to 32x32, uint8 (N, 1, 32, 32)."""
    return load_fashion_mnist("train", image_size=32).data


# -- difflab ---------------------------------------------------------------------------------------------------

def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (1.4x the fp32 training steps of the preset on the
    Zen 4 EPYC); without them they are a slow fallback (7-17x slower on an AVX2-only EPYC)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def train_difflab(out: Path, minutes: float, seed: int, overrides: list[str] = (), preset: str = "difflab") -> dict:
    from difflab.config import load_config
    from difflab.train.diffusion import diffusion_trainer

    precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    config = load_config(REPO / DIFFLAB_PRESETS[preset],
                         [f"train.max_minutes={minutes}", f"train.out_dir={out}", f"name=fmnist_budget_{preset}",
                          f"train.precision={precision}", *overrides])
    result = diffusion_trainer(config, progress=True).run()
    return {"steps": result.step, "stopped_by": result.stopped_by}


def difflab_options(preset: str):
    """The preset's recommended sampler (its ``sample`` section), which must spend at most ``NFE``."""
    from difflab.config import load_config

    options = load_config(REPO / DIFFLAB_PRESETS[preset]).sample
    if options.sampler != "heun" or options.steps != steps_for_nfe("heun", NFE):
        sys.exit(f"fmnist_budget: {DIFFLAB_PRESETS[preset]} recommends {options.sampler} with {options.steps} steps, "
                 f"not a {NFE}-NFE Heun sampler")
    return options


def difflab_sampler_name(preset: str) -> str:
    o = difflab_options(preset)
    return f"heun, {o.steps} steps, {o.spacing} grid, sigma {o.sigma_min:g} .. {o.sigma_max:g}"


def difflab_sampler(out: Path, batch: int, preset: str = "difflab"):
    """``draw(first, count)``: samples first .. first + count - 1 (sample i seeded by i) as uint8."""
    import dataclasses

    from difflab.pipelines.ddpm import load_model, sample

    loaded = load_model(out)
    options = dataclasses.replace(difflab_options(preset), batch_size=batch)     # the preset's recommendation

    def draw(first: int, count: int) -> torch.Tensor:
        return to_uint8_images(sample(loaded, count, dataclasses.replace(options, seed=first)))
    return draw


def difflab_info(out: Path) -> dict:
    """Steps and images from the final checkpoint; seconds and loss from the last training log line."""
    from difflab.checkpoint import CHECKPOINT_NAME, load_checkpoint

    state = load_checkpoint(out / CHECKPOINT_NAME).state
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last = [r for r in map(json.loads, filter(str.strip, lines)) if "elapsed_s" in r][-1]
    return {"steps": state["step"], "images": state["images_seen"], "seconds": last["elapsed_s"],
            "last_loss": last["loss"]}


# -- diffusers (examples/unconditional_image_generation/train_unconditional.py) ----------------------------------

def diffusers_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def train_diffusers(out: Path, minutes: float, seed: int) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = diffusers_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=500)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)

    def step(batch: torch.Tensor) -> float:
        clean = batch.float() / 127.5 - 1
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),))
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(model(noisy, timesteps).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
        return loss.item()

    info = train_for_budget(step, padded_train_images(), 16, minutes, seed)
    ema.copy_to(model.parameters())
    write_run(out, model.state_dict(), {**info, "scheduler": dict(scheduler.config)})
    return info


def diffusers_sampler(out: Path, batch: int, solver_name: str = "dpmsolver++"):
    import diffusers

    model = diffusers_unet().eval()
    model.load_state_dict(load_file(str(out / "ema.safetensors")))
    solver_class = getattr(diffusers, DIFFUSERS_SOLVERS[solver_name])
    solver = solver_class.from_config(diffusers.DDPMScheduler(num_train_timesteps=1000,
                                                              beta_schedule="linear").config)

    @torch.no_grad()
    def draw(first: int, count: int) -> torch.Tensor:
        x = torch.randn(count, 1, 32, 32, generator=torch.Generator().manual_seed(first))
        solver.set_timesteps(NFE)
        for t in solver.timesteps:
            x = solver.step(model(x, t).sample, t, x).prev_sample
        return to_uint8_images(x.clamp(-1, 1))
    return draw


# -- lucidrains' denoising-diffusion-pytorch --------------------------------------------------------------------

def import_lucidrains():
    """The package's Unet and GaussianDiffusion, with stand-ins for the torchvision/pytorch-fid it imports."""
    for name in ("torchvision", "torchvision.transforms", "torchvision.utils",
                 "pytorch_fid", "pytorch_fid.fid_score", "pytorch_fid.inception"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    sys.modules["pytorch_fid.fid_score"].calculate_frechet_distance = None
    sys.modules["pytorch_fid.inception"].InceptionV3 = None
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    return Unet, GaussianDiffusion


def lucidrains_diffusion():
    Unet, GaussianDiffusion = import_lucidrains()
    return GaussianDiffusion(Unet(dim=16, channels=1, flash_attn=False), image_size=32, timesteps=1000,
                             sampling_timesteps=NFE)


def train_lucidrains(out: Path, minutes: float, seed: int) -> dict:
    from ema_pytorch import EMA

    torch.manual_seed(seed)
    diffusion = lucidrains_diffusion()
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
    ema = EMA(diffusion, beta=0.995, update_every=10)

    def step(batch: torch.Tensor) -> float:                # Trainer.train's body, without accelerate
        loss = diffusion(batch.float() / 255)              # auto_normalize maps [0, 1] to [-1, 1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        return loss.item()

    info = train_for_budget(step, padded_train_images(), 16, minutes, seed)
    write_run(out, ema.ema_model.state_dict(), info)
    return info


def lucidrains_sampler(out: Path, batch: int):
    diffusion = lucidrains_diffusion().eval()
    diffusion.load_state_dict(load_file(str(out / "ema.safetensors")))

    @torch.no_grad()
    def draw(first: int, count: int) -> torch.Tensor:
        torch.manual_seed(first)                                  # it draws from the global generator
        x = diffusion.sample(batch_size=count)                    # [0, 1], x0 clipped (its DDIM)
        return (x * 255).round().clamp(0, 255).to(torch.uint8)
    return draw


# -- phases -------------------------------------------------------------------------------------------------------

def variant(contestant: str, solver: str) -> str:
    """File-name suffix of a non-default diffusers scheduler: its samples and scores are kept apart."""
    return f"_{solver}" if contestant == "diffusers" and solver != "dpmsolver++" else ""


TRAIN = {"difflab": train_difflab, "difflab_edm": partial(train_difflab, preset="difflab_edm"),
         "diffusers": train_diffusers, "lucidrains": train_lucidrains}
SAMPLER = {"difflab": difflab_sampler, "difflab_edm": partial(difflab_sampler, preset="difflab_edm"),
           "diffusers": diffusers_sampler, "lucidrains": lucidrains_sampler}
SAMPLER_NAME = {"difflab": difflab_sampler_name("difflab"), "difflab_edm": difflab_sampler_name("difflab_edm"),
                "diffusers": f"DPMSolverMultistepScheduler, {NFE} steps",
                "diffusers_ddim": f"DDIMScheduler, {NFE} steps",
                "lucidrains": f"GaussianDiffusion DDIM, sampling_timesteps {NFE}"}


def run_train(args: argparse.Namespace) -> None:
    out = args.runs / args.contestant
    if args.set and args.contestant not in DIFFLAB_PRESETS:
        sys.exit("fmnist_budget: --set changes difflab's config only; the peers keep their recipes")
    extra = {"overrides": args.set} if args.contestant in DIFFLAB_PRESETS else {}
    info = TRAIN[args.contestant](out, args.minutes, args.seed, **extra)
    print(json.dumps(info), file=sys.stderr)


def draw_samples(make_draw, parts: Path, n: int, batch: int, sampler: str) -> tuple[torch.Tensor, float]:
    """The first ``n`` samples, drawn ``batch`` at a time by ``make_draw()``'s function; each batch is kept in
    ``parts`` as it is finished, so an interrupted run resumes and a larger ``--n`` only draws the new ones.
    ``parts/sampler.txt`` names the sampler that drew them: a different one stops the run rather than mix."""
    parts.mkdir(parents=True, exist_ok=True)
    stamp = parts / "sampler.txt"
    if stamp.exists() and stamp.read_text() != sampler:
        sys.exit(f"fmnist_budget: {parts} holds samples of another sampler ({stamp.read_text()!r}, this run: "
                 f"{sampler!r}); move it away to draw new ones")
    stamp.write_text(sampler)
    draw, images, seconds = None, [], 0.0
    for first in tqdm(range(0, n, batch), desc=f"sampling ({parts})", unit="batch"):
        path = parts / f"{first:06d}-{min(batch, n - first)}.npz"
        if not path.exists():
            draw = draw or make_draw()
            start = time.perf_counter()
            chunk = draw(first, min(batch, n - first))
            np.savez(path.with_suffix(".tmp.npz"), images=chunk.numpy(), seconds=time.perf_counter() - start)
            path.with_suffix(".tmp.npz").replace(path)
        with np.load(path) as part:
            images.append(torch.from_numpy(part["images"]))
            seconds += float(part["seconds"])
    return torch.cat(images), seconds


def run_sample(args: argparse.Namespace) -> None:
    out, suffix = args.runs / args.contestant, variant(args.contestant, args.diffusers_solver)
    if args.contestant == "diffusers":
        make_draw = partial(diffusers_sampler, out, args.batch, args.diffusers_solver)
    else:
        make_draw = partial(SAMPLER[args.contestant], out, args.batch)
    sampler = SAMPLER_NAME[args.contestant + suffix]
    images, seconds = draw_samples(make_draw, out / f"samples_nfe{NFE}{suffix}", args.n, args.batch, sampler)
    report = score_images(images, None, EvalOptions(n=args.n, progress=True))
    trained = difflab_info(out) if args.contestant in DIFFLAB_PRESETS else json.loads((out / "run.json").read_text())
    result = {"contestant": args.contestant + suffix, "n": args.n, "nfe": NFE, "sampler": sampler,
              "sampling_seconds": seconds,
              "threads": torch.get_num_threads(), "command": command_line(),
              "train": {k: trained.get(k) for k in ("steps", "images", "seconds", "last_loss")},
              "metrics": {k: report["metrics"][k] for k in ("fid", "kid", "precision", "recall")}}
    (out / f"eval_nfe{NFE}_n{args.n}{suffix}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["metrics"]), file=sys.stderr)


PARAMETERS = {"difflab": 1.07, "difflab_edm": 1.07, "diffusers": 1.11, "lucidrains": 2.44}   # millions
GFLOP = {"difflab": 0.26, "difflab_edm": 0.26, "diffusers": 0.51, "lucidrains": 0.31}     # per image forward


def run_report(args: argparse.Namespace) -> None:
    def eval_path(c: str) -> Path:
        if c in CONTESTANTS:
            return args.runs / c / f"eval_nfe{NFE}_n{args.n}.json"
        base, _, solver = c.partition("_")
        return args.runs / base / f"eval_nfe{NFE}_n{args.n}_{solver}.json"

    names = [*CONTESTANTS, *(f"diffusers_{s}" for s in DIFFUSERS_SOLVERS if s != "dpmsolver++")]
    results = {c: json.loads(eval_path(c).read_text()) for c in names if eval_path(c).exists()}
    if "difflab" not in results:
        sys.exit(f"fmnist_budget: no {eval_path('difflab')}; run `sample difflab --n {args.n}` first")
    peers = [results[c]["metrics"]["fid"] for c in results if c not in DIFFLAB_PRESETS]
    best_peer = min(peers) if peers else math.nan
    ours = results["difflab"]["metrics"]["fid"]
    edm = (f" The EDM preset's is {results['difflab_edm']['metrics']['fid'] / best_peer:.3f} of it."
           if "difflab_edm" in results else "")
    rows = []
    for c, r in results.items():
        m, t = r["metrics"], r["train"]
        base = c if c in CONTESTANTS else c.partition("_")[0]
        rows.append([c, f"{PARAMETERS[base]:.2f}M", f"{GFLOP[base]:.2f}", f"{t['steps']}", f"{t['images'] / 1000:.0f}k",
                     f"{r['sampling_seconds'] / r['n'] * 1000:.0f}", f"{m['fid']:.2f}", f"{1000 * m['kid']:.1f}",
                     f"{m['precision']:.2f}", f"{m['recall']:.2f}", f"{m['fid'] / ours:.2f}"])
    header = ["contestant", "parameters", "GFLOP/image", "steps", "images seen", "sampling s/1000",
              f"FID ({NFE} NFE)", "KID x 1000", "precision", "recall", "FID / difflab's"]
    markdown = (f"# Fashion-MNIST, {args.minutes:g} minutes of one CPU thread per contestant\n\n"
                f"`{command_line()}`: {args.n} samples each at {NFE} network evaluations, scored against the "
                f"test set with the shipped classifier's features. difflab's FID is {ours / best_peer:.3f} of "
                f"the better peer's (target at most 0.25).{edm}\n\n" + markdown_table(header, rows) + "\n")
    write_results(f"fmnist_budget_n{args.n}", {"results": results, "best_peer_fid": best_peer,
                                                "command": command_line(), "machine": machine_info()}, markdown)
    for c in CONTESTANTS:                                            # the first 64 samples, as scored
        first = sorted((args.runs / c / f"samples_nfe{NFE}").glob("000000-*.npz"))
        if c not in results or not first:
            continue
        with np.load(first[0]) as part:
            images = torch.from_numpy(part["images"][:64])
        if images.shape[-1] == 32:                                   # the peers' padding, cropped
            images = images[..., 2:30, 2:30]
        save_grid(images, REPO / f"docs/fmnist_budget_{c}.png", columns=8, scale=2)
    print(markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    for phase in ("train", "sample"):
        p = sub.add_parser(phase)
        p.add_argument("contestant", choices=CONTESTANTS)
    sub.choices["train"].add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                                      help="difflab: a config override on top of the preset (tuning runs)")
    sub.add_parser("report")
    for p in sub.choices.values():
        p.add_argument("--runs", type=Path, default=REPO / "runs/budget")
        p.add_argument("--minutes", type=float, default=30.0, help="training budget per contestant")
        p.add_argument("--threads", type=int, default=1, help="torch threads (1: the budget is CPU time)")
        p.add_argument("--n", type=int, default=10000, help="samples scored per contestant")
        p.add_argument("--batch", type=int, default=100,
                       help="sampling batch size (100: the peers' fastest on one thread)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--diffusers-solver", choices=sorted(DIFFUSERS_SOLVERS), default="dpmsolver++",
                       help="the diffusers contestant's 20-step scheduler (ddim: DDIMScheduler, clip_sample on)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"train": run_train, "sample": run_sample, "report": run_report}[args.phase](args)


if __name__ == "__main__":
    main()
