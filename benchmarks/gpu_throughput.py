"""GPU training throughput of a CIFAR-size DDPM U-Net: difflab against diffusers, fp32 / bf16, eager / compiled.

The network is the 32x32 DDPM of Ho et al. 2020 (CIFAR-10; 35.7M parameters there, 38.3M as a difflab ``UNet``):
model_channels 128, channel_mult (1, 2, 2, 2), num_res_blocks 2, attention at 16x16, dropout 0.1, 3
channels. diffusers' ``UNet2DModel`` is matched to it exactly as in ``train_throughput.py`` (same levels,
blocks, attention and scale-shift conditioning, width chosen so the parameter counts agree within 5%),
with the same dropout.

A variant is a precision and options joined by "+": ``fp32``, ``bf16``, ``fp16`` (with loss scaling),
plus ``compile`` (``torch.compile`` of the network) and ``channels_last``. For each variant both models
are built afresh and trained with the same step (eps-prediction MSE at t ~ U[0, 1000) under the linear
schedule, AdamW lr 2e-4; autocast and loss scaling by ``difflab.train.precision.Precision``), timed in
alternating rounds (A B, B A, ...) after untimed warm-up steps. The first step is timed apart: with
``compile`` it holds the compilation. Reported: images/s from the median step, the first step's
seconds and the peak GPU memory of each model's first steps.

A third row, "difflab Trainer", times ``difflab.train.trainer.Trainer.train_step`` itself on a folder of random
32x32 PNGs with the same network and switches: everything a real step does besides the network (the
step's batch, timesteps and noise drawn on the CPU as a function of (seed, step), gradient clipping,
the EMA update, the loss read back). Leave it out with ``--no-trainer``.

Results are written after every variant, so a run cut short keeps what it measured, to
``<out-dir>/gpu_throughput.{json,md}`` (``gpu_throughput_smoke`` with ``--smoke``). Usage::

    python benchmarks/gpu_throughput.py --out-dir OUT          # one GPU; each compiled model takes ~1 min to compile
    python benchmarks/gpu_throughput.py --variants bf16+compile+channels_last --batch 256
    python benchmarks/gpu_throughput.py --smoke --variants fp32,bf16     # tiny network, checks the script on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, command_line, interleaved_timing, machine_info,  # noqa: E402
                    markdown_table, synchronize, throughput, write_results)
from train_throughput import (LEARNING_RATE, TIMESTEPS, DiffusersEps, count_params,  # noqa: E402
                              linear_alphas_cumprod, match_diffusers)

import diffusers  # noqa: E402  (train_throughput has already exited with a hint if it is missing)

from difflab.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from difflab.nets import UNet, UNetConfig  # noqa: E402
from difflab.train.precision import Precision  # noqa: E402
from difflab.train.diffusion import diffusion_trainer  # noqa: E402

CIFAR_DDPM = UNetConfig(in_channels=3, image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2),
                        num_res_blocks=2, attention_resolutions=(16,), num_heads=4, dropout=0.1)
SMOKE = UNetConfig(in_channels=3, image_size=32, model_channels=32, channel_mult=(1, 2),
                   num_res_blocks=1, attention_resolutions=(16,), num_heads=4, dropout=0.1)
DEFAULT_VARIANTS = "fp32,bf16,fp32+compile,bf16+compile"


@dataclass(frozen=True)
class Variant:
    precision: str
    compile: bool = False
    channels_last: bool = False

    @classmethod
    def parse(cls, text: str) -> "Variant":
        precision, *options = text.split("+")
        unknown = set(options) - {"compile", "channels_last"}
        if precision not in ("fp32", "bf16", "fp16") or unknown:
            raise SystemExit(f"gpu_throughput: bad variant {text!r} (e.g. fp32, bf16+compile+channels_last)")
        return cls(precision, "compile" in options, "channels_last" in options)

    def __str__(self) -> str:
        return "+".join([self.precision] + ["compile"] * self.compile + ["channels_last"] * self.channels_last)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    p.add_argument("--batch", type=int, default=128, help="training batch size (Ho et al. 2020 used 128)")
    p.add_argument("--steps", type=int, default=50, help="timed steps per model and variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model after the first step")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds the timed steps are split into")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls (torch's default is off)")
    p.add_argument("--no-trainer", dest="trainer", action="store_false", help="skip the difflab Trainer row")
    p.add_argument("--max-minutes", type=float, default=8.0,
                   help="skip the variants left once this much time has passed (results so far are kept)")
    p.add_argument("--smoke", action="store_true", help="tiny network and few steps: checks the script on a CPU")
    p.add_argument("--param-tolerance", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and Markdown go")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.warmup, args.rounds = min(args.batch, 4), min(args.steps, 2), 1, 1
    args.rounds = max(1, min(args.rounds, args.steps))
    return args


# -- one variant ---------------------------------------------------------------------------------------------

def build_models(cfg: UNetConfig, args: argparse.Namespace, variant: Variant) -> tuple[dict[str, nn.Module], dict]:
    """difflab's U-Net and the matched diffusers model, seeded alike, on the device."""
    torch.manual_seed(args.seed)
    nets: dict[str, nn.Module] = {"difflab": UNet(cfg)}
    diffusers_kwargs = {**match_diffusers(cfg, count_params(nets["difflab"]), args.param_tolerance),
                        "dropout": cfg.dropout}
    torch.manual_seed(args.seed)
    nets["diffusers"] = DiffusersEps(diffusers_kwargs)
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    nets = {name: net.to(args.device, memory_format=memory_format).train() for name, net in nets.items()}
    return nets, {"difflab": asdict(cfg), "diffusers": diffusers_kwargs}


