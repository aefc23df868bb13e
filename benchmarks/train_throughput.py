"""Training and sampling throughput of difflab's U-Net against diffusers' ``UNet2DModel``.

Both networks are trained in the same process on 32x32 single-channel (Fashion-MNIST-shaped) batches with
the same optimiser (AdamW, lr 2e-4), batch size and loss: eps-prediction MSE at uniform random timesteps
in [0, 1000), x_t = sqrt(a) x0 + sqrt(1 - a) eps under the linear beta schedule of Ho et al. 2020. The
diffusers model mirrors difflab's architecture (same levels, blocks per level, attention resolutions,
scale-shift time conditioning) with its width chosen so that the parameter counts agree within 5%.

Measured, for each model:

- training images/s: batch / median wall-clock time of one optimiser step (noising, forward, loss,
  backward, AdamW update), the two models timed in alternating rounds (A B, B A, ...);
- model FLOPs utilisation: forward FLOPs per image counted by ``torch.utils.flop_counter`` on one forward
  pass, times 3 for forward + backward, times images/s, as a fraction of the machine's measured fp32
  matmul peak (best ``torch.mm`` FLOP/s; the bf16 peak is measured and reported too);
- sampling images/s: forward passes only, under ``torch.no_grad``, at ``--sample-batch`` (64).

Results go to ``benchmarks/results/train_throughput.{json,md}``. Usage::

    python benchmarks/train_throughput.py [--steps 30] [--batch 64] [--bf16] [--channels-last]

Needs diffusers (``pip install diffusers``, or the ``difflab[bench]`` extra). Run it on an otherwise idle
machine: torch's worker threads slow down far more than in proportion when they share cores.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, command_line, interleaved_timing, machine_info,  # noqa: E402
                    markdown_table, matmul_peak_flops, throughput, write_results)

try:
    import diffusers
    from diffusers import UNet2DModel
except ImportError:
    sys.exit("train_throughput: diffusers is not installed; run `pip install diffusers` "
             "(or `pip install -e '.[bench]'`)")

from difflab.nets import UNet, UNetConfig  # noqa: E402

TIMESTEPS = 1000
LEARNING_RATE = 2e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per model (training and sampling)")
    p.add_argument("--batch", type=int, default=64, help="training batch size")
    p.add_argument("--sample-batch", type=int, default=64, help="batch size of the sampling forward passes")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds the timed steps are split into")
    p.add_argument("--channels", type=int, default=64, help="difflab model_channels")
    p.add_argument("--mult", type=int, nargs="+", default=[1, 2, 2], help="difflab channel_mult")
    p.add_argument("--blocks", type=int, default=2, help="difflab num_res_blocks")
    p.add_argument("--attn", type=int, nargs="*", default=[8], help="difflab attention_resolutions (pixels)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (difflab num_heads)")
    p.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (both models)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (both models)")
    p.add_argument("--param-tolerance", type=float, default=0.05,
                   help="largest relative parameter-count difference accepted for the diffusers model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the JSON and Markdown go")
    return p.parse_args(argv)


# -- the two models ------------------------------------------------------------------------------------------

def difflab_config(args: argparse.Namespace) -> UNetConfig:
    return UNetConfig(in_channels=1, image_size=32, model_channels=args.channels, channel_mult=tuple(args.mult),
                      num_res_blocks=args.blocks, attention_resolutions=tuple(args.attn), num_heads=args.heads)


def diffusers_config(cfg: UNetConfig, width: int) -> dict:
    """``UNet2DModel`` kwargs with difflab's shape (levels, blocks, attention) at base width ``width``."""
    channels = tuple(width * m for m in cfg.channel_mult)
    attn = [cfg.image_size // 2**level in cfg.attention_resolutions for level in range(len(channels))]
    return dict(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=channels, layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=math.gcd(cfg.groups, *channels),
        attention_head_dim=channels[-1] // cfg.num_heads,      # the middle block's heads match difflab's
        resnet_time_scale_shift="scale_shift",                 # adaptive GroupNorm, as in difflab / ADM
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def diffusers_params(config: dict) -> int:
    with torch.device("meta"):                                  # shapes only, no memory, no init
        return count_params(UNet2DModel(**config))


def match_diffusers(cfg: UNetConfig, target: int, tolerance: float) -> dict:
    """The diffusers config closest in parameter count to ``target``.

    First difflab's own width; if that is off by more than ``tolerance``, every multiple of 8 up to four
    times that width, keeping the channel multipliers, and the closest one wins.
    """
    def rel_diff(width: int) -> float:
        return diffusers_params(diffusers_config(cfg, width)) / target - 1

    width = cfg.model_channels
    if abs(rel_diff(width)) > tolerance:
        width = min(range(8, 4 * cfg.model_channels + 1, 8), key=lambda w: abs(rel_diff(w)))
    if abs(rel_diff(width)) > tolerance:
        sys.exit(f"train_throughput: no diffusers width within {100 * tolerance:g}% of {target:,} parameters")
    return diffusers_config(cfg, width)


class DiffusersEps(nn.Module):
    """diffusers' ``UNet2DModel`` behind difflab's calling convention: ``net(x, t) -> tensor``."""

    def __init__(self, config: dict):
        super().__init__()
        self.model = UNet2DModel(**config)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t).sample


# -- what is timed -------------------------------------------------------------------------------------------

def linear_alphas_cumprod() -> torch.Tensor:
    """alpha-bar_t of the linear schedule, betas from 1e-4 to 0.02 over 1000 steps (Ho et al. 2020)."""
    betas = torch.linspace(1e-4, 0.02, TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0).float()


def image_batch(batch: int, channels_last: bool) -> torch.Tensor:
    """Random stand-in for a Fashion-MNIST batch in [-1, 1]: the timings do not depend on the pixels."""
    x = torch.rand(batch, 1, 32, 32) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_train_step(net: nn.Module, args: argparse.Namespace):
    """One optimiser step of eps-prediction MSE on a fixed x0 batch: noising, forward, backward, AdamW."""
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE)
    alphas_cumprod = linear_alphas_cumprod()
    x0 = image_batch(args.batch, args.channels_last)

    def step() -> None:
        t = torch.randint(0, TIMESTEPS, (args.batch,))
        noise = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = net(xt, t)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_sample_step(net: nn.Module, args: argparse.Namespace):
    """One network evaluation as a sampler makes it: forward only, no autograd, ``--sample-batch`` images."""
    x = image_batch(args.sample_batch, args.channels_last)

    @torch.no_grad()
    def step() -> None:
        t = torch.randint(0, TIMESTEPS, (args.sample_batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            net(x, t)

    return step


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def forward_flops_per_image(net: nn.Module) -> int:
    """FLOPs (2 per multiply-add) of one fp32 forward pass on one 1x32x32 image.

    Counts convolutions, matmuls and attention; torch's counter has no formula for the CPU attention
    kernel, so it is given the same one as the GPU kernels. Elementwise ops and norms are not counted.
    """
    x, t = torch.zeros(1, 1, 32, 32), torch.zeros(1, dtype=torch.long)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        net(x, t)
    return counter.get_total_flops()


# -- measuring and reporting ---------------------------------------------------------------------------------

def build_models(args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict]:
    """difflab's U-Net from the CLI and the diffusers model matched to it, both seeded alike."""
    cfg = difflab_config(args)
    torch.manual_seed(args.seed)
    nets: dict[str, nn.Module] = {"difflab": UNet(cfg)}
    diffusers_kwargs = match_diffusers(cfg, count_params(nets["difflab"]), args.param_tolerance)
    torch.manual_seed(args.seed)
    nets["diffusers"] = DiffusersEps(diffusers_kwargs)
    if args.channels_last:
        for net in nets.values():
            net.to(memory_format=torch.channels_last)
    configs = {"difflab": asdict(cfg), "diffusers": diffusers_kwargs}
    return nets, configs


def summarise(params: int, fwd_flops: int, train_times: list[float], sample_times: list[float],
              peaks: dict, args: argparse.Namespace) -> dict:
    """One model's numbers: throughputs, FLOPs per image, achieved FLOP/s and MFU against the peaks."""
    train = throughput(train_times, args.batch)
    achieved = 3 * fwd_flops * train["images_per_s"]
    return {
        "params": params,
        "forward_flops_per_image": fwd_flops,
        "train_flops_per_image": 3 * fwd_flops,
        "train": train,
        "achieved_train_flops_per_s": achieved,
        "mfu_fp32_peak": achieved / peaks["fp32"]["flops"],
        "mfu_bf16_peak": achieved / peaks["bf16"]["flops"],
        "sample": throughput(sample_times, args.sample_batch),
    }


def markdown_report(res: dict) -> str:
    """The results as a Markdown table (metrics x models, plus the difflab / diffusers ratio)."""
    a, b = res["models"]["difflab"], res["models"]["diffusers"]
    s = res["settings"]

    def row(label: str, key, fmt: str, ratio: bool = False) -> list[str]:
        va, vb = key(a), key(b)
        return [label, format(va, fmt), format(vb, fmt), f"{va / vb:.3f}" if ratio else ""]

    rows = [
        row("parameters", lambda m: m["params"], ",", ratio=True),
        row(f"train images/s (batch {s['batch']}, median step)", lambda m: m["train"]["images_per_s"], ".1f", True),
        row("forward GFLOP/image", lambda m: m["forward_flops_per_image"] / 1e9, ".4f", True),
        row("achieved train GFLOP/s (3x fwd)", lambda m: m["achieved_train_flops_per_s"] / 1e9, ".2f", True),
        row("MFU vs fp32 matmul peak", lambda m: 100 * m["mfu_fp32_peak"], ".2f"),
        row(f"sampling images/s (batch {s['sample_batch']}, no_grad)",
            lambda m: m["sample"]["images_per_s"], ".1f", True),
    ]
    if s["bf16"]:
        rows.insert(5, row("MFU vs bf16 matmul peak", lambda m: 100 * m["mfu_bf16_peak"], ".2f"))
    peaks, mach = res["peaks"], res["machine"]
    return "\n".join([
        "# Training throughput: difflab UNet vs diffusers UNet2DModel", "",
        markdown_table(["", "difflab", f"diffusers {res['diffusers_version']}", "difflab / diffusers"], rows),
        "", "MFU in percent. "
        + f"Matmul peaks: fp32 {peaks['fp32']['flops'] / 1e9:.1f} GFLOP/s (n={peaks['fp32']['n']}), "
        + f"bf16 {peaks['bf16']['flops'] / 1e9:.1f} GFLOP/s (n={peaks['bf16']['n']})."
        + ("" if {"avx512_bf16", "amx_bf16"} & set(mach["cpu_flags"]) else
           " This CPU has no native bf16 matmul (AVX512-BF16/AMX): its bf16 peak is a slow fallback, not a ceiling."),
        "",
        f"- settings: {s['steps']} timed steps per model in {s['rounds']} alternating rounds after "
        f"{s['warmup']} warm-up steps; bf16 autocast {s['bf16']}; channels_last {s['channels_last']}; "
        f"AdamW lr {LEARNING_RATE}; eps-MSE, linear schedule, t ~ U[0, {TIMESTEPS})",
        f"- diffusers config: {res['configs']['diffusers']}",
        f"- machine: {mach['cpu']}, {mach['torch_threads']} torch threads ({mach['logical_cpus']} logical CPUs), "
        f"torch {mach['torch']}",
        f"- command: `{res['command']}`",
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.rounds = max(1, min(args.rounds, args.steps))
    nets, configs = build_models(args)
    params = {name: count_params(net) for name, net in nets.items()}
    rel = params["diffusers"] / params["difflab"] - 1
    print(f"parameters: difflab {params['difflab']:,}, diffusers {params['diffusers']:,} ({rel:+.3%})")
    print(f"diffusers config: {configs['diffusers']}")

    print("measuring matmul peaks ...", flush=True)
    peaks = {"fp32": matmul_peak_flops(torch.float32), "bf16": matmul_peak_flops(torch.bfloat16)}
    flops = {name: forward_flops_per_image(net) for name, net in nets.items()}

    print(f"training: {args.warmup} warm-up + {args.steps} timed steps per model ...", flush=True)
    train_times = interleaved_timing({n: make_train_step(net, args) for n, net in nets.items()},
                                     args.steps, args.rounds, args.warmup)
    for net in nets.values():
        net.eval()
    print("sampling ...", flush=True)
    sample_times = interleaved_timing({n: make_sample_step(net, args) for n, net in nets.items()},
                                      args.steps, args.rounds, args.warmup)

    models = {n: summarise(params[n], flops[n], train_times[n], sample_times[n], peaks, args) for n in nets}
    results = {
        "benchmark": "train_throughput",
        "command": command_line(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "diffusers_version": diffusers.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "out_dir"},
        "configs": configs,
        "param_relative_difference": rel,
        "peaks": peaks,
        "models": models,
        "ratios": {"train_images_per_s": models["difflab"]["train"]["images_per_s"]
                   / models["diffusers"]["train"]["images_per_s"],
                   "sample_images_per_s": models["difflab"]["sample"]["images_per_s"]
                   / models["diffusers"]["sample"]["images_per_s"]},
    }
    report = markdown_report(results)
    print("\n" + report)
    for path in write_results("train_throughput", results, report, args.out_dir):
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
