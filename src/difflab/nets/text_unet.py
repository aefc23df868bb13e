"""A text-conditioned U-Net: a text encoder and a U-Net that reads the caption two ways.

GLIDE (Nichol et al. 2022, Sec. 2.3 and 4): a transformer, trained with the diffusion model, encodes the
caption; its final token's embedding is projected and added to the time embedding, and all its tokens are
projected into the keys and values of every attention layer. Imagen (Saharia et al. 2022, Sec. 2.1 and App.
B.2) does the same with a frozen pretrained language model, its pooled embedding in the time embedding and
its token embeddings attended to (cross-attention). Here the U-Net's ``cross_attention`` (LDM's
SpatialTransformer at the attention resolutions, padding masked) reads the tokens and its ``pooled_dim``
projection the pooled vector; ``text_encoder`` chooses the encoder (``difflab.nets.text_encoder``): ``glide``,
trained jointly, or ``minilm``, frozen (its weights come from its package and are not in the checkpoint).

The caption arrives in the condition record as token ids, ``cond["caption"]`` (B, max_length); no caption
means the empty one, the null condition of classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from difflab.conditioning import CAPTION_FIELD
from difflab.nets.text_encoder import text_encoder_from_json
from difflab.nets.unet import UNet, UNetConfig
from difflab.typed import from_dict


@dataclass
class TextUNetConfig:
    text_encoder: dict = field(default_factory=lambda: {"kind": "glide"})   # ``difflab.nets.text_encoder``
    unet: dict = field(default_factory=dict)                                # ``UNetConfig`` options


class TextUNet(nn.Module):
    consumes = (CAPTION_FIELD,)

    def __init__(self, config: TextUNetConfig):
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder_from_json(dict(config.text_encoder))
        self.unet = UNet(from_dict(UNetConfig, dict(config.unet), "model.text_unet.unet."))
        self.register_buffer("null_tokens", self.tokenize([""]), persistent=False)    # (1, max_length)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids (N, max_length) of ``captions`` in the encoder's tokenizer (what ``cond["caption"]`` holds)."""
        return self.text_encoder.tokenize(list(captions))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        tokens = cond.get(CAPTION_FIELD) if cond is not None else None
        if tokens is None:
            tokens = self.null_tokens.expand(x.shape[0], -1)
        context, mask, pooled = self.text_encoder(tokens.to(x.device))     # (B, L, width), (B, L), (B, pooled)
        return self.unet(x, t, {"context": context, "context_mask": mask, "pooled": pooled})
