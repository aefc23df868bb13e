"""Export a difflab U-Net run as a diffusers model folder: ``difflab export RUN --format diffusers``.

The folder is a diffusers ``DDPMPipeline`` (the layout of e.g. google/ddpm-cifar10-32):

    DIR/model_index.json                           the pipeline's parts: a UNet2DModel and a DDPMScheduler
    DIR/unet/config.json                           the UNet2DModel's arguments
    DIR/unet/diffusion_pytorch_model.safetensors   its weights: the run's EMA weights (``weights="model"``: raw)
    DIR/scheduler/scheduler_config.json            DDPMScheduler with the trained betas and the prediction type
    DIR/difflab.json                               what diffusers has no field for: conditions, data range, the
                                                   run's recommended sampler (read by ``difflab sample --diffusers``)
    DIR/README.md                                  a model card

so that ``UNet2DModel.from_pretrained(DIR, subfolder="unet")`` and ``DDPMPipeline.from_pretrained(DIR)`` load it
and ``difflab sample --diffusers DIR`` (``difflab.pipelines.diffusers_load``) samples it. The files are written
here, in diffusers' layout, without importing diffusers.

What maps (difflab's ADM U-Net, Dhariwal & Nichol 2021, as diffusers builds it in ``UNet2DModel``):

    difflab UNetConfig                             diffusers UNet2DModel
    model_channels * channel_mult (mult[0] = 1)    block_out_channels
    num_res_blocks (or equal level_res_blocks)     layers_per_block (the decoder has one more in both)
    a level in attention_resolutions               AttnDownBlock2D / AttnUpBlock2D, else DownBlock2D / UpBlock2D
    resblock_updown                                down/upsample_type "resnet" (ResnetDown/UpsampleBlock2D)
    adaptive group norm, embedding_silu            resnet_time_scale_shift "scale_shift" (on SiLU(temb))
    num_head_channels, or num_heads at one width   attention_head_dim
    fused qkv 1x1 conv, proj                       to_q, to_k, to_v (its thirds), to_out.0
    groups (the same count in every norm)          norm_num_groups, attn_norm_num_groups
    num_classes (+1: the null label's row)         num_class_embeds
    timestep_embedding: [cos, sin], period 10^4    flip_sin_to_cos True, freq_shift 0
    VP preconditioning, c_noise = the timestep     the timestep argument; the betas as trained_betas

Everything else is refused with one line naming the config field at fault (``unexportable``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from difflab.adapters import DIFFUSERS_PREDICTIONS
from difflab.checkpoint import resolve
from difflab.config import to_dict
from difflab.errors import DifflabError
from difflab.files import atomic_write, write_text
from difflab.model import ModelSpec
from difflab.nets.registry import network_config
from difflab.nets.unet import AttentionBlock, Downsample, ResBlock, UNet, UNetConfig, Upsample
from difflab.pipelines.ddpm import load_model

# The oldest diffusers the test extra allows; the layout written here has not changed since.
DIFFUSERS_VERSION = "0.30.0"
EXPORT_FORMAT = "difflab-diffusers-export/1"
UNET_FOLDER, SCHEDULER_FOLDER = "unet", "scheduler"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFLAB_RECORD = "difflab.json"
TO_DIFFUSERS_PREDICTION = {ours: theirs for theirs, ours in DIFFUSERS_PREDICTIONS.items()}

# UNetConfig fields that UNet2DModel has no counterpart for: the value an export needs, and why.
REQUIRED_VALUES = {
    "embedding_silu": (True, "diffusers' ResnetBlock2D projects SiLU(temb), as ADM does; it is set at training"),
    "rescale_residual": (False, "UNet2DModel's residual blocks return skip + h, not (skip + h) / sqrt(2)"),
    "cross_attention": (False, "UNet2DModel has no cross-attention"),
    "low_res_channels": (0, "UNet2DModel reads no low-resolution image (a super-resolution stage)"),
    "augmentation_embedding": (False, "UNet2DModel has no augmentation-level embedding"),
    "scale_skips": (False, "UNet2DModel does not scale its skip connections"),
    "downsample_first": (False, "UNet2DModel resamples at the end of each encoder level"),
}
RESBLOCK_NAMES = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
                  "skip": "conv_shortcut"}


# -- what maps --------------------------------------------------------------------------------------------------
def exportable_unet(spec: ModelSpec) -> UNetConfig:
    """The U-Net config of a model that maps to UNet2DModel; otherwise one ``DifflabError`` line naming the
    config field at fault."""
    if spec.network != "unet":
        raise DifflabError(f"model.kind {spec.network!r}: only the U-Net ('unet') maps to diffusers' UNet2DModel")
    if spec.is_latent:
        raise DifflabError("data.autoencoder is set: a latent model needs its autoencoder too; only pixel-space "
                           "U-Nets are exported")
    if spec.precond.get("kind") != "vp":
        raise DifflabError(f"diffusion.precond {spec.precond.get('kind')!r}: a diffusers scheduler runs a discrete "
                           f"VP schedule; only diffusion.precond 'vp' is exported")
    if spec.learned_variance:
        raise DifflabError("diffusion.learn_variance is true: a learned-variance U-Net is not exported")
    unknown = sorted({c["name"] for c in spec.conditions} - {"label"})
    if unknown:
        raise DifflabError(f"the model's condition(s) {unknown}: UNet2DModel reads class labels only")
    config = network_config("unet", spec.network_options)
    for name, (needed, why) in REQUIRED_VALUES.items():
        if getattr(config, name) != needed:
            raise DifflabError(f"model.unet.{name} is {json.dumps(getattr(config, name))}: {why} "
                               f"(export needs {json.dumps(needed)})")
    if config.channel_mult[0] != 1:
        raise DifflabError(f"model.unet.channel_mult[0] is {config.channel_mult[0]}: UNet2DModel's first level has "
                           f"the input conv's width and its time embedding 4x that width (export needs 1)")
    if config.level_res_blocks is not None and len(set(config.level_res_blocks)) > 1:
        raise DifflabError(f"model.unet.level_res_blocks {list(config.level_res_blocks)}: UNet2DModel has one "
                           f"layers_per_block for every level")
    return config


def shared_sizes(net: UNet, config: UNetConfig) -> tuple[int, int]:
    """(groups, attention head width) of the network, which UNet2DModel has one of each; an error naming
    ``model.unet.groups`` or the head option when a layer differs."""
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    odd = sorted({m.num_channels for m in norms if m.num_groups != config.groups})
    if odd:
        raise DifflabError(f"model.unet.groups {config.groups} does not divide the normalised widths {odd} (difflab "
                           f"uses fewer groups there); UNet2DModel has one norm_num_groups")
    attention = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    head_widths = sorted({m.qkv.in_channels // m.num_heads for m in attention})
    if len(head_widths) > 1:
        field = "num_head_channels" if config.num_head_channels is not None else "num_heads"
        raise DifflabError(f"model.unet.{field}: attention heads of {head_widths} channels at the attention widths "
                           f"{sorted({m.qkv.in_channels for m in attention})}; UNet2DModel has one "
                           f"attention_head_dim (set model.unet.num_head_channels)")
    return config.groups, head_widths[0]


def block_types(config: UNetConfig) -> tuple[list[str], list[str]]:
    """UNet2DModel's down and up block types, level by level (attention or not, BigGAN resampling or not)."""
    kinds = []
    for level in range(len(config.channel_mult)):
        if config.image_size // 2 ** level in config.attention_resolutions:
            kinds.append(("AttnDownBlock2D", "AttnUpBlock2D"))
        elif config.resblock_updown:
            kinds.append(("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"))
        else:
            kinds.append(("DownBlock2D", "UpBlock2D"))
    return [down for down, _ in kinds], [up for _, up in reversed(kinds)]


