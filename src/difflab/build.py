"""Build the objects an experiment names: data, network, schedule, denoiser. Used by trainer and pipelines."""

from __future__ import annotations

import dataclasses

from torch import nn

from difflab.config import Config, DataConfig, DiffusionConfig, ModelConfig
from difflab.data import InMemoryData, load_fashion_mnist, load_image_folder, load_toy
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.nets import MLP, UNet
from difflab.schedules import NoiseSchedule

DATASETS = ("fashion_mnist", "folder", "toy")


def build_data(config: DataConfig, split: str = "train") -> InMemoryData:
    if config.dataset == "fashion_mnist":
        return load_fashion_mnist(split, config.path, config.image_size, config.resize, config.download)
    if config.dataset == "folder":
        if not config.path:
            raise DifflabError("data.path must name the image folder when data.dataset is 'folder'")
        return load_image_folder(config.path, config.image_size, config.channels)
    if config.dataset == "toy":
        return load_toy(config.toy, config.num_points, seed=0 if split == "train" else 1)
    raise DifflabError(f"unknown data.dataset {config.dataset!r}; choose one of {DATASETS}")


def sample_shape(config: DataConfig) -> tuple[int, ...]:
    """Shape of one sample, known from the config alone (so sampling needs no data on disk)."""
    if config.dataset == "toy":
        return (2,)
    channels = 1 if config.dataset == "fashion_mnist" else config.channels
    return (channels, config.image_size, config.image_size)


def num_classes(config: DataConfig) -> int | None:
    return 10 if config.conditional and config.dataset == "fashion_mnist" else None


def build_net(model: ModelConfig, data: DataConfig, learn_variance: bool = False) -> nn.Module:
    """The network, with its input size and number of classes taken from the data config; a learned
    variance doubles the output channels (eps first, then the variance interpolation)."""
    shape = sample_shape(data)
    if model.kind == "unet":
        if len(shape) != 3:
            raise DifflabError(f"model.kind 'unet' needs image data, but data.dataset is {data.dataset!r}")
        return UNet(dataclasses.replace(model.unet, in_channels=shape[0], image_size=shape[1],
                                        out_channels=shape[0] * (2 if learn_variance else 1),
                                        num_classes=num_classes(data)))
    if model.kind == "mlp":
        if len(shape) != 1:
            raise DifflabError("model.kind 'mlp' needs vector data (data.dataset: toy)")
        if learn_variance:
            raise DifflabError("diffusion.learn_variance needs model.kind 'unet'")
        return MLP(dataclasses.replace(model.mlp, dim=shape[0], num_classes=num_classes(data)))
    raise DifflabError(f"unknown model.kind {model.kind!r}; choose 'unet' or 'mlp'")


def build_schedule(config: DiffusionConfig) -> NoiseSchedule:
    options = ({"sigma_min": config.sigma_min, "sigma_max": config.sigma_max}
               if config.schedule == "geometric" else {})
    return NoiseSchedule.from_name(config.schedule, config.timesteps, **options)


def build_denoiser(config: Config) -> Denoiser:
    return Denoiser(build_net(config.model, config.data, config.diffusion.learn_variance),
                    build_schedule(config.diffusion), config.diffusion.prediction, config.diffusion.learn_variance)
