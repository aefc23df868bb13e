"""Training the autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1), with the common loop.

The loss of one image is its reconstruction error from a posterior sample, summed over pixels, plus
``kl_weight`` times KL(q(z | x) || N(0, I)) summed over latent elements (LDM's ``LPIPSWithDiscriminator``
without its perceptual term, which needs LPIPS weights this toolkit cannot download), divided by the number of
pixels so that learning rates keep their usual meaning. With ``adversarial_weight`` > 0 (off by default), a
patch discriminator is trained beside it with LDM's hinge losses (Lim & Ye 2017) from step
``adversarial_start``: the autoencoder adds ``adversarial_weight`` x -D(x_rec) (through the discriminator with its
weights detached, so that this term trains only the autoencoder) and the discriminator learns
relu(1 - D(x)) + relu(1 + D(x_rec)) (on the detached reconstruction); one optimiser holds both (LDM uses two, and
a weight adapted to the gradient norms, which is not done here). When training ends the latent scale is
measured on the training data (``difflab.latent.measure_latent_scale``) and stored in the checkpoint's
"autoencoder" record, with the reconstruction error on held-out images; a latent diffusion experiment names
this checkpoint as ``data.autoencoder``.

    difflab train configs/fmnist_autoencoder.yaml
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from difflab.build import build_data
from difflab.config import Config
from difflab.data import InMemoryData, to_uint8_images
from difflab.errors import DifflabError
from difflab.imageio import save_grid
from difflab.latent import measure_latent_scale
from difflab.nets.autoencoder import Autoencoder, AutoencoderConfig
from difflab.train.batches import StepBatch
from difflab.train.trainer import Trainer
from difflab.typed import from_dict, to_dict

RECONSTRUCTIONS = ("l1", "l2")


def autoencoder_config(config: Config, data: InMemoryData) -> AutoencoderConfig:
    """``model.autoencoder`` fitted to the images (channels, size), checked."""
    if not data.is_image or len(data.sample_shape) != 3 or data.sample_shape[1] != data.sample_shape[2]:
        raise DifflabError(f"model.kind 'autoencoder' needs square images, got sample shape {data.sample_shape}")
    c = from_dict(AutoencoderConfig, config.model.options, "model.autoencoder.")
    channels, size, _ = data.sample_shape
    if c.reconstruction not in RECONSTRUCTIONS:
        raise DifflabError(f"unknown model.autoencoder.reconstruction {c.reconstruction!r}; choose one of "
                           f"{RECONSTRUCTIONS}")
    if c.adversarial_weight < 0 or c.adversarial_start < 0 or c.discriminator_channels < 1:
        raise DifflabError("model.autoencoder: adversarial_weight and adversarial_start must be at least 0, "
                           "discriminator_channels at least 1")
    if c.kl_weight < 0 or c.channels < 1 or c.latent_channels < 1 or not c.channel_mult or c.num_res_blocks < 1:
        raise DifflabError("model.autoencoder: kl_weight must be at least 0; channels, latent_channels, "
                           "num_res_blocks and the levels of channel_mult at least 1")
    if size % c.downsampling:
        raise DifflabError(f"model.autoencoder: image size {size} is not divisible by the downsampling factor "
                           f"{c.downsampling} of {len(c.channel_mult)} levels of channel_mult (data.image_size)")
    return dataclasses.replace(c, in_channels=channels, image_size=size)


class AutoencoderObjective:
    """Reconstruction plus KL of ``autoencoder`` on a batch of images; the posterior noise from the step."""

    def __init__(self, autoencoder: Autoencoder):
        self.trained = autoencoder
        self.config = autoencoder.config

    def draw(self, x0: torch.Tensor, cond, generator: torch.Generator, step: int = 0) -> StepBatch:
        noise = torch.randn((x0.shape[0], *self.config.latent_shape), generator=generator)
        adversarial = float(self.config.adversarial_weight > 0 and step >= self.config.adversarial_start)
        return StepBatch({"x0": x0, "noise": noise, "adversarial": torch.full((x0.shape[0],), adversarial)})

    def loss(self, batch: StepBatch, forward: nn.Module) -> tuple[torch.Tensor, dict]:
        reconstruction, mean, logvar = forward(batch.x0, batch.noise)
        error = (reconstruction.float() - batch.x0).flatten(1)
        error = error.abs() if self.config.reconstruction == "l1" else error.pow(2)
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)
        pixels = error.shape[1]
        losses = (error.sum(1) + self.config.kl_weight * kl) / pixels
        extras = {"reconstruction": error.mean().item(), "kl": kl.mean().item()}
        if self.trained.discriminator is not None:
            generator_loss, discriminator_loss = self.adversarial_losses(batch.x0, reconstruction)
            on = batch.adversarial
            losses = losses + on * (self.config.adversarial_weight * generator_loss + discriminator_loss)
            extras.update(generator=generator_loss.mean().item(), discriminator=discriminator_loss.mean().item())
        return losses, extras

    def adversarial_losses(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the autoencoder's hinge loss -D(fake) (the discriminator's weights detached) and the
        discriminator's relu(1 - D(real)) + relu(1 + D(fake)) (the reconstruction detached); logits averaged
        over patches."""
        discriminator = self.trained.discriminator
        detached = {name: p.detach() for name, p in discriminator.named_parameters()}
        fake_logits = torch.func.functional_call(discriminator, detached, (fake,)).float().flatten(1).mean(1)
        real_term = F.relu(1 - discriminator(real).float()).flatten(1).mean(1)
        fake_term = F.relu(1 + discriminator(fake.detach()).float()).flatten(1).mean(1)
        return -fake_logits, real_term + fake_term


