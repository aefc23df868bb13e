"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"):
spatial control of a frozen U-Net through a trainable copy of its encoder.

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)          (Eq. 2)

``ControlledUNet`` holds the base U-Net (frozen: no gradients, always in eval mode) and a ``ControlNet``: a copy
of the base's encoder (``UNetEncoder``: embeddings, input conv, down stages, middle block), initialised from the
base's weights by the trainer; a small hint encoder (3x3 convolutions with SiLU, ending in a zero convolution,
the paper's E(.) without its strides: the hint is at the image's resolution in pixel space) whose output is added
to the copy's input-conv output ("after the first input block", as the reference ``cldm.py``); and one 1x1 zero
convolution per skip connection plus one on the middle block. The base runs unchanged, with the zero
convolutions' outputs, times the control scale, added to its skip connections and its middle block's output
before its decoder reads them. With every zero convolution at zero the sum is the base's output bit for bit.

The control image is ``cond["control"]`` (B, hint_channels, H, W) in [0, 1]; ``cond["control_scale"]`` (B,),
optional, multiplies the residuals per sample (1 when absent; 0 is the base). Without a control image the base
runs alone. The copy reads the same label (or tokens) as the base, from the same record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from difflab.nets.unet import UNet, UNetConfig, UNetEncoder, zero_init
from difflab.typed import from_dict


@dataclass
class ControlNetConfig:
    base: dict = field(default_factory=dict)      # the frozen U-Net's resolved options (a UNetConfig)
    hint_channels: int = 1                        # channels of the control image
    hint_widths: tuple[int, ...] = (16, 32)       # the hint encoder's 3x3 convolutions (paper: 16, 32, 96, 256)
    zero_init: bool = True                        # zero convolutions; False: PyTorch's default initialisation
    #                                               (the paper's ablation, Sec. 4.3 / Fig. 8)

    def base_config(self) -> UNetConfig:
        return from_dict(UNetConfig, dict(self.base), "model.controlnet.base.")


def joining_conv(channels: int, zero: bool) -> nn.Conv2d:
    """A 1x1 convolution joining the copy to the base: zero-initialised ("zero convolution") unless ablated."""
    conv = nn.Conv2d(channels, channels, 1)
    return zero_init(conv) if zero else conv


class HintEncoder(nn.Module):
    """E(c): 3x3 convolutions with SiLU through ``widths``, then a (zero) 3x3 convolution to the U-Net's width."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], out_channels: int, zero: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU()]
            in_channels = width
        out = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.layers = nn.Sequential(*layers, zero_init(out) if zero else out)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        return self.layers(hint)


class ControlNet(UNetEncoder):
    """The trainable copy: the base's encoder with the encoded hint added after its input conv; returns the
    zero convolutions' outputs for the base's skips (input conv and every down stage) and its middle block."""

    def __init__(self, config: UNetConfig, hint_channels: int, hint_widths: tuple[int, ...], zero: bool):
        super().__init__(config)
        self.hint_encoder = HintEncoder(hint_channels, hint_widths, config.model_channels, zero)
        self.skip_convs = nn.ModuleList(joining_conv(channels, zero) for channels in self.skip_channels)
        self.middle_conv = joining_conv(self.encoder_channels, zero)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None,
                hint: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        h, _, skips = self.encode(x, t, cond, input_residual=self.hint_encoder(hint.to(x.dtype)))
        return [conv(skip) for conv, skip in zip(self.skip_convs, skips)], self.middle_conv(h)


class ControlledUNet(nn.Module):
    """The frozen base U-Net with a ControlNet's residuals added to its skip connections and middle block."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        base_config = config.base_config()
        self.base = UNet(base_config).requires_grad_(False)
        self.control = ControlNet(base_config, config.hint_channels, tuple(config.hint_widths), config.zero_init)

    @property
    def consumes(self) -> tuple[str, ...]:
        return self.base.consumes + ("control",)

    def train(self, mode: bool = True) -> "ControlledUNet":
        super().train(mode)
        self.base.eval()                   # frozen: its dropout (if any) stays off while the copy trains
        return self

    def copy_base_into_control(self) -> None:
        """Initialise the copy with the base's encoder weights (Zhang et al. 2023, Sec. 3.1: Theta_c <- Theta).
        The encoder's state_dict keys are a subset of the U-Net's (``UNetEncoder``)."""
        base = self.base.state_dict()
        encoder_keys = [k for k in self.control.state_dict()
                        if not k.startswith(("hint_encoder.", "skip_convs.", "middle_conv."))]
        self.control.load_state_dict({k: base[k] for k in encoder_keys}, strict=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        hint = cond.get("control") if cond is not None else None
        if hint is None:
            return self.base(x, t, cond)
        tokens = self.base.condition_tokens(cond, x.shape[0], x.device)
        h, emb, skips = self.base.encode(x, t, cond, tokens)
        residuals, middle = self.control(x, t, cond, hint)
        scale = cond.get("control_scale")
        if scale is not None:                                                  # (B,) -> (B, 1, 1, 1)
            scale = scale.to(x.dtype).reshape(-1, 1, 1, 1)
            residuals, middle = [r * scale for r in residuals], middle * scale
        skips = [skip + residual for skip, residual in zip(skips, residuals)]
        return self.base.decode(h + middle, emb, skips, tokens)