def make_train_step(net: nn.Module, cfg: UNetConfig, args: argparse.Namespace, variant: Variant):
    """One optimiser step of eps-prediction MSE on a fixed random x0 batch (noising, forward, backward, AdamW)."""
    device = torch.device(args.device)
    precision = Precision(variant.precision, device)
    forward = torch.compile(net) if variant.compile else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE)
    alphas_cumprod = linear_alphas_cumprod().to(device)
    x0 = torch.rand(args.batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    if variant.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        t = torch.randint(0, TIMESTEPS, (args.batch,), device=device)
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with precision.autocast():
            pred = forward(xt, t)
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        precision.step(optimizer, net, grad_clip=None)

    return step


def random_image_folder(folder: Path, count: int, size: int) -> Path:
    """``count`` random RGB PNGs: the trainer's timings do not depend on the pixels."""
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:05d}.png")
    return folder


def make_trainer_step(cfg: UNetConfig, args: argparse.Namespace, variant: Variant, folder: Path):
    """``Trainer.train_step`` of a difflab run with this network and these switches (writes no files)."""
    config = Config(
        data=DataConfig(dataset="folder", path=str(folder), image_size=cfg.image_size, channels=cfg.in_channels),
        model=ModelConfig(kind="unet", options=dataclasses.asdict(cfg)),
        train=TrainConfig(out_dir=str(folder / "run"), batch_size=args.batch, lr=LEARNING_RATE, warmup_steps=1,
                          seed=args.seed, device=args.device, precision=variant.precision, compile=variant.compile,
                          channels_last=variant.channels_last))
    return diffusion_trainer(config, progress=False).train_step


