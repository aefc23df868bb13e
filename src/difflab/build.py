"""Build the objects an experiment names: data, the model (network + preconditioning + conditions), the
schedule. Used by the trainer; the model is described by a ``ModelSpec`` saved with the weights, so sampling
rebuilds it from the checkpoint alone.
"""

from __future__ import annotations

import torch

from difflab.conditioning import (AUG_LEVEL_FIELD, CAPTION_FIELD, IMAGE_EMBED_FIELD, LOW_RES_FIELD, TEXT_EMBED_FIELD,
                                  AugmentationLevel, Caption, ClassLabel, ClipEmbedding, LowResImage)
from difflab.config import Config, DataConfig, DiffusionConfig
from difflab.data import InMemoryData, load_fashion_mnist, load_image_folder, load_toy
from difflab.data.base import CaptionedData
from difflab.data.folder import StreamedImageFolder
from difflab.denoiser import ConsistencyPrecond, Denoiser, EDMPrecond, Precond, VPPrecond
from difflab.errors import DifflabError
from difflab.model import ModelSpec, denoiser_from_spec
from difflab.nets.registry import resolve_network
from difflab.schedules import NoiseSchedule

DATASETS = ("fashion_mnist", "folder", "toy", "emoji")
PRECONDS = ("vp", "edm", "consistency")
IMAGE_RANGE = (-1.0, 1.0)         # InMemoryData scales pixels to [-1, 1]


def build_captioned_data(config: DataConfig, split: str = "train") -> CaptionedData:
    """Text-to-image data: Fashion-MNIST with its templated captions (``difflab.data.captions``), or the
    captioned emoji set (``difflab.data.emoji_set``)."""
    if config.dataset == "fashion_mnist":
        from difflab.data.captions import load_captioned_fashion_mnist
        loaded = load_captioned_fashion_mnist(split, config.path, config.image_size, config.resize,
                                              held_out=config.held_out_captions)
        name = "fashion_mnist_captions"
    elif config.dataset == "emoji":
        from difflab.data.emoji_set import load_emoji_set
        loaded = load_emoji_set(split, config.image_size)
        name = "emoji"
    else:
        raise DifflabError(f"data.captions: data set {config.dataset!r} has no captions; choose fashion_mnist or "
                           f"emoji")
    classes = tuple(loaded.class_names)
    return CaptionedData(loaded.images, loaded.labels, len(classes) or None, name, classes,
                         captions=tuple(loaded.captions))


def build_data(config: DataConfig, split: str = "train") -> InMemoryData:
    if config.captions or config.dataset == "emoji":
        return build_captioned_data(config, split)
    if config.stream and config.dataset != "folder":
        raise DifflabError(f"data.stream reads image folders from disk batch by batch; data.dataset "
                           f"{config.dataset!r} is held in memory (set data.stream: false)")
    if config.dataset == "fashion_mnist":
        return load_fashion_mnist(split, config.path, config.image_size, config.resize, config.download)
    if config.dataset == "folder":
        if not config.path:
            raise DifflabError("data.path must name the image folder when data.dataset is 'folder'")
        if config.stream:
            return StreamedImageFolder(config.path, config.image_size, config.channels)
        return load_image_folder(config.path, config.image_size, config.channels)
    if config.dataset == "toy":
        return load_toy(config.toy, config.num_points, seed=0 if split == "train" else 1)
    raise DifflabError(f"unknown data.dataset {config.dataset!r}; choose one of {DATASETS}")


def build_schedule(config: DiffusionConfig) -> NoiseSchedule:
    options = ({"sigma_min": config.sigma_min, "sigma_max": config.sigma_max}
               if config.schedule == "geometric" else {})
    return NoiseSchedule.from_name(config.schedule, config.timesteps, **options)


def data_std(data: InMemoryData, max_examples: int = 10000) -> float:
    """The standard deviation of the (model-ready) training data, over at most ``max_examples`` examples."""
    x, _ = data.batch(torch.arange(min(len(data), max_examples)))
    return x.double().std().item()


