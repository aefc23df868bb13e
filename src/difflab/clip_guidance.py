"""CLIP guidance (GLIDE, Nichol et al. 2022, Sec. 2.4) as a correction of D.

A noise-aware CLIP (``difflab.nets.clip.NoisyCLIP``) with image embedding f(x_t, t) and caption embedding g(c)
steers a diffusion model towards caption c by adding s grad (f(x_t) . g(c)) to the score, as classifier
guidance adds s grad log p(y | x_t) (their Sec. 2.4: mu^ = mu + s Sigma grad (f(x_t) . g(c))). Written for D,
as in ``classifier_guidance`` (Tweedie: score = (D - x) / sigma^2):

    D^ = D + sigma^2 s grad_x [exp(logit_scale) cos(f(x_t, t), g(c))],

the guided quantity being the CLIP's logit, as GLIDE's released code has it (``glide_text2im/clip/
model_creation.py``, ``cond_fn``: ``exp(logit_scale) * (z_t * z_i).sum()`` of the L2-normalised embeddings).
The logit is the unnormalised log-probability of caption c against other captions (CLIP's softmax over a
batch), so ``s`` is on the scale of classifier guidance's, without the normaliser's gradient. The CLIP sees its
own inputs, x_t = c_in x and t = c_noise of the preconditioning it was trained with, as a classifier does
(``GradientGuidance``); a scale of 0 is the unguided denoiser exactly.

The caption reaches the CLIP in its own tokenizer, which need not be the diffusion model's: the record carries
it in the field ``clip_tokens`` (``with_clip_tokens``), beside the model's ``caption``. The model does not read
that field and classifier-free guidance does not null it (it is none of the model's conditions), so
``ClassifierFreeGuidance(ClipGuidance(D))`` adds the same correction to both passes: CFG's D~ plus the
correction once, at the cost of the CLIP's gradient on the doubled batch.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.classifier_guidance import GradientGuidance, input_gradient
from difflab.conditioning import Cond
from difflab.denoiser import Precond

CLIP_TOKENS_FIELD = "clip_tokens"      # the record's field for the caption in the CLIP's tokenizer


def with_clip_tokens(cond: Cond | None, clip: nn.Module, prompts: list[str]) -> Cond:
    """``cond`` (or an empty record) with one row of ``prompts`` per sample in ``clip``'s own tokens."""
    tokens = clip.tokenize(list(prompts))
    return (cond if cond is not None else Cond()).replace(**{CLIP_TOKENS_FIELD: tokens})


def clip_logit_grad(clip: nn.Module, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """grad_{x_t} of exp(logit_scale) f(x_t, t) . g(tokens), row by row (``input_gradient``); the caption
    embeddings are computed once, without a graph."""
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
    with torch.no_grad():
        text = clip.encode_text(tokens.to(x_t.device)) * clip.logit_multiplier()      # (B, d)
    return input_gradient(lambda x_in: (clip.encode_image(x_in, t) * text).sum(dim=-1), x_t)


class ClipGuidance(GradientGuidance):
    """D + sigma^2 * scale * grad_x logit(x; sigma, caption) (see the module docstring), the caption read from
    the record's ``tokens`` field (default ``clip_tokens``)."""

    def __init__(self, inner: nn.Module, clip: nn.Module, clip_precond: Precond, scale: float,
                 tokens: str = CLIP_TOKENS_FIELD):
        super().__init__(inner, clip_precond, scale, tokens)
        self.clip = clip

    def guide_grad(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return clip_logit_grad(self.clip, x_t, t, cond[self.field])
