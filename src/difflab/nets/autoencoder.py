"""A KL-regularised convolutional autoencoder for latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G; the encoder/decoder of CompVis/latent-diffusion's
``ldm/modules/diffusionmodules/model.py``, without attention, sized for small images).

The encoder maps an image to a diagonal Gaussian posterior q(z | x) = N(mean, diag(exp(logvar))) over a
``latent_channels`` x H/f x W/f latent, f = 2^(levels - 1); the decoder maps a latent back to pixels. The network
knows nothing of diffusion; the objective (``difflab.train.autoencoder``) and the latent scale live elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.nets.unet import group_norm


@dataclass
class AutoencoderConfig:
    in_channels: int = 1                   # set from the data
    image_size: int = 28                   # set from the data
    channels: int = 32                     # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)   # one level each; f = 2^(levels - 1) (here 4)
    num_res_blocks: int = 1
    latent_channels: int = 4               # LDM's default
    groups: int = 16
    # the objective's terms (Rombach et al. 2022, App. G: L1 reconstruction plus a small KL weight)
    reconstruction: str = "l1"             # l1 | l2, summed over pixels
    kl_weight: float = 1e-6                # weight of KL(q(z | x) || N(0, I)), summed over latent elements
    adversarial_weight: float = 0.0        # > 0: a patch discriminator's hinge loss (LDM's disc_weight; off)
    adversarial_start: int = 0             # the training step at which the adversarial term starts
    discriminator_channels: int = 32

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.image_size // self.downsampling
        return (self.latent_channels, size, size)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice plus a (1x1 when the width changes) skip connection, no time embedding."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(group_norm(in_ch, groups), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
                                  group_norm(out_ch, groups), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _output(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    return nn.Sequential(group_norm(in_ch, groups), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))


class Encoder(nn.Sequential):
    """x (B, C, H, W) -> posterior parameters (B, 2 latent_channels, H/f, W/f): mean, then log-variance."""

    def __init__(self, c: AutoencoderConfig):
        widths = [c.channels * m for m in c.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, widths[0], 3, padding=1)]
        width = widths[0]
        for level, out in enumerate(widths):
            for _ in range(c.num_res_blocks):
                layers.append(ResnetBlock(width, out, c.groups))
                width = out
            if level < len(widths) - 1:
                layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        layers += [ResnetBlock(width, width, c.groups), _output(width, 2 * c.latent_channels, c.groups)]
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """z (B, latent_channels, H/f, W/f) -> x (B, C, H, W), the encoder's levels in reverse."""

    def __init__(self, c: AutoencoderConfig):
        widths = [c.channels * m for m in c.channel_mult][::-1]
        width = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, width, 3, padding=1),
                                   ResnetBlock(width, width, c.groups)]
        for level, out in enumerate(widths):
            for _ in range(c.num_res_blocks):
                layers.append(ResnetBlock(width, out, c.groups))
                width = out
            if level < len(widths) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
        layers.append(_output(width, c.in_channels, c.groups))
        super().__init__(*layers)


class PatchDiscriminator(nn.Sequential):
    """Real/fake logits per overlapping patch (PatchGAN, Isola et al. 2017, as LDM's ``NLayerDiscriminator``
    with two strided layers and group norm): (B, C, H, W) -> (B, 1, H/4 - 1, W/4 - 1)."""

    def __init__(self, in_channels: int, channels: int, groups: int):
        super().__init__(nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), group_norm(2 * channels, groups),
                         nn.LeakyReLU(0.2), nn.Conv2d(2 * channels, 1, 4, stride=1, padding=1))


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.discriminator = (PatchDiscriminator(config.in_channels, config.discriminator_channels, config.groups)
                              if config.adversarial_weight > 0 else None)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance of q(z | x); the log-variance clamped to [-30, 20] as LDM's
        ``DiagonalGaussianDistribution``."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction of x from the posterior sample z = mean + exp(logvar / 2) noise, and the posterior."""
        mean, logvar = self.posterior(x)
        return self.decode(mean + (0.5 * logvar).exp() * noise), mean, logvar