def build_precond(config: DiffusionConfig, data: InMemoryData | None = None) -> Precond:
    if config.precond == "vp":
        return VPPrecond(build_schedule(config), config.prediction)
    if config.precond in ("edm", "consistency"):
        if config.learn_variance:
            raise DifflabError("diffusion.learn_variance needs diffusion.precond 'vp' (a discrete schedule)")
        sigma_data = config.sigma_data
        if sigma_data is None:
            if data is None:
                raise DifflabError("diffusion.sigma_data: measuring it needs the training data")
            sigma_data = data_std(data)
        kind = EDMPrecond if config.precond == "edm" else ConsistencyPrecond
        return kind(sigma_data, config.sigma_min, config.sigma_max)
    raise DifflabError(f"unknown diffusion.precond {config.precond!r}; choose one of {PRECONDS}")


def build_latent_data(config: DataConfig, split: str = "train"):
    """The data set in the latent space of ``config.autoencoder`` (encoded once, cached beside it), and that
    latent space."""
    from difflab.latent import cache_path, encode_dataset, load_latent_space

    space = load_latent_space(config.autoencoder)
    if config.hflip:
        raise DifflabError("data.hflip flips images, not latents: it cannot be used with data.autoencoder")
    images = build_data(config, split)
    if images.sample_shape != space.image_shape:
        raise DifflabError(f"data.autoencoder {space.source} encodes images of shape {space.image_shape}, the "
                           f"data are {images.sample_shape} (data.image_size, data.channels)")
    cache = cache_path(space, config, split) if config.cache_latents else None
    return encode_dataset(space, images, cache), space


def build_unclip_data(config: Config, split: str = "train"):
    """An unCLIP stage's data set (``difflab.clip_embeddings``): the captioned images encoded once by the frozen
    CLIP ``data.clip`` (cached beside it), as the prior's (z_i given z_t) or the decoder's (images given z_i);
    and that CLIP."""
    from difflab.clip_embeddings import cache_path, cached_embeddings, load_clip_space, unclip_dataset

    d, stage = config.data, config.unclip.stage
    if not d.clip:
        raise DifflabError(f"data.clip: an unCLIP {stage} trains on a frozen CLIP's embeddings: name its run, e.g. "
                           f"--set data.clip=runs/fmnist_clip (difflab train-clip fmnist_clip trains one)")
    if d.hflip or d.autoencoder or d.conditional or config.superres.low_res is not None:
        raise DifflabError("unclip.stage: an unCLIP model reads CLIP embeddings of the unflipped pixel images; it "
                           "cannot be combined with data.hflip, data.autoencoder, data.conditional or superres.low_res")
    space = load_clip_space(d.clip)
    captioned = build_captioned_data(d, split)
    if captioned.sample_shape != space.image_shape:
        raise DifflabError(f"data.clip {space.source} encodes images of shape {space.image_shape}, the data are "
                           f"{captioned.sample_shape} (data.image_size)")
    image, text = cached_embeddings(space, captioned, cache_path(space, d, split))
    return unclip_dataset(stage, space, captioned, image, text), space


PRIOR_NETWORKS = ("prior_transformer", "prior_mlp", "prior_regression")


def unclip_model_spec(config: Config, data) -> ModelSpec:
    """An unCLIP prior (a prior network on sqrt(d) z_i given sqrt(d) z_t) or decoder (``unclip_decoder`` on images
    given sqrt(d) z_i, and the caption when it has a text encoder), fitted to ``data`` (``build_unclip_data``)."""
    stage, kind, shape = config.unclip.stage, config.model.kind, data.sample_shape
    wanted = PRIOR_NETWORKS if stage == "prior" else ("unclip_decoder",)
    if kind not in wanted:
        raise DifflabError(f"unclip.stage {stage}: model.kind must be {' or '.join(wanted)}, not {kind!r}")
    dim = data.image_embed.shape[1]
    field = TEXT_EMBED_FIELD if stage == "prior" else IMAGE_EMBED_FIELD
    conditions = [ClipEmbedding(field, config.unclip.embedding_dropout, dim, data.embed_scale).to_json()]
    options = dict(config.model.options, **({"embed_dim": dim} if stage == "decoder" else {}))
    out_channels = shape[0] * (2 if config.diffusion.learn_variance else 1)
    options = resolve_network(kind, options, shape, out_channels, None)
    if options.get("text_encoder") is not None:          # a decoder that reads the caption too
        conditions.append(caption_condition(options, config.train.caption_dropout).to_json())
    return ModelSpec(kind, options, build_precond(config.diffusion, data).to_json(), shape,
                     IMAGE_RANGE if data.is_image else None, conditions, config.diffusion.learn_variance)