@torch.no_grad()
def reconstruction_error(autoencoder: Autoencoder, data: InMemoryData, max_examples: int = 2000) -> dict:
    """Mean squared and absolute error of the posterior mean's reconstruction, pixels in [-1, 1]."""
    x, _ = data.batch(torch.arange(min(len(data), max_examples)))
    device = next(autoencoder.parameters()).device
    reconstruction = autoencoder.decode(autoencoder.posterior(x.to(device))[0]).clamp(-1, 1).cpu()
    return {"mse": (reconstruction - x).pow(2).mean().item(), "mae": (reconstruction - x).abs().mean().item(),
            "examples": x.shape[0]}


def autoencoder_trainer(config: Config, resume=False, progress: bool = True, overwrite: bool = False) -> Trainer:
    torch.manual_seed(config.train.seed)
    if config.data.autoencoder:
        raise DifflabError("data.autoencoder names the latent space of a diffusion model; an autoencoder "
                           "trains on images (remove it)")
    data = build_data(config.data)
    autoencoder = Autoencoder(autoencoder_config(config, data))
    trainer = Trainer(config, AutoencoderObjective(autoencoder), data, resume=resume, progress=progress,
                      metadata={"autoencoder": {"network_options": to_dict(autoencoder.config), "scale": None}},
                      overwrite=overwrite)
    return trainer


def finish_autoencoder(trainer: Trainer, scale_examples: int = 10000) -> dict:
    """After training: measure the latent scale on the training images with the EMA weights, the
    reconstruction error on the test split, write a grid of test images over their reconstructions, and save
    the checkpoint again with them in its "autoencoder" record."""
    trainer.train_seconds, trainer.invocation_start = trainer.elapsed(), time.perf_counter()  # not training time
    ema = trainer.ema.model.eval()
    scale = measure_latent_scale(ema, trainer.data, scale_examples, seed=trainer.config.train.seed)
    held_out = build_data(trainer.config.data, split="test")
    error = reconstruction_error(ema, held_out)
    x, _ = held_out.batch(torch.arange(min(16, len(held_out))))
    with torch.no_grad():
        reconstruction = ema.decode(ema.posterior(x)[0])
    save_grid(to_uint8_images(torch.cat([x, reconstruction])), trainer.out_dir / "reconstructions.png",
              columns=x.shape[0], scale=2)
    record = {**trainer.metadata["autoencoder"], "scale": scale, "test_reconstruction": error,
              "scale_examples": min(scale_examples, len(trainer.data))}
    trainer.metadata["autoencoder"] = record
    trainer.invocation_start = time.perf_counter()
    trainer.save()
    return record
