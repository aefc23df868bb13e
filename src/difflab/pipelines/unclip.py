"""unCLIP sampling (Ramesh et al. 2022, Sec. 2, Fig. 2): caption -> the CLIP text embedding z_t -> the prior's
image embedding z_i -> the decoder's image; and variations of an image (Sec. 3.1): its own z_i decoded anew.

A pipeline is a YAML file naming the two runs (each holds the frozen CLIP it was trained with; both must hold
the same one), like a cascade's (``difflab.pipelines.cascade``):

    unclip:
      prior: runs/fmnist_unclip_prior
      decoder: runs/fmnist_unclip_decoder
      prior_candidates: 2       # Sec. 2.2: draw two z_i and keep the one with the higher dot product with z_t
      prior_guidance: null      # classifier-free guidance weight of each stage (null: its preset's)
      decoder_guidance: null

``difflab sample PIPELINE.yaml --prompt TEXT --n 16`` runs it; each stage samples with its own preset's sampler,
the file's guidance weight, then the command line's sampling options (which apply to both stages, as a
cascade's do). The decoder's sample i is seeded by ``seed + i``; prior candidate k's sample i by ``seed + i +
(k + 1) * 1000003``. Guidance is the library's ``ClassifierFreeGuidance``: the prior's null condition is the
zero z_t, the decoder's the zero z_i (and the empty caption, for a decoder that reads it), the same null values
the models were trained with (``ClipEmbedding``, ``Caption``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.checkpoint import load_checkpoint
from difflab.clip_embeddings import ClipSpace
from difflab.conditioning import CAPTION_FIELD, IMAGE_EMBED_FIELD, TEXT_EMBED_FIELD, Cond
from difflab.config import SampleConfig
from difflab.errors import DifflabError
from difflab.pipelines.cascade import STAGE_SEED_STRIDE
from difflab.pipelines.ddpm import LoadedModel, load_model, sample
from difflab.typed import from_dict


@dataclass
class UnclipPipelineConfig:
    prior: str = ""                            # the prior's run folder or checkpoint
    decoder: str = ""                          # the decoder's
    prior_candidates: int = 2                  # z_i drawn per caption; the one most aligned with z_t is kept
    prior_guidance: float | None = None        # None: the prior preset's sample.guidance
    decoder_guidance: float | None = None


def is_unclip_file(path: str | Path) -> bool:
    """Whether a YAML file is an unCLIP pipeline (its one section is ``unclip``) rather than, say, a cascade."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(values, dict) and set(values) == {"unclip"}