def unet2d_config(config: UNetConfig, groups: int, head_width: int) -> dict:
    """UNet2DModel's ``config.json``."""
    down, up = block_types(config)
    resample = "resnet" if config.resblock_updown else "conv"
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": config.image_size, "in_channels": config.in_channels,
        "out_channels": config.out_channels or config.in_channels, "center_input_sample": False,
        "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,    # [cos, sin], 10^4
        "down_block_types": down, "mid_block_type": "UNetMidBlock2D", "up_block_types": up,
        "block_out_channels": [mult * config.model_channels for mult in config.channel_mult],
        "layers_per_block": config.level_res_blocks[0] if config.level_res_blocks else config.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": resample, "upsample_type": resample,
        "dropout": config.dropout, "act_fn": "silu", "attention_head_dim": head_width,
        "norm_num_groups": groups, "attn_norm_num_groups": groups, "norm_eps": 1e-5,   # torch's GroupNorm eps
        "resnet_time_scale_shift": "scale_shift", "add_attention": True, "class_embed_type": None,
        "num_class_embeds": config.num_classes + 1 if config.num_classes else None,   # + the null label's row
    }


# -- the weights ------------------------------------------------------------------------------------------------
def paired_modules(net: UNet) -> Iterator[tuple[nn.Module, str]]:
    """(difflab module, its UNet2DModel name) for every module with weights, in the order of the forward pass."""
    c = net.config
    levels = len(c.channel_mult)
    blocks = c.level_res_blocks[0] if c.level_res_blocks else c.num_res_blocks
    yield net.time_embed[0], "time_embedding.linear_1"
    yield net.time_embed[2], "time_embedding.linear_2"
    if net.label_embed is not None:
        yield net.label_embed, "class_embedding"
    yield net.input_conv, "conv_in"
    down = iter(net.down)
    for level in range(levels):
        for i in range(blocks):
            yield from stage_pairs(list(next(down)), f"down_blocks.{level}", i)
        if level < levels - 1:
            (resample,) = next(down)
            yield resample, f"down_blocks.{level}.downsamplers.0"
    yield from stage_pairs([net.middle[0], net.middle[1]], "mid_block", 0)
    yield net.middle[2], "mid_block.resnets.1"
    up = iter(net.up)
    for level in range(levels):                                   # up_blocks[0] is the deepest level
        for i in range(blocks + 1):
            stage = list(next(up))
            if i == blocks and level < levels - 1:
                yield stage.pop(), f"up_blocks.{level}.upsamplers.0"
            yield from stage_pairs(stage, f"up_blocks.{level}", i)
    yield net.out_norm, "conv_norm_out"
    yield net.out_conv, "conv_out"


