"""The latent space of a trained autoencoder, where a latent diffusion model lives (Rombach et al. 2022).

``LatentSpace`` holds the autoencoder and its latent scale: the diffusion model sees z = scale * (posterior
sample), so that the latents have unit standard deviation, the noise schedules' assumption. The scale is
measured on the training data when the autoencoder's training ends (``measure_latent_scale``; LDM's 0.18215 is
that measurement for the Stable Diffusion autoencoder, App. G) and stored in its checkpoint; nothing here is a
constant. ``LatentData`` is a data set held as posterior parameters (cached to disk), drawing a fresh posterior
sample for every batch (the diffusion model trains on q(z | x), not its mode).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, load_weights
from difflab.data import InMemoryData
from difflab.errors import DifflabError
from difflab.files import atomic_write
from difflab.nets.autoencoder import Autoencoder, AutoencoderConfig
from difflab.typed import from_dict, to_dict

ENCODE_BATCH = 500


@dataclass
class LatentSpace:
    autoencoder: Autoencoder        # frozen, in eval mode
    scale: float                    # z_model = scale * z_posterior
    source: str = ""                # the checkpoint it was read from (for messages and caches)
    digest: str = ""                # that checkpoint's tensors' SHA-256

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.autoencoder.config
        return (c.in_channels, c.image_size, c.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.autoencoder.config.latent_shape

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of scale * z, z ~ q(z | x), for images in [-1, 1]."""
        device = next(self.autoencoder.parameters()).device
        mean, logvar = self.autoencoder.posterior(images.to(device))
        return self.scale * mean, self.scale * (0.5 * logvar).exp()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (unclipped, nominally [-1, 1]) from latents of the diffusion model's scale."""
        device = next(self.autoencoder.parameters()).device
        return self.autoencoder.decode(latents.to(device) / self.scale)

    def to_json(self) -> dict:
        return {"network_options": to_dict(self.autoencoder.config), "scale": self.scale, "source": self.source,
                "sha256": self.digest}

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, record: dict, prefix: str) -> "LatentSpace":
        """The latent space described by ``record`` (``to_json``) with the weights under ``prefix``."""
        try:
            config = from_dict(AutoencoderConfig, record["network_options"], "autoencoder.")
            scale = float(record["scale"])
        except (KeyError, TypeError, ValueError) as e:
            raise DifflabError(f"{checkpoint.path}: invalid autoencoder description ({e!r})") from None
        autoencoder = Autoencoder(config)
        load_weights(autoencoder, checkpoint, prefix)
        return frozen(cls(autoencoder, scale, str(record.get("source", checkpoint.path)),
                          str(record.get("sha256", ""))))


def frozen(space: LatentSpace) -> LatentSpace:
    space.autoencoder.eval()
    for p in space.autoencoder.parameters():
        p.requires_grad_(False)
    return space


def load_latent_space(path: str | Path) -> LatentSpace:
    """The latent space of an autoencoder trained by ``difflab train`` (its run folder or checkpoint), with the
    EMA weights; refused until its training has ended and measured the latent scale."""
    path = Path(path)
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    if not file.is_file():
        raise DifflabError(f"data.autoencoder: {file} does not exist (train the autoencoder first)")
    checkpoint = load_checkpoint(file)
    record = checkpoint.metadata.get("autoencoder")
    if not isinstance(record, dict):
        raise DifflabError(f"data.autoencoder: {checkpoint.path} is not an autoencoder checkpoint "
                           f"(train one with model.kind: autoencoder)")
    if record.get("scale") is None:
        raise DifflabError(f"data.autoencoder: {checkpoint.path} has no latent scale yet (its training has not "
                           f"ended: finish it with difflab train --resume)")
    record = {**record, "source": str(checkpoint.path.resolve()), "sha256": checkpoint.sha256}
    return LatentSpace.from_checkpoint(checkpoint, record, "ema" if checkpoint.has_ema else "model")


@torch.no_grad()
def measure_latent_scale(autoencoder: Autoencoder, data: InMemoryData, max_examples: int = 10000,
                         seed: int = 0) -> float:
    """1 / std of posterior samples z ~ q(z | x) over (at most ``max_examples``) training images, all latent
    elements pooled, as LDM's ``scale_by_std`` (there from one batch; here from many)."""
    mean, std = posterior_parameters(LatentSpace(autoencoder, 1.0), data, max_examples)
    z = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))).double()
    variance = z.var(unbiased=False).item()
    if not variance > 0:
        raise DifflabError("the autoencoder's latents have zero variance: it has not learned an encoding")
    return float(variance ** -0.5)


def posterior_parameters(space: LatentSpace, images: InMemoryData, count: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled posterior mean and standard deviation of the first ``count`` (all) images, float32 on the
    CPU, encoded ``ENCODE_BATCH`` at a time."""
    count = len(images) if count is None else min(count, len(images))
    means, stds = [], []
    for start in range(0, count, ENCODE_BATCH):
        x, _ = images.batch(torch.arange(start, min(start + ENCODE_BATCH, count)))
        mean, std = space.posterior(x)
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@dataclass
class LatentData:
    """A data set as the posterior parameters of its images (scaled); ``batch`` draws posterior samples."""
    mean: torch.Tensor                      # float32 (N, c, h, w)
    std: torch.Tensor
    labels: torch.Tensor | None = None
    num_classes: int | None = None
    name: str = ""
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def is_image(self) -> bool:             # latents: never clipped to a pixel range
        return False

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        """Posterior samples scale * z, z ~ q(z | x), of the examples (noise from ``generator``)."""
        mean, std = self.mean[indices], self.std[indices]
        noise = torch.randn(mean.shape, generator=generator)
        y = self.labels[indices] if self.labels is not None else None
        return mean + std * noise, y


def encode_dataset(space: LatentSpace, images: InMemoryData, cache: Path | None = None) -> LatentData:
    """``images`` encoded by ``space`` (read from / written to ``cache``, a safetensors file, when given)."""
    if cache is not None and cache.is_file():
        try:
            tensors = load_file(str(cache))
            if tensors["mean"].shape[0] == len(images):
                return LatentData(tensors["mean"], tensors["std"], images.labels, images.num_classes,
                                  images.name, images.class_names)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            pass
    mean, std = posterior_parameters(space, images)
    if cache is not None:
        atomic_write(cache, lambda tmp: save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp)))
    return LatentData(mean, std, images.labels, images.num_classes, images.name, images.class_names)


def cache_path(space: LatentSpace, data_config, split: str) -> Path:
    """Where a data set's latents are cached: beside the autoencoder, named by its weights and the data's
    settings (a retrained autoencoder or other data never reuse a stale cache)."""
    key = json.dumps({"ae": space.digest, "scale": space.scale, "split": split, "dataset": data_config.dataset,
                      "path": data_config.path, "image_size": data_config.image_size, "resize": data_config.resize,
                      "channels": data_config.channels, "toy": data_config.toy}, sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(space.source).parent / "latents" / f"{split}-{name}.safetensors"
