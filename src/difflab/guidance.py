"""Guidance and thresholding as wrappers of the denoiser D(x; sigma, cond), so every sampler can use them and
nothing converts back to a network's own output type.

- Classifier-free guidance (Ho & Salimans 2021, Eq. 6), written on D: D~ = D_u + (1 + w)(D_c - D_u), with D_u
  the denoiser at the null value of the chosen condition fields (by default every field the model knows; a
  subset keeps the others, e.g. drop the caption but keep the control image). D is affine in the network's
  output at fixed (x, sigma), c_skip x + c_out F, so this is exactly eps~ = (1 + w) eps_c - w eps_u for eps
  networks and the same combination of x0 or v outputs for the others. Other libraries' guidance scale is
  ``guidance_scale = 1 + w`` (diffusers, Imagen): w = 0 is the plain conditional model.
- Thresholding of D (Saharia et al. 2022, "Imagen", Sec. 2.3): static clips to the data range [-1, 1];
  dynamic takes s = the p-th percentile of |D| per sample, s = max(s, 1), and maps D to clip(D, -s, s) / s.

A learned variance (Nichol & Dhariwal 2021) is not guided: the conditional one is passed on, as GLIDE does
(Nichol et al. 2022, Sec. 3). Wrappers compose: ``Thresholded(ClassifierFreeGuidance(D, 3.0), ...)``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from difflab.conditioning import Cond, with_null
from difflab.denoiser import DenoiserOutput, as_sigma


class DenoiserWrapper(nn.Module):
    """A denoiser computed from another one: the same interface, preconditioning and conditions."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def precond(self):
        return self.inner.precond

    @property
    def conditions(self):
        return self.inner.conditions

    @property
    def learned_variance(self) -> bool:
        return self.inner.learned_variance

    def output(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond | None = None) -> DenoiserOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        return self.output(x, sigma, cond).x0


class ClassifierFreeGuidance(DenoiserWrapper):
    """D_u + (1 + w)(D_c - D_u), both in one batched evaluation; ``drop`` names the fields set to null in D_u
    (default: every guided one, i.e. all but a ControlNet's control image)."""

    def __init__(self, inner: nn.Module, w: float, drop: Iterable[str] | None = None):
        super().__init__(inner)
        self.w = w
        self.drop = (tuple(name for name, c in self.conditions.items() if c.guided) if drop is None
                     else tuple(drop))

    def output(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond | None = None) -> DenoiserOutput:
        if cond is None or self.w == 0:
            return self.inner.output(x, sigma, cond)
        sigma = as_sigma(sigma, x.shape[0])
        unconditional = with_null(cond, self.conditions, self.drop)
        both = self.inner.output(torch.cat([x, x]), torch.cat([sigma, sigma]), Cond.cat([cond, unconditional]))
        d_c, d_u = both.x0.chunk(2)                                                    # (B, ...) each
        variance = both.variance.chunk(2)[0] if both.variance is not None else None
        return DenoiserOutput(d_u + (1 + self.w) * (d_c - d_u), variance)


class ControlScaled(DenoiserWrapper):
    """A ControlNet's D with its control residuals times ``scale`` (``cond["control_scale"]``, per row; the
    "conditioning scale" of Zhang et al. 2023): 0 is the base model, 1 the model as trained."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__(inner)
        self.scale = float(scale)

    def output(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond | None = None) -> DenoiserOutput:
        scale = torch.full((x.shape[0],), self.scale, device=x.device)
        return self.inner.output(x, sigma, (cond if cond is not None else Cond()).replace(control_scale=scale))


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    return x0.clamp(-1, 1)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Saharia et al. 2022, Sec. 2.3: per sample, s = max(1, quantile(|x0|, p)); x0 -> clip(x0, -s, s) / s."""
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class Thresholded(DenoiserWrapper):
    """D with ``threshold`` (``static_threshold``, ``dynamic_threshold``, ...) applied to its output."""

    def __init__(self, inner: nn.Module, threshold: Callable[[torch.Tensor], torch.Tensor] = static_threshold):
        super().__init__(inner)
        self.threshold = threshold

    def output(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond | None = None) -> DenoiserOutput:
        out = self.inner.output(x, sigma, cond)
        return DenoiserOutput(self.threshold(out.x0), out.variance)