def superres_conditions(config: Config, shape: tuple[int, ...]) -> list:
    """A super-resolution stage's conditions: the low-resolution image, and its augmentation level."""
    r = config.superres
    conditions = [LowResImage(LOW_RES_FIELD, 0.0, r.low_res, shape[0])]
    if r.augmentation != "none":
        conditions.append(AugmentationLevel(AUG_LEVEL_FIELD, 0.0, r.augmentation, r.max_level, r.max_blur))
    return conditions


def superres_inputs(config: Config, shape: tuple[int, ...]) -> dict:
    """The U-Net options that make it read them (its low-resolution input channels, the level's embedding)."""
    r = config.superres
    if config.model.kind != "unet" or len(shape) != 3:
        raise DifflabError(f"superres.low_res: a super-resolution stage is a U-Net on images, not "
                           f"model.kind {config.model.kind!r}")
    if r.low_res >= shape[1] or config.data.autoencoder:
        raise DifflabError(f"superres.low_res {r.low_res} must be below the pixel-space image size {shape[1]} "
                           f"(data.image_size; no data.autoencoder)")
    return {"low_res_channels": shape[0], "augmentation_embedding": r.augmentation != "none"}


def caption_condition(text_unet_options: dict, dropout: float) -> Caption:
    """The caption field of a text-to-image model: its length and the empty caption's tokens (the null
    condition) in the model's tokenizer."""
    from difflab.nets.text_encoder import text_encoder_from_json

    encoder = text_encoder_from_json(dict(text_unet_options["text_encoder"]))
    null = encoder.tokenize([""])[0]
    return Caption(CAPTION_FIELD, dropout, len(null), tuple(int(i) for i in null))


def model_spec(config: Config, data: InMemoryData, latent=None) -> ModelSpec:
    """What the experiment's model is, fitted to ``data``: network, preconditioning, shape and conditions;
    ``latent``: the ``LatentSpace`` the data are in (latent diffusion)."""
    if config.unclip.stage is not None:
        return unclip_model_spec(config, data)
    shape = data.sample_shape
    conditions = []
    if config.data.conditional:
        if data.labels is None or not data.num_classes:
            raise DifflabError(f"data.conditional: data set {data.name!r} has no class labels")
        conditions.append(ClassLabel("label", config.train.label_dropout, data.num_classes,
                                     tuple(data.class_names)).to_json())
    text = config.model.kind == "text_unet"
    if text != isinstance(data, CaptionedData):
        raise DifflabError("text-to-image: model.kind 'text_unet' trains on captioned data (data.captions: true) and "
                           "captioned data need model.kind 'text_unet'")
    out_channels = shape[0] * (2 if config.diffusion.learn_variance else 1)
    options = dict(config.model.options)
    if config.superres.low_res is not None:
        options.update(superres_inputs(config, shape))
        conditions += [c.to_json() for c in superres_conditions(config, shape)]
    options = resolve_network(config.model.kind, options, shape, out_channels,
                              data.num_classes if any(c["name"] == "label" for c in conditions) else None)
    if text:
        conditions.append(caption_condition(options, config.train.caption_dropout).to_json())
    return ModelSpec(config.model.kind, options, build_precond(config.diffusion, data).to_json(), shape,
                     IMAGE_RANGE if data.is_image else None, conditions, config.diffusion.learn_variance,
                     latent.to_json() if latent is not None else None)


def build_model(config: Config, data: InMemoryData, latent=None) -> tuple[Denoiser, ModelSpec]:
    spec = model_spec(config, data, latent)
    return denoiser_from_spec(spec), spec