def first_step(step, device: str) -> dict:
    """Seconds of the first call (compilation included) and the peak memory of the first two calls."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    synchronize()
    seconds = time.perf_counter() - t0
    step()
    synchronize()
    return {"first_step_s": seconds, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def measure(cfg: UNetConfig, args: argparse.Namespace, variant: Variant) -> dict:
    torch._dynamo.reset()                  # compiled variants start from an empty cache
    nets, configs = build_models(cfg, args, variant)
    steps = {name: make_train_step(net, cfg, args, variant) for name, net in nets.items()}
    params = {name: count_params(net) for name, net in nets.items()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.trainer:
            folder = random_image_folder(Path(tmp), 2 * args.batch, cfg.image_size)
            steps["difflab Trainer"] = make_trainer_step(cfg, args, variant, folder)
            params["difflab Trainer"] = params["difflab"]
        first = {name: first_step(step, args.device) for name, step in steps.items()}
        times = interleaved_timing(steps, args.steps, args.rounds, args.warmup)
    models = {name: {"params": params[name], **first[name], **throughput(times[name], args.batch)}
              for name in steps}
    ratio = models["difflab"]["images_per_s"] / models["diffusers"]["images_per_s"]
    del nets, steps
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"models": models, "difflab_over_diffusers": ratio, "configs": configs}


# -- reporting -----------------------------------------------------------------------------------------------

def markdown_report(res: dict) -> str:
    rows = []
    for name, v in res["variants"].items():
        a, b = v["models"]["difflab"], v["models"]["diffusers"]
        memory = (f"{a['peak_memory_gib']:.2f} / {b['peak_memory_gib']:.2f}"
                  if a["peak_memory_gib"] is not None else "n/a")
        trainer = v["models"].get("difflab Trainer")
        rows.append([name, f"{a['images_per_s']:.1f}", f"{b['images_per_s']:.1f}", f"{v['difflab_over_diffusers']:.3f}",
                     f"{trainer['images_per_s']:.1f}" if trainer else "-",
                     f"{a['first_step_s']:.1f} / {b['first_step_s']:.1f}", memory])
    s, mach = res["settings"], res["machine"]
    params = next(iter(res["variants"].values()))["models"] if res["variants"] else {}
    return "\n".join([
        f"# GPU training throughput: {res['network']} U-Net, difflab vs diffusers UNet2DModel", "",
        markdown_table(["variant", "difflab images/s", f"diffusers {res['diffusers_version']} images/s",
                        "difflab / diffusers", "difflab Trainer images/s", "first step s (difflab / diffusers)",
                        "peak GiB (difflab / diffusers)"], rows), "",
        "images/s: batch / median step (noising, forward, MSE, backward, AdamW). The first step includes "
        "torch.compile's compilation where compiled; peak memory covers each model's first two steps. "
        "difflab Trainer: the whole Trainer.train_step (CPU-drawn batch and noise, clipping, EMA) with the "
        "difflab network.", "",
        "- parameters: " + ", ".join(f"{n} {m['params']:,}" for n, m in params.items() if n != "difflab Trainer"),
        f"- settings: batch {s['batch']}, {s['steps']} timed steps per model in {s['rounds']} alternating rounds "
        f"after {s['warmup']} warm-up steps; TF32 matmuls {s['tf32']}; device {s['device']}",
        f"- skipped (time budget): {', '.join(res['skipped']) or 'none'}",
        f"- machine: {mach.get('gpu', mach['cpu'])}, torch {mach['torch']}",
        f"- command: `{res['command']}`",
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    variants = [Variant.parse(v) for v in args.variants.split(",") if v]
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    cfg = SMOKE if args.smoke else CIFAR_DDPM
    name = "gpu_throughput_smoke" if args.smoke else "gpu_throughput"
    results = {"benchmark": name, "network": "smoke" if args.smoke else "CIFAR-10 DDPM-size",
               "command": command_line(), "machine": machine_info(), "diffusers_version": diffusers.__version__,
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "variants": {}, "skipped": []}
    start = time.perf_counter()
    for variant in variants:
        if time.perf_counter() - start > 60 * args.max_minutes:
            results["skipped"].append(str(variant))
            continue
        print(f"{variant}: building, first step, {args.warmup} warm-up + {args.steps} timed steps per model ...",
              flush=True)
        results["variants"][str(variant)] = measure(cfg, args, variant)
        results["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        report = markdown_report(results)
        paths = write_results(name, results, report, args.out_dir)
        print(report.split("\n\n")[1], flush=True)
    print(f"wrote {', '.join(str(p) for p in paths)}" if results["variants"] else "nothing measured")
    return results


if __name__ == "__main__":
    main()