def stage_pairs(stage: list[nn.Module], block: str, index: int) -> Iterator[tuple[nn.Module, str]]:
    """A residual block and the attention after it, if any: ``block.resnets.i`` and ``block.attentions.i``."""
    yield stage[0], f"{block}.resnets.{index}"
    for attention in stage[1:]:
        yield attention, f"{block}.attentions.{index}"


def module_tensors(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One module's tensors under their UNet2DModel names."""
    if isinstance(module, ResBlock):
        return {f"{name}.{RESBLOCK_NAMES[key.split('.')[0]]}.{key.split('.', 1)[1]}": value
                for key, value in module.state_dict().items()}
    if isinstance(module, AttentionBlock):
        # the fused 1x1 qkv conv's 3C outputs are [q | k | v], each head-major, as diffusers' to_q/to_k/to_v
        weights, biases = module.qkv.weight[:, :, 0, 0].chunk(3), module.qkv.bias.chunk(3)
        tensors = {f"{name}.group_norm.{k}": v for k, v in module.norm.state_dict().items()}
        for part, weight, bias in zip(("to_q", "to_k", "to_v"), weights, biases):
            tensors.update({f"{name}.{part}.weight": weight, f"{name}.{part}.bias": bias})
        return tensors | {f"{name}.to_out.0.weight": module.proj.weight[:, :, 0, 0],
                          f"{name}.to_out.0.bias": module.proj.bias}
    if isinstance(module, (Downsample, Upsample)):               # Downsample2D / Upsample2D with use_conv: .conv
        return {f"{name}.conv.{k}": v for k, v in module.conv.state_dict().items()}
    return {f"{name}.{k}": v for k, v in module.state_dict().items()}      # Linear, Conv2d, GroupNorm, Embedding


def unet2d_state_dict(net: UNet) -> dict[str, torch.Tensor]:
    """The network's weights under UNet2DModel's names (every tensor once, each its own contiguous copy)."""
    tensors: dict[str, torch.Tensor] = {}
    for module, name in paired_modules(net):
        for key, value in module_tensors(module, name).items():
            if key in tensors:
                raise RuntimeError(f"diffusers export: {key} mapped twice")
            tensors[key] = value.detach().clone().contiguous()
    mapped, total = sum(v.numel() for v in tensors.values()), sum(v.numel() for v in net.state_dict().values())
    if mapped != total:
        raise RuntimeError(f"diffusers export: {mapped} of the network's {total} weights mapped")
    return tensors


# -- the schedule, the record and the card ----------------------------------------------------------------------
def scheduler_config(precond: dict, data_range: tuple[float, float] | None) -> dict:
    """DDPMScheduler's ``scheduler_config.json``: the trained betas (float64 values in JSON), the prediction
    type, and x0 clipped to the data range as difflab's samplers clip it by default."""
    betas = precond["betas"]
    clip = data_range is not None and -data_range[0] == data_range[1]
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": len(betas), "trained_betas": betas, "beta_start": betas[0], "beta_end": betas[-1],
            "beta_schedule": "linear",                               # ignored when trained_betas are given
            "prediction_type": TO_DIFFUSERS_PREDICTION[precond.get("prediction", "eps")],
            "variance_type": "fixed_small", "clip_sample": clip, "clip_sample_range": data_range[1] if clip else 1.0}