def load_unclip_file(path: str | Path) -> UnclipPipelineConfig:
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DifflabError(f"{path}: not a readable unCLIP YAML file ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict) or set(values) != {"unclip"}:
        raise DifflabError(f"{path}: an unCLIP file holds one section, 'unclip' (with prior and decoder)")
    config = from_dict(UnclipPipelineConfig, values["unclip"] or {}, "unclip.")
    if not config.prior or not config.decoder:
        raise DifflabError(f"{path}: unclip.prior and unclip.decoder must name the two runs")
    if config.prior_candidates < 1:
        raise DifflabError(f"{path}: unclip.prior_candidates {config.prior_candidates} must be at least 1")
    return config


# -- the stages -----------------------------------------------------------------------------------------------
@dataclass
class UnclipStage:
    model: LoadedModel
    clip: ClipSpace                             # the frozen CLIP stored with it


def load_stage(path: str | Path, stage: str, weights: str = "ema", device: str = "cpu") -> UnclipStage:
    """An unCLIP ``stage`` (prior | decoder) and its CLIP, from its run folder or checkpoint."""
    model = load_model(path, weights, device)
    field = TEXT_EMBED_FIELD if stage == "prior" else IMAGE_EMBED_FIELD
    if field not in model.denoiser.conditions:
        raise DifflabError(f"{model.path} is not an unCLIP {stage} (trained with unclip.stage: {stage})")
    clip = ClipSpace.from_checkpoint(load_checkpoint(model.path))
    clip.clip.to(device)
    return UnclipStage(model, clip)


@dataclass
class UnclipPipeline:
    prior: UnclipStage
    decoder: UnclipStage
    config: UnclipPipelineConfig


def load_pipeline(config: UnclipPipelineConfig, weights: str = "ema", device: str = "cpu") -> UnclipPipeline:
    prior, decoder = load_stage(config.prior, "prior", weights, device), load_stage(config.decoder, "decoder",
                                                                                      weights, device)
    if prior.clip.digest != decoder.clip.digest:
        raise DifflabError(f"unCLIP: the prior {prior.model.path} and the decoder {decoder.model.path} were trained "
                           f"on different CLIPs ({prior.clip.source} and {decoder.clip.source}); their embeddings do "
                           f"not match")
    return UnclipPipeline(prior, decoder, config)


def stage_options(stage: UnclipStage, guidance: float | None, overrides: dict | None, seed: int) -> SampleConfig:
    """The stage's preset sampler, with the pipeline's guidance weight, then ``overrides``, at ``seed``."""
    options = stage.model.config.sample
    if guidance is not None:
        options = dataclasses.replace(options, guidance=guidance)
    return dataclasses.replace(options, **(overrides or {}), seed=seed)


# -- the prior ------------------------------------------------------------------------------------------------
def choose_candidates(candidates: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Ramesh et al. 2022, Sec. 2.2: of K samples of z_i per caption (K, n, d), the one with the highest dot
    product z_i . z_t (ties: the first), (n, d)."""
    scores = (candidates * text_embed.to(candidates)).sum(-1)                     # (K, n)
    best = scores.argmax(0)                                                       # (n,)
    return candidates[best, torch.arange(candidates.shape[1])]


def sample_prior(prior: UnclipStage, text_embed: torch.Tensor, options: SampleConfig, candidates: int = 2,
                 device: str = "cpu") -> torch.Tensor:
    """z_i (n, d) for the text embeddings (n, d) (sqrt(d) scale): ``candidates`` prior samples each, candidate k
    seeded by ``options.seed + (k + 1) * STAGE_SEED_STRIDE``, the best by ``choose_candidates``."""
    n, cond = text_embed.shape[0], Cond({TEXT_EMBED_FIELD: text_embed})
    draws = [sample(prior.model, n, dataclasses.replace(options, seed=options.seed + (k + 1) * STAGE_SEED_STRIDE),
                    cond, device) for k in range(candidates)]
    return choose_candidates(torch.stack(draws).to(text_embed.device), text_embed)


# -- the decoder ----------------------------------------------------------------------------------------------
def decoder_condition(decoder: UnclipStage, image_embed: torch.Tensor, prompts: list[str] | None = None) -> Cond:
    """The decoder's record: z_i, and the captions' tokens for a decoder that reads them (no prompts: none, the
    empty caption)."""
    cond = Cond({IMAGE_EMBED_FIELD: image_embed})
    if prompts is not None and CAPTION_FIELD in decoder.model.denoiser.conditions:
        cond = cond.replace(**{CAPTION_FIELD: decoder.model.denoiser.net.tokenize(list(prompts))})
    return cond


@dataclass
class UnclipSamples:
    images: torch.Tensor                        # (n, C, H, W) in [-1, 1]
    image_embed: torch.Tensor                   # the chosen prior samples, (n, d)
    text_embed: torch.Tensor                    # the prompts' z_t, (n, d)


def sample_unclip(pipeline: UnclipPipeline, prompts: list[str], overrides: dict | None = None, seed: int = 0,
                  device: str = "cpu") -> UnclipSamples:
    """One image per prompt: z_t -> prior (guided; best of ``prior_candidates``) -> decoder (guided)."""
    c = pipeline.config
    text_embed = pipeline.prior.clip.text_embeddings(prompts)                            # (n, d)
    prior_options = stage_options(pipeline.prior, c.prior_guidance, overrides, seed)
    image_embed = sample_prior(pipeline.prior, text_embed, prior_options, c.prior_candidates, device)
    decoder_options = stage_options(pipeline.decoder, c.decoder_guidance, overrides, seed)
    images = sample(pipeline.decoder.model, len(prompts), decoder_options,
                    decoder_condition(pipeline.decoder, image_embed, prompts), device)
    return UnclipSamples(images, image_embed, text_embed)


def variations(decoder: UnclipStage, image: torch.Tensor, n: int, options: SampleConfig,
               prompts: list[str] | None = None, device: str = "cpu") -> torch.Tensor:
    """Ramesh et al. 2022, Sec. 3.1: ``n`` decoder samples of one image's (1, C, H, W in [-1, 1]) CLIP
    embedding (at t = 0), seeded ``options.seed + i``."""
    if tuple(image.shape[1:]) != decoder.clip.image_shape or image.shape[0] != 1:
        raise DifflabError(f"variations: expected one image of shape {decoder.clip.image_shape}, got "
                           f"{tuple(image.shape)}")
    image_embed = decoder.clip.image_embeddings(image).expand(n, -1).contiguous()         # (n, d)
    return sample(decoder.model, n, options, decoder_condition(decoder, image_embed, prompts), device)


# -- previews while training --------------------------------------------------------------------------------
def preview_examples(config, n: int):
    """The first ``n`` test-split examples as the stage's data (embedded by the training CLIP), and that CLIP."""
    from difflab.build import build_unclip_data

    data, space = build_unclip_data(config, "test")
    return data, space, torch.arange(min(n, len(data)))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float().to(a.device), dim=-1).mean().item()


def prior_preview(config, spec, device: str = "cpu"):
    """For the trainer: ``preview(ema_denoiser, name)`` samples z_i for the first ``train.num_sample_images``
    test captions (one candidate, the preset's sampler) and returns the mean cosine similarity to the captions'
    own images' z_i (``prior_cosine``) and to z_t (``prior_text_cosine``), logged with the step."""
    data, _, rows = preview_examples(config, config.train.num_sample_images)
    x, cond = data.batch(rows)

    def preview(denoiser, name: str) -> dict:
        z_i = sample(denoiser, len(rows), config.sample, cond, device, spec=spec)
        return {"prior_cosine": cosine(z_i, x), "prior_text_cosine": cosine(z_i, cond[TEXT_EMBED_FIELD])}
    return preview


def decoder_preview(config, spec, device: str = "cpu"):
    """For the trainer: ``preview(ema_denoiser, name)`` decodes the first ``train.num_sample_images`` test images'
    z_i, writes (original | decoded) pairs to ``out_dir/samples/NAME.png`` and returns the mean cosine similarity
    between the decoded images' CLIP embeddings and the originals' (``decoder_clip_cosine``)."""
    from difflab.data import to_uint8_images
    from difflab.imageio import save_grid

    data, space, rows = preview_examples(config, config.train.num_sample_images)
    images, cond = data.batch(rows)
    cond = Cond({IMAGE_EMBED_FIELD: cond[IMAGE_EMBED_FIELD]})             # z_i alone: the empty caption

    def preview(denoiser, name: str) -> dict:
        samples = sample(denoiser, len(rows), config.sample, cond, device, spec=spec)
        pairs = torch.stack([images, samples.cpu()], dim=1).flatten(0, 1)
        save_grid(to_uint8_images(pairs), Path(config.train.out_dir) / "samples" / f"{name}.png", columns=16)
        return {"decoder_clip_cosine": cosine(space.image_embeddings(samples), cond[IMAGE_EMBED_FIELD])}
    return preview
