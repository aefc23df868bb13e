"""Multi-head attention over token sequences, and the transformer block built from it (used by the DiT and by
the cross-attention U-Net's ``SpatialTransformer``).

- ``MultiHeadAttention``: softmax(Q K^T / sqrt(d)) V in each of ``num_heads`` heads (Vaswani et al. 2017,
  Eq. 1 and Sec. 3.2.2). Self-attention when no context is given; otherwise cross-attention, Rombach et al.
  2022 ("LDM"), Sec. 3.3, Eq. 3: Q = W_Q phi(z) from the image tokens, K = W_K tau(y) and V = W_V tau(y) from
  the condition tokens (B, L, context_dim). A padding mask (B, L), True for a real token, removes padded
  tokens exactly: their logits are -inf, their softmax weights exactly 0. A row whose tokens are all padding
  has nothing to attend to; its output is defined as zero (no update through a residual), not NaN.
- ``FeedForward``: Linear-GELU-Linear (Hendrycks & Gimpel 2016, the tanh approximation as in DiT).
- ``TransformerBlock``: LDM's ``BasicTransformerBlock``, pre-LayerNorm and residual around each of
  self-attention, cross-attention and feed-forward; without a ``context_dim``, a ViT block (Dosovitskiy et al.
  2021), self-attention and feed-forward only. LDM's default feed-forward is gated (GEGLU); this one is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) queries and (B, heads, L, d) keys and values; ``mask``
    (B, L) True for the keys that take part. A row with no key taking part gets zero output."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    has_keys = mask.any(dim=1)                                          # (B,)
    # an all-padding row attends to every key (finite softmax, no NaN in forward or backward), then is zeroed
    attend = (mask | ~has_keys[:, None])[:, None, None, :]              # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    return out.masked_fill(~has_keys[:, None, None, None], 0.0)


class MultiHeadAttention(nn.Module):
    """Self-attention over x (B, N, dim), or cross-attention from x to ``context`` (B, L, context_dim)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.to_q(x).reshape(b, n, self.num_heads, head_dim).transpose(1, 2)          # (B, heads, N, d)
        kv = self.to_kv(context).reshape(b, context.shape[1], 2, self.num_heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                                      # (B, heads, L, d) each
        out = masked_attention(q, k, v, mask).transpose(1, 2).reshape(b, n, dim)
        out = self.to_out(out)
        if mask is not None:                     # nothing to attend to: the layer's whole output is zero
            out = out.masked_fill(~mask.any(dim=1)[:, None, None], 0.0)
        return out


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class TransformerBlock(nn.Module):
    """x + SelfAttn(LN x), then + CrossAttn(LN x, context) when built with a ``context_dim`` and given a
    context, then + FF(LN x). With no context the cross-attention has nothing to attend to and adds zero,
    as an all-padding context would."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, num_heads)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.cross_attn = MultiHeadAttention(dim, num_heads, context_dim)
        else:
            self.norm2 = self.cross_attn = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))                                           # (B, N, dim)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))
