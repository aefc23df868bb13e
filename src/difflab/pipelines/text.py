"""Text-to-image sampling: prompts as the condition record, and the trainer's preview grids of held-out captions.

    loaded = load_model("runs/fmnist_text_glide")
    cond = prompt_condition(loaded.denoiser, ["a dark ankle boot"] * 16)
    images = sample(loaded, 16, options, cond)          # guidance: options.guidance, the empty caption as null
"""

from __future__ import annotations

from pathlib import Path

from difflab.conditioning import CAPTION_FIELD, Cond
from difflab.config import Config
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.files import write_text
from difflab.model import ModelSpec


def is_text_model(spec: ModelSpec) -> bool:
    return CAPTION_FIELD in spec.condition_fields()


def prompt_condition(denoiser: Denoiser, prompts: list[str]) -> Cond:
    """The record for one prompt per sample, in the model's own tokenizer."""
    tokenize = getattr(denoiser.net, "tokenize", None)
    if tokenize is None or CAPTION_FIELD not in denoiser.conditions:
        raise DifflabError("--prompt: this model is not a text-to-image model (model.kind text_unet)")
    return Cond({CAPTION_FIELD: tokenize(list(prompts))})


def text_preview(config: Config, spec: ModelSpec, device: str = "cpu"):
    """For the trainer: ``preview(ema_denoiser, name)`` draws one sample for each of the first
    ``train.num_sample_images`` test-split captions (captions the model never trained on) and writes the grid
    with the captions beside it (``samples/NAME.txt``, row by row)."""
    from difflab.build import build_data
    from difflab.pipelines.ddpm import sample, save_samples

    prompts = list(build_data(config.data, "test").captions[:config.train.num_sample_images])

    def preview(denoiser: Denoiser, name: str) -> None:
        samples = sample(denoiser, len(prompts), config.sample, prompt_condition(denoiser, prompts), device, spec=spec)
        out = Path(config.train.out_dir) / "samples"
        save_samples(samples, out, name)
        write_text(out / f"{name}.txt", "\n".join(prompts) + "\n")
    return preview


def repeat_prompts(prompts: list[str], n: int) -> list[str]:
    """``n`` prompts: each of ``prompts`` in turn (a grid with one prompt per column when n is a multiple)."""
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise DifflabError("--prompt: give at least one caption")
    return [prompts[i % len(prompts)] for i in range(n)]
