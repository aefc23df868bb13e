"""Networks by name: a config dataclass, the module it builds, and how its sizes follow from the data.

``resolve_network("unet", options, sample_shape, ...)`` validates the options strictly (an unknown or mistyped
key names ``model.unet.<key>``) and fits the input/output channels, image size and classes to the data; the
resolved config is saved with the weights, and ``load_network`` builds the module from it without data. A new
network is one file in ``difflab.nets`` and one entry in ``NETWORKS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from difflab.errors import DifflabError
from difflab.nets.controlnet import ControlledUNet, ControlNetConfig
from difflab.nets.dit import DIT_BLOCKS, DIT_PRESETS, DiT, DiTConfig, dit_sizes
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.prior import (PriorMLP, PriorMLPConfig, PriorTransformer, PriorTransformerConfig, RegressionPrior,
                                RegressionPriorConfig)
from difflab.nets.text_encoder import text_encoder_from_json
from difflab.nets.text_unet import TextUNet, TextUNetConfig
from difflab.nets.unclip_decoder import UnclipDecoder, UnclipDecoderConfig
from difflab.nets.unet import UNet, UNetConfig
from difflab.typed import from_dict, to_dict


@dataclass(frozen=True)
class NetworkEntry:
    config: type
    module: Callable[[Any], nn.Module]
    fit: Callable[[Any, tuple[int, ...], int, int | None], Any]   # (config, sample shape, out channels, classes)


def fit_unet(config: UNetConfig, shape: tuple[int, ...], out_channels: int, classes: int | None) -> UNetConfig:
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DifflabError(f"model.kind 'unet' needs square image data (C, H, H), got sample shape {shape}")
    levels = len(config.channel_mult)
    if levels < 1 or min(config.channel_mult) < 1 or config.model_channels < 1 or config.num_res_blocks < 1:
        raise DifflabError("model.unet: model_channels, num_res_blocks and every channel_mult must be at least 1")
    halvings = levels if config.downsample_first else levels - 1
    if shape[1] % 2 ** halvings:
        raise DifflabError(f"model.unet: image size {shape[1]} must be divisible by 2^{halvings} = "
                           f"{2 ** halvings} for {levels} levels of channel_mult"
                           + (" with downsample_first" if config.downsample_first else "") + " (data.image_size)")
    if config.level_res_blocks is not None and (len(config.level_res_blocks) != levels
                                                or min(config.level_res_blocks) < 1):
        raise DifflabError(f"model.unet.level_res_blocks {list(config.level_res_blocks)}: one number of residual "
                           f"blocks (at least 1) for each of the {levels} levels of channel_mult")
    if config.low_res_channels < 0:
        raise DifflabError(f"model.unet.low_res_channels {config.low_res_channels} must be at least 0")
    if config.num_head_channels is not None:
        # the widths with attention: the levels at attention_resolutions, and the middle block (the last level)
        first = 1 if config.downsample_first else 0
        widths = sorted({mult * config.model_channels for level, mult in enumerate(config.channel_mult)
                         if shape[1] // 2 ** (level + first) in config.attention_resolutions or level == levels - 1})
        if config.num_head_channels < 1 or any(width % config.num_head_channels for width in widths):
            raise DifflabError(f"model.unet.num_head_channels {config.num_head_channels} must divide the channels "
                               f"of every attention level, {widths}")
    elif config.num_heads < 1 or any(mult * config.model_channels % config.num_heads for mult in config.channel_mult):
        raise DifflabError(f"model.unet.num_heads {config.num_heads} must divide every level's channels")
    if config.cross_attention and ((config.context_dim is not None and config.context_dim < 1)
                                   or config.transformer_depth < 1):
        raise DifflabError(f"model.unet: context_dim (or null) and transformer_depth must be at least 1, got "
                           f"{config.context_dim}, {config.transformer_depth}")
    return dataclasses.replace(config, in_channels=shape[0], image_size=shape[1], out_channels=out_channels,
                               num_classes=classes)


def fit_mlp(config: MLPConfig, shape: tuple[int, ...], out_channels: int, classes: int | None) -> MLPConfig:
    if len(shape) != 1:
        raise DifflabError(f"model.kind 'mlp' needs vector data (D,), got sample shape {shape}")
    if config.hidden < 1 or config.depth < 0:
        raise DifflabError(f"model.mlp: hidden must be at least 1 and depth at least 0, got {config.hidden}, "
                           f"{config.depth}")
    if out_channels != shape[0]:
        raise DifflabError("model.kind 'mlp' outputs one value per input dimension (no learned variance)")
    return dataclasses.replace(config, dim=shape[0], num_classes=classes)


def fit_dit(config: DiTConfig, shape: tuple[int, ...], out_channels: int, classes: int | None) -> DiTConfig:
    """The data's channels, image size and classes, and the preset's sizes written out explicitly."""
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DifflabError(f"model.kind 'dit' needs square image data (C, H, H), got sample shape {shape}")
    if config.patch_size < 1 or shape[1] % config.patch_size:
        raise DifflabError(f"model.dit.patch_size {config.patch_size} must divide the image size {shape[1]} "
                           f"(data.image_size)")
    if config.block not in DIT_BLOCKS:
        raise DifflabError(f"model.dit.block {config.block!r}: choose one of {', '.join(DIT_BLOCKS)}")
    if config.size is not None and config.size not in DIT_PRESETS:
        raise DifflabError(f"model.dit.size {config.size!r}: choose one of {', '.join(DIT_PRESETS)} (or null and "
                           f"hidden_size, depth, num_heads)")
    try:
        sizes = dit_sizes(config)
    except ValueError as error:
        raise DifflabError(f"model.dit: {error}") from None
    hidden, heads = sizes["hidden_size"], sizes["num_heads"]
    if min(sizes.values()) < 1 or not config.mlp_ratio > 0:
        raise DifflabError(f"model.dit: hidden_size, depth, num_heads and mlp_ratio must be positive, got {sizes}, "
                           f"mlp_ratio {config.mlp_ratio}")
    if hidden % heads:
        raise DifflabError(f"model.dit.num_heads {heads} must divide model.dit.hidden_size {hidden}")
    if hidden % 4:
        raise DifflabError(f"model.dit.hidden_size {hidden} must be divisible by 4 (the 2-D sin-cos positions)")
    return dataclasses.replace(config, **sizes, in_channels=shape[0], image_size=shape[1], out_channels=out_channels,
                               num_classes=classes)


def fit_controlnet(config: ControlNetConfig, shape: tuple[int, ...], out_channels: int,
                   classes: int | None) -> ControlNetConfig:
    """The base U-Net's options come from the base model (``control.base``), already fitted to its data."""
    if not config.base:
        raise DifflabError("model.kind 'controlnet' controls a trained U-Net: set control.base to its run folder")
    base = config.base_config()
    if (base.in_channels, base.image_size, base.image_size) != tuple(shape):
        raise DifflabError(f"model.controlnet: the base U-Net makes samples of shape "
                           f"{(base.in_channels, base.image_size, base.image_size)}, the data are {tuple(shape)}")
    if config.hint_channels < 1 or not config.hint_widths or min(config.hint_widths) < 1:
        raise DifflabError(f"model.controlnet: hint_channels and every hint_widths entry must be at least 1, got "
                           f"{config.hint_channels}, {list(config.hint_widths)}")
    return config