def difflab_record(spec: ModelSpec, loaded) -> dict:
    """``difflab.json``: the fields diffusers has no place for, read back by ``difflab sample --diffusers``."""
    return {"format": EXPORT_FORMAT, "source": str(loaded.path), "step": loaded.step, "weights": loaded.weights,
            "sample_shape": list(spec.sample_shape),
            "data_range": list(spec.data_range) if spec.data_range is not None else None,
            "conditions": spec.conditions, "sample": to_dict(loaded.config.sample)}


def model_card(spec: ModelSpec, loaded, unet: dict, scheduler: dict) -> str:
    label = spec.condition_fields().get("label")
    classes = ("unconditional" if label is None else
               f"class-conditional: {label.num_classes} classes"
               + (f" ({', '.join(label.names)})" if label.names else "")
               + f"; class_labels={label.num_classes} is the null label (classifier-free guidance)")
    shape = "x".join(map(str, spec.sample_shape))
    call = "" if label is None else ", class_labels=torch.tensor([0])"
    return f"""---
library_name: diffusers
tags: [difflab, ddpm]
---

# {loaded.config.name}

A difflab U-Net (ADM-style) exported to diffusers' `UNet2DModel` with `difflab export --format diffusers`.

- source: `{loaded.path}`, step {loaded.step}, {loaded.weights} weights
- samples: {shape} (channels x height x width), pixels in [-1, 1]; {classes}
- schedule: {scheduler["num_train_timesteps"]} steps, the trained betas in `scheduler/scheduler_config.json`
  (`trained_betas`); the network predicts `{scheduler["prediction_type"]}`
- network: block_out_channels {unet["block_out_channels"]}, layers_per_block {unet["layers_per_block"]},
  down blocks {", ".join(unet["down_block_types"])}; scale-shift norm, attention_head_dim {unet["attention_head_dim"]}

```python
import torch
from diffusers import DDPMScheduler, UNet2DModel
unet = UNet2DModel.from_pretrained("DIR", subfolder="unet")
scheduler = DDPMScheduler.from_pretrained("DIR", subfolder="scheduler")
t = {scheduler["num_train_timesteps"] - 1}  # the noisiest step
out = unet(torch.randn(1, {", ".join(map(str, spec.sample_shape))}), t{call}).sample   # {scheduler["prediction_type"]}
```

With difflab: `difflab sample --diffusers DIR --n 64` (any of its samplers; `difflab.json` holds the conditions
and the run's recommended sampler).
"""


# -- writing ----------------------------------------------------------------------------------------------------
def default_export_dir(run: str | Path) -> Path:
    return resolve(run).parent / "diffusers"


def export_diffusers(run: str | Path, out: str | Path | None = None, weights: str = "ema",
                     overwrite: bool = False) -> Path:
    """Write ``run``'s U-Net (EMA weights by default) as a diffusers folder (``out``, default RUN/diffusers);
    returns the folder. A model that does not map, or a folder that already holds files (unless
    ``overwrite``), is refused before anything is written."""
    loaded = load_model(run, weights)
    spec, net = loaded.spec, loaded.denoiser.net
    config = exportable_unet(spec)
    unet = unet2d_config(config, *shared_sizes(net, config))
    scheduler = scheduler_config(spec.precond, spec.data_range)
    tensors = unet2d_state_dict(net)
    out = Path(out) if out is not None else default_export_dir(run)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DifflabError(f"{out} already holds files; choose another --out or pass --overwrite")
    atomic_write(out / UNET_FOLDER / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(out / UNET_FOLDER / "config.json", unet)
    write_json(out / SCHEDULER_FOLDER / "scheduler_config.json", scheduler)
    write_json(out / "model_index.json", {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                                          "scheduler": ["diffusers", "DDPMScheduler"],
                                          "unet": ["diffusers", "UNet2DModel"]})
    write_json(out / DIFFLAB_RECORD, difflab_record(spec, loaded))
    write_text(out / "README.md", model_card(spec, loaded, unet, scheduler))
    return out


def write_json(path: Path, values: dict) -> Path:
    return write_text(path, json.dumps(values, indent=2) + "\n")
