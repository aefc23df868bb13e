"""Latent diffusion and DiT on Fashion-MNIST under equal CPU budgets (issue #16).

Main table, each model trained for ``--minutes`` (30) of one CPU thread, two side by side on the 2-core
machine (as ``fmnist_budget.py``), in bf16 autocast where the CPU has native bf16, sampled with the pixel
preset's recommended sampler (Heun, 10 steps = 19 NFE on the log-SNR grid 80 .. 0.1, not re-tuned for latents)
and scored on 10,000 samples against the test set (the shipped classifier's features):

- ``pixel_unet``: ``configs/fashion_mnist.yaml`` (the budget race's difflab preset) on 28x28 pixels;
- ``latent_unet``: ``configs/fmnist_latent.yaml``, the same U-Net width and recipe on the 4x8x8 latents of the
  autoencoder of ``configs/fmnist_autoencoder.yaml`` (f = 4 on the images padded to 32x32);
- ``latent_dit``: ``configs/fmnist_latent_dit.yaml``, an adaLN-Zero DiT with patch 2 on the same latents.

Latent samples are decoded to 32x32 and centre-cropped to the data's 28x28 (the padding) before scoring. The
autoencoder (``autoencoder`` phase, its own budget, ``--ae-minutes``) is reported with its test-set
reconstruction error and reconstruction FID (10,000 test images through encoder mean and decoder, scored like
samples): the floor of a latent model's FID.

DiT study (``dit_*``, ``--minutes`` 10 each, pixel space 28x28, ``configs/fmnist_dit.yaml``): patch 7, 4 and 2
with adaLN-Zero (FID against GFLOP per image, Peebles & Xie 2023, Fig. 2), and at patch 4 the block designs
adaLN, in-context and cross-attention beside adaLN-Zero (their Fig. 5).

Timings (``time`` phase, nothing else running): training images/s of each model alone (median step, one
thread) and sampling seconds per 1,000 images at the scored sampler, decoding included.

    python benchmarks/fmnist_latent.py autoencoder               # then: train latent_unet, latent_dit, ...
    python benchmarks/fmnist_latent.py train latent_unet         # pixel_unet, latent_dit, dit_p7, ...
    python benchmarks/fmnist_latent.py sample latent_unet        # --n 10000 samples, scored
    python benchmarks/fmnist_latent.py time                      # alone on the machine
    python benchmarks/fmnist_latent.py report                    # benchmarks/results/fmnist_latent.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_info, markdown_table, write_results  # noqa: E402
from fmnist_budget import cpu_has_fast_bf16, difflab_info, draw_samples  # noqa: E402

from difflab.build import build_data  # noqa: E402
from difflab.config import load_config  # noqa: E402
from difflab.data import to_uint8_images  # noqa: E402
from difflab.pipelines.evaluate import EvalOptions, score_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PIXEL = "configs/fashion_mnist.yaml"
MODELS = {                                   # name: (preset, overrides)
    "pixel_unet": (PIXEL, []),
    "latent_unet": ("configs/fmnist_latent.yaml", []),
    "latent_dit": ("configs/fmnist_latent_dit.yaml", []),
    "dit_p7": ("configs/fmnist_dit.yaml", ["model.dit.patch_size=7"]),
    "dit_p4": ("configs/fmnist_dit.yaml", ["model.dit.patch_size=4"]),
    "dit_p2": ("configs/fmnist_dit.yaml", ["model.dit.patch_size=2"]),
    "dit_p4_adaln": ("configs/fmnist_dit.yaml", ["model.dit.patch_size=4", "model.dit.block=adaln"]),
    "dit_p4_in_context": ("configs/fmnist_dit.yaml", ["model.dit.patch_size=4", "model.dit.block=in_context"]),
    "dit_p4_cross_attention": ("configs/fmnist_dit.yaml", ["model.dit.patch_size=4",
                                                           "model.dit.block=cross_attention"]),
}
MAIN = ("pixel_unet", "latent_unet", "latent_dit")


def experiment(name: str, args: argparse.Namespace, minutes: float | None = None):
    preset, overrides = MODELS[name]
    latent = [f"data.autoencoder={args.runs / 'autoencoder'}"] if "latent" in preset else []
    precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    settings = [f"train.out_dir={args.runs / name}", f"name=fmnist_latent_{name}", f"train.precision={precision}",
                *latent, *overrides]
    if minutes is not None:
        settings.append(f"train.max_minutes={minutes}")
    return load_config(REPO / preset, settings)


def run_autoencoder(args: argparse.Namespace) -> None:
    """Train the autoencoder (resumable), then its reconstruction error and FID on the test set."""
    from difflab.train.autoencoder import autoencoder_trainer, finish_autoencoder

    out = args.runs / "autoencoder"
    config = load_config(REPO / "configs/fmnist_autoencoder.yaml",
                         [f"train.out_dir={out}", f"train.max_minutes={args.ae_minutes}"])
    if not (out / "checkpoint.safetensors").exists() or args.resume:
        trainer = autoencoder_trainer(config, resume=args.resume)
        trainer.run()
        finish_autoencoder(trainer)
    print(json.dumps(reconstruction_report(args)), file=sys.stderr)


def reconstruction_report(args: argparse.Namespace) -> dict:
    from difflab.latent import load_latent_space

    path = args.runs / "autoencoder" / "reconstruction.json"
    if path.exists():
        return json.loads(path.read_text())
    space = load_latent_space(args.runs / "autoencoder")
    test = build_data(load_config(REPO / "configs/fmnist_autoencoder.yaml").data, split="test")
    images = []
    for first in range(0, len(test), 500):
        x, _ = test.batch(torch.arange(first, min(first + 500, len(test))))
        images.append(space.decode(space.posterior(x)[0]).clamp(-1, 1))
    reconstructed = torch.cat(images)
    originals, _ = test.batch(torch.arange(len(test)))
    report = score_images(cropped(to_uint8_images(reconstructed)), None, EvalOptions(n=len(test), progress=True))
    result = {"test_images": len(test), "mse": (reconstructed - originals).pow(2).mean().item(),
              "mae": (reconstructed - originals).abs().mean().item(), "reconstruction_fid": report["metrics"]["fid"],
              "latent_scale": space.scale,
              "latent_shape": list(space.latent_shape), "command": command_line()}
    path.write_text(json.dumps(result, indent=1))
    return result


def cropped(images: torch.Tensor) -> torch.Tensor:
    """32x32 (the padded 28x28 images) to 28x28, as fmnist_budget does for the peers."""
    return images[..., 2:30, 2:30] if images.shape[-1] == 32 else images


def run_train(args: argparse.Namespace) -> None:
    from difflab.train.diffusion import diffusion_trainer

    minutes = args.minutes if args.minutes is not None else (30.0 if args.model in MAIN else 10.0)
    config = experiment(args.model, args, minutes)
    trainer = diffusion_trainer(config, resume=args.resume, progress=True)
    result = trainer.run()
    print(json.dumps({"steps": result.step, "stopped_by": result.stopped_by}), file=sys.stderr)


def sampler_of(name: str, args: argparse.Namespace, batch: int):
    from difflab.pipelines.ddpm import load_model, sample

    loaded = load_model(args.runs / name)
    options = dataclasses.replace(experiment(name, args).sample, batch_size=batch)

    def draw(first: int, count: int) -> torch.Tensor:
        return cropped(to_uint8_images(sample(loaded, count, dataclasses.replace(options, seed=first))))
    return draw, options


def samples_scored(name: str, args: argparse.Namespace) -> int:
    """--n, else 10,000 for the main table and 2,000 for the DiT study."""
    return args.n if args.n is not None else (10000 if name in MAIN else 2000)


def run_sample(args: argparse.Namespace) -> None:
    out, n = args.runs / args.model, samples_scored(args.model, args)
    options = experiment(args.model, args).sample
    name = f"{options.sampler}, {options.steps} steps, {options.spacing} grid"
    images, seconds = draw_samples(lambda: sampler_of(args.model, args, args.batch)[0], out / "samples_scored",
                                   n, args.batch, name)
    report = score_images(images, None, EvalOptions(n=n, progress=True))
    result = {"model": args.model, "n": n, "sampler": name, "sampling_seconds": seconds,
              "train": difflab_info(out), "command": command_line(),
              "metrics": {k: report["metrics"][k] for k in ("fid", "kid", "precision", "recall")}}
    (out / f"eval_n{n}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["metrics"]), file=sys.stderr)


# -- compute and speed ---------------------------------------------------------------------------------------
def gflops(name: str, args: argparse.Namespace) -> dict:
    """Forward GFLOP per image of the network (one evaluation, 2 per multiply-add) and, for a latent model, of
    its decoder (once per sample)."""
    from torch.utils.flop_counter import FlopCounterMode

    from difflab.nets.flops import network_gflops
    from difflab.pipelines.ddpm import load_model

    loaded = load_model(args.runs / name)
    result = {"network": network_gflops(loaded.denoiser.net, loaded.spec.sample_shape),
              "parameters_m": sum(p.numel() for p in loaded.denoiser.net.parameters()) / 1e6}
    if loaded.latent is not None:
        with FlopCounterMode(display=False) as counter:
            loaded.latent.decode(torch.zeros(1, *loaded.spec.sample_shape))
        result["decoder"] = counter.get_total_flops() / 1e9
    return result


def run_time(args: argparse.Namespace) -> None:
    """Training images/s (a fresh model, ``--time-steps`` steps after 5 warm-up steps) and sampling s/1000."""
    from difflab.train.diffusion import diffusion_trainer

    torch.set_num_threads(args.threads)
    path = args.runs / "timing.json"
    results = json.loads(path.read_text())["results"] if path.exists() else {}     # other models' timings kept
    for name in args.models or [m for m in MODELS if (args.runs / m / "checkpoint.safetensors").exists()]:
        config = experiment(name, args)
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, out_dir=str(args.runs / "timing" / name), max_minutes=None, checkpoint_every=10 ** 9,
            sample_every=10 ** 9, log_every=10 ** 9))
        trainer = diffusion_trainer(config, progress=False, overwrite=True)
        times = []
        for i in range(5 + args.time_steps):
            start = time.perf_counter()
            trainer.train_step()
            if i >= 5:
                times.append(time.perf_counter() - start)
        train_ips = config.train.batch_size / statistics.median(times)
        draw, options = sampler_of(name, args, args.batch)
        draw(0, args.batch)                                          # warm-up
        start = time.perf_counter()
        for first in range(0, args.time_samples, args.batch):
            draw(first, args.batch)
        seconds = (time.perf_counter() - start) / args.time_samples * 1000
        results[name] = {"train_images_per_s": train_ips, "sampling_s_per_1000": seconds,
                         "sampling_images_timed": args.time_samples, **gflops(name, args)}
        print(name, json.dumps(results[name]), file=sys.stderr)
    path.write_text(json.dumps({"results": results, "threads": args.threads,
                                                       "command": command_line(), "machine": machine_info()},
                                                      indent=1))


def run_report(args: argparse.Namespace) -> None:
    timing = json.loads((args.runs / "timing.json").read_text())["results"]
    ae = reconstruction_report(args)
    evals = {m: json.loads((args.runs / m / f"eval_n{samples_scored(m, args)}.json").read_text()) for m in MODELS
             if (args.runs / m / f"eval_n{samples_scored(m, args)}.json").exists()}
    pixel = evals.get("pixel_unet")

    def row(name: str) -> list:
        e, t = evals[name], timing.get(name, {})
        flops = t.get("network", float("nan"))
        speed = [f"{t['train_images_per_s']:.0f}", f"{t['sampling_s_per_1000']:.1f}"] if t else ["-", "-"]
        ratios = ["-", "-", "-"]
        if pixel is not None and t and "pixel_unet" in timing:
            p = timing["pixel_unet"]
            ratios = [f"{t['train_images_per_s'] / p['train_images_per_s']:.2f}",
                      f"{p['sampling_s_per_1000'] / t['sampling_s_per_1000']:.2f}",
                      f"{e['metrics']['fid'] / pixel['metrics']['fid']:.2f}" if e["n"] == pixel["n"] else "-"]
        return [name, f"{t.get('parameters_m', float('nan')):.2f}M", f"{flops:.3f}", e["train"]["steps"],
                f"{e['train']['images'] / 1000:.0f}k", *speed, e["n"], f"{e['metrics']['fid']:.2f}",
                f"{e['metrics']['precision']:.2f}", f"{e['metrics']['recall']:.2f}", *ratios]

    header = ["model", "parameters", "GFLOP/eval", "steps", "images seen", "train images/s", "sampling s/1000",
              "samples", "FID", "precision", "recall", "train speed / pixel", "sampling speed / pixel", "FID / pixel"]
    main_rows = [row(m) for m in MAIN if m in evals]
    study_rows = [row(m) for m in MODELS if m.startswith("dit_") and m in evals]
    markdown = (f"# Latent diffusion and DiT on Fashion-MNIST\n\n`{command_line()}`; 10,000 samples per main "
                f"model (2,000 per DiT-study model, whose FIDs are therefore higher) at the pixel preset's sampler (Heun 10 steps, 19 NFE), scored against the test set. Main models: "
                f"30 minutes of one CPU thread each; DiT study: 10 minutes each (pixel space, 28x28). Speeds from "
                f"the `time` phase, each model alone on one thread; GFLOP per network evaluation (a latent "
                f"model's decoder adds {timing.get('latent_unet', {}).get('decoder', float('nan')):.3f} GFLOP once "
                f"per sample).\n\n"
                f"Autoencoder (f = 4, 4x8x8 latents, latent scale {ae['latent_scale']:.4f} measured on the "
                f"training images): test reconstruction MSE {ae['mse']:.4f}, MAE {ae['mae']:.4f} (pixels in "
                f"[-1, 1]), reconstruction FID {ae['reconstruction_fid']:.2f} on the {ae['test_images']} test "
                f"images.\n\n" + markdown_table(header, main_rows) + "\n\n## DiT study\n\n"
                + markdown_table(header, study_rows) + "\n")
    write_results("fmnist_latent", {"evals": evals, "timing": timing, "autoencoder": ae, "command": command_line(),
                                    "machine": machine_info()}, markdown)
    print(markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    for phase in ("train", "sample"):
        sub.add_parser(phase).add_argument("model", choices=list(MODELS))
    sub.add_parser("autoencoder").add_argument("--ae-minutes", type=float, default=15.0)
    timing = sub.add_parser("time")
    timing.add_argument("--models", nargs="*", choices=list(MODELS))
    timing.add_argument("--time-steps", type=int, default=30)
    timing.add_argument("--time-samples", type=int, default=500)
    sub.add_parser("report")
    for p in sub.choices.values():
        p.add_argument("--runs", type=Path, default=REPO / "runs/latent")
        p.add_argument("--minutes", type=float, default=None, help="training budget (30 main, 10 DiT study)")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--n", type=int, default=None, help="samples scored (10,000 main table, 2,000 DiT study)")
        p.add_argument("--batch", type=int, default=100)
        p.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"autoencoder": run_autoencoder, "train": run_train, "sample": run_sample, "time": run_time,
     "report": run_report}[args.phase](args)


if __name__ == "__main__":
    main()