def fit_text_unet(config: TextUNetConfig, shape: tuple[int, ...], out_channels: int,
                  classes: int | None) -> TextUNetConfig:
    """The U-Net fitted to the data, with cross-attention over the text encoder's tokens and its pooled
    embedding in the time embedding, both at the encoder's widths; the encoder's options written out."""
    if classes:
        raise DifflabError("model.kind 'text_unet' is conditioned on captions, not class labels: set "
                           "data.conditional: false")
    encoder = text_encoder_from_json(dict(config.text_encoder), "model.text_unet.text_encoder.")
    unet = from_dict(UNetConfig, dict(config.unet), "model.text_unet.unet.")
    unet = dataclasses.replace(unet, cross_attention=True, context_dim=encoder.width, pooled_dim=encoder.pooled_width)
    return TextUNetConfig(encoder.to_json(), to_dict(fit_unet(unet, shape, out_channels, None)))


def fit_prior(config, shape: tuple[int, ...], out_channels: int, classes: int | None):
    """An unCLIP prior over embeddings of width D: vector data (D,), one output per dimension, no classes."""
    if len(shape) != 1 or out_channels != shape[0] or classes:
        raise DifflabError(f"an unCLIP prior network needs vector data (D,) with no classes or learned variance "
                           f"(unclip.stage: prior), got sample shape {shape}")
    sizes = {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, int) and k != "dim"}
    if min(sizes.values(), default=1) < 1:
        raise DifflabError(f"the prior network's sizes must be at least 1, got {sizes}")
    if getattr(config, "width", 1) % getattr(config, "num_heads", 1):
        raise DifflabError(f"model.prior_transformer.num_heads {config.num_heads} must divide its width "
                           f"{config.width}")
    return dataclasses.replace(config, dim=shape[0])


