"""A noise-aware CLIP: image and caption embeddings in one space, for noisy images x_t too (GLIDE, Nichol et al.
2022, Sec. 2.4: "we train CLIP models on noised images ... noised CLIP models"; CLIP: Radford et al. 2021).

- Image tower f(x_t, t): the noise-aware classifier's network (``NoisyClassifier``: the U-Net's encoder, then
  GroupNorm-SiLU and an attention pool) with ``embed_dim`` outputs instead of class logits. CLIP's ResNets end
  in the same attention pool projecting to the embedding (Radford et al. 2021, Sec. 2.4), so the classifier's
  head is exactly CLIP's; only its width differs.
- Text tower g(c): a text encoder of ``difflab.nets.text_encoder`` (GLIDE's byte-level transformer, trained
  with the image tower, or the frozen MiniLM), its pooled output (the end token's, CLIP's [EOS]) through a
  linear projection without bias (CLIP's ``text_projection``).
- Both embeddings are L2-normalised; the logits are their cosine similarities times exp(``logit_scale``), a
  learned temperature initialised at 1 / 0.07 and clipped at 100 (Radford et al. 2021, Sec. 2.5 and Fig. 3).

The network knows nothing of diffusion: ``t`` is whatever the diffusion model is called with (integer or real
timesteps of its schedule); training noises x (``train.objectives.NoisyCLIPObjective``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from difflab.nets.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from difflab.nets.text_encoder import text_encoder_from_json


def default_text_encoder() -> dict:
    return {"kind": "glide", "width": 64, "layers": 2, "heads": 4, "max_length": 48}


@dataclass
class NoisyCLIPConfig:
    # the image tower: the fields of NoisyClassifierConfig
    in_channels: int = 1
    image_size: int = 28
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    dropout: float = 0.0
    groups: int = 32
    embed_dim: int = 64                    # the joint embedding's width
    # the text tower: a text_encoder_from_json description, {"kind": "glide" | "minilm", options...}
    text_encoder: dict = field(default_factory=default_text_encoder)
    init_logit_scale: float = math.log(1 / 0.07)     # Radford et al. 2021, Sec. 2.5: temperature 0.07
    max_logit_scale: float = 100.0                   # exp(logit_scale) is clipped here ("to prevent ... more than 100")

    def image_config(self) -> NoisyClassifierConfig:
        """The noise-aware classifier it is built on, with ``embed_dim`` outputs."""
        return NoisyClassifierConfig(in_channels=self.in_channels, image_size=self.image_size,
                                     model_channels=self.model_channels, channel_mult=tuple(self.channel_mult),
                                     num_res_blocks=self.num_res_blocks,
                                     attention_resolutions=tuple(self.attention_resolutions),
                                     num_heads=self.num_heads, dropout=self.dropout, groups=self.groups,
                                     num_classes=self.embed_dim)


class NoisyCLIP(nn.Module):
    """``encode_image(x_t, t) -> (B, embed_dim)`` and ``encode_text(tokens) -> (B, embed_dim)``, unit norm;
    ``forward(x_t, t, tokens) -> (B, B)`` logits of every image against every caption."""

    def __init__(self, config: NoisyCLIPConfig):
        super().__init__()
        self.config = config
        self.image_encoder = NoisyClassifier(config.image_config())
        self.text_encoder = text_encoder_from_json(dict(config.text_encoder), "clip.text_encoder.")
        self.text_projection = nn.Linear(self.text_encoder.pooled_width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids (N, max_length) in the text tower's tokenizer."""
        return self.text_encoder.tokenize(list(captions))

    def encode_image(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return F.normalize(self.image_encoder(x, t), dim=-1)                        # (B, embed_dim)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        _, _, pooled = self.text_encoder(tokens)                                      # (B, pooled_width)
        return F.normalize(self.text_projection(pooled), dim=-1)                     # (B, embed_dim)

    def logit_multiplier(self) -> torch.Tensor:
        """exp(logit_scale), clipped at ``max_logit_scale`` (no gradient beyond the clip)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, tokens: torch.Tensor) -> torch.Tensor:
        image, text = self.encode_image(x, t), self.encode_text(tokens)              # (B, d), (B', d)
        return self.logit_multiplier() * image @ text.T                              # (B, B')
