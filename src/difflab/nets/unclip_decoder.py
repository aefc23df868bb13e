"""unCLIP's decoder network (Ramesh et al. 2022, Sec. 2.1): a U-Net of images conditioned on a CLIP image
embedding z_i, ``cond["image_embed"]`` (B, embed_dim), the two ways the paper names: "projecting and adding
CLIP embeddings to the existing timestep embedding, and by projecting CLIP embeddings into four extra tokens of
context that are concatenated to the sequence of outputs from the GLIDE text encoder".

- z_i reaches the time embedding through the U-Net's ``pooled_dim`` projection (``difflab.nets.unet``);
- z_i is projected to ``extra_tokens`` tokens of the U-Net's cross-attention context (its SpatialTransformers
  at the attention resolutions and in the middle block);
- with a ``text_encoder`` (``difflab.nets.text_encoder``, as ``text_unet``) the caption ``cond["caption"]`` is
  read too: its tokens come before z_i's in the context (padding masked) and its pooled vector is
  concatenated to z_i before the time-embedding projection. No caption means the empty one.

No z_i means the null embedding, zeros. The network knows nothing of diffusion or of CLIP: z_i is a vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from difflab.conditioning import CAPTION_FIELD, IMAGE_EMBED_FIELD
from difflab.nets.text_encoder import text_encoder_from_json
from difflab.nets.unet import UNet, UNetConfig
from difflab.typed import from_dict


@dataclass
class UnclipDecoderConfig:
    embed_dim: int = 64                 # z_i's width (set from the CLIP)
    extra_tokens: int = 4               # context tokens projected from z_i (the paper: four)
    text_encoder: dict | None = None    # None: z_i alone; else a text_encoder_from_json description (the caption)
    unet: dict | None = None            # ``UNetConfig`` options (fitted: cross_attention, context_dim, pooled_dim)


class UnclipDecoder(nn.Module):
    def __init__(self, config: UnclipDecoderConfig):
        super().__init__()
        self.config = c = config
        self.unet = UNet(from_dict(UNetConfig, dict(c.unet or {}), "model.unclip_decoder.unet."))
        self.text_encoder = text_encoder_from_json(dict(c.text_encoder)) if c.text_encoder is not None else None
        self.context_dim = self.unet.context_dim
        self.to_tokens = nn.Linear(c.embed_dim, c.extra_tokens * self.context_dim)
        if self.text_encoder is not None:
            self.register_buffer("null_tokens", self.tokenize([""]), persistent=False)   # (1, max_length)

    @property
    def consumes(self) -> tuple[str, ...]:
        return (IMAGE_EMBED_FIELD,) + ((CAPTION_FIELD,) if self.text_encoder is not None else ())

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Caption token ids (N, max_length) in the text encoder's tokenizer (a decoder with a text encoder)."""
        if self.text_encoder is None:
            raise ValueError("this unCLIP decoder reads no caption (model.unclip_decoder.text_encoder is null)")
        return self.text_encoder.tokenize(list(captions))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        b = x.shape[0]
        z_i = cond.get(IMAGE_EMBED_FIELD) if cond is not None else None
        z_i = torch.zeros(b, self.config.embed_dim, device=x.device) if z_i is None else z_i.to(x.device)
        context = self.to_tokens(z_i).reshape(b, self.config.extra_tokens, self.context_dim)   # (B, K, context)
        mask, pooled = None, z_i
        if self.text_encoder is not None:
            tokens = cond.get(CAPTION_FIELD) if cond is not None else None
            tokens = self.null_tokens.expand(b, -1) if tokens is None else tokens
            text, text_mask, text_pooled = self.text_encoder(tokens.to(x.device))    # (B, L, w), (B, L), (B, p)
            context = torch.cat([text, context.to(text.dtype)], dim=1)               # (B, L + K, w)
            mask = torch.cat([text_mask.bool(), torch.ones(b, self.config.extra_tokens, dtype=torch.bool,
                                                           device=x.device)], dim=1)
            pooled = torch.cat([z_i, text_pooled.to(z_i.dtype)], dim=1)              # (B, embed_dim + p)
        return self.unet(x, t, {"context": context, "context_mask": mask, "pooled": pooled})