def fit_unclip_decoder(config: UnclipDecoderConfig, shape: tuple[int, ...], out_channels: int,
                       classes: int | None) -> UnclipDecoderConfig:
    """The U-Net fitted to the data, with cross-attention over z_i's tokens (after the caption's) and z_i
    (with the caption's pooled vector) in the time embedding; ``embed_dim`` is set from the CLIP."""
    if classes:
        raise DifflabError("model.kind 'unclip_decoder' is conditioned on CLIP image embeddings, not class labels: "
                           "set data.conditional: false")
    if config.extra_tokens < 1 or config.embed_dim < 1:
        raise DifflabError(f"model.unclip_decoder: extra_tokens and embed_dim must be at least 1, got "
                           f"{config.extra_tokens}, {config.embed_dim}")
    unet = from_dict(UNetConfig, dict(config.unet or {}), "model.unclip_decoder.unet.")
    encoder, pooled = None, config.embed_dim
    if config.text_encoder is not None:
        encoder = text_encoder_from_json(dict(config.text_encoder), "model.unclip_decoder.text_encoder.")
        unet = dataclasses.replace(unet, context_dim=encoder.width)
        pooled += encoder.pooled_width
    unet = dataclasses.replace(unet, cross_attention=True, pooled_dim=pooled)
    return dataclasses.replace(config, text_encoder=encoder.to_json() if encoder is not None else None,
                               unet=to_dict(fit_unet(unet, shape, out_channels, None)))


NETWORKS: dict[str, NetworkEntry] = {
    "unet": NetworkEntry(UNetConfig, UNet, fit_unet),
    "mlp": NetworkEntry(MLPConfig, MLP, fit_mlp),
    "dit": NetworkEntry(DiTConfig, DiT, fit_dit),
    "controlnet": NetworkEntry(ControlNetConfig, ControlledUNet, fit_controlnet),
    "text_unet": NetworkEntry(TextUNetConfig, TextUNet, fit_text_unet),
    "prior_transformer": NetworkEntry(PriorTransformerConfig, PriorTransformer, fit_prior),
    "prior_mlp": NetworkEntry(PriorMLPConfig, PriorMLP, fit_prior),
    "prior_regression": NetworkEntry(RegressionPriorConfig, RegressionPrior, fit_prior),
    "unclip_decoder": NetworkEntry(UnclipDecoderConfig, UnclipDecoder, fit_unclip_decoder),
}


def network_entry(kind: str) -> NetworkEntry:
    if kind not in NETWORKS:
        raise DifflabError(f"unknown model.kind {kind!r}; choose one of {sorted(NETWORKS)}")
    return NETWORKS[kind]


def network_config(kind: str, options: dict) -> Any:
    """The typed config of network ``kind`` from the ``model.<kind>`` section (strictly checked)."""
    return from_dict(network_entry(kind).config, options or {}, f"model.{kind}.")


def resolve_network(kind: str, options: dict, sample_shape: tuple[int, ...], out_channels: int,
                    num_classes: int | None) -> dict:
    """The network's options with its sizes fitted to the data: what is saved with the weights."""
    entry = network_entry(kind)
    return to_dict(entry.fit(network_config(kind, options), tuple(sample_shape), out_channels, num_classes))


def load_network(kind: str, resolved: dict) -> nn.Module:
    """A network from the resolved options of ``resolve_network``."""
    return network_entry(kind).module(network_config(kind, resolved))
