"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 4) as a correction of D.

A noise-aware classifier p_phi(y | x_t, t) (``difflab.nets.NoisyClassifier``) steers a diffusion model towards
class y through the score of p(x_sigma) p(y | x_sigma)^s (their Eq. 14 and Alg. 2). With Tweedie's formula,
score = (D - x) / sigma^2 in VE coordinates (Karras et al. 2022, Eq. 3), adding s grad log p(y | x) to the
score is the correction

    D^ = D + sigma^2 s grad_x log p(y | x; sigma),

which is Eq. 14's eps^ = eps - sqrt(1 - alpha-bar) s grad_{x_t} log p(y | x_t) written for D (x = x_t /
sqrt(alpha-bar), so grad_x = sqrt(alpha-bar) grad_{x_t} and sigma^2 sqrt(alpha-bar) = sqrt(1 - alpha-bar) sigma).
Every sampler, the ancestral chain included, then samples the guided model (for the ancestral chain this
replaces Alg. 1's mean shift Sigma s g by beta_t / sqrt(alpha_t) s g, equal to first order in beta_t).
With s = 1 and exact models this is the conditional model (Bayes). ``s`` is the paper's "classifier scale".

The classifier sees its own inputs: x_t = c_in x and t = c_noise of the preconditioning it was trained with
(``classifier_precond``), so it can guide any model whose sigma means the same noise level.

The correction is written once, in ``GradientGuidance``, for any guide that supplies grad_{x_t} of a
log-density at its own inputs: ``ClassifierGuidance`` here (log p(y | x_t)), ``clip_guidance.ClipGuidance``
(GLIDE's noised-CLIP similarity f(x_t) . g(c)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.conditioning import Cond
from difflab.denoiser import DenoiserOutput, Precond, as_sigma, per_example
from difflab.guidance import DenoiserWrapper


def input_gradient(fn, x: torch.Tensor) -> torch.Tensor:
    """grad_x of sum(fn(x)) for ``fn(x) -> (B,)`` values (one per row, each depending on its row only), detached,
    in x's dtype. Computed with autograd enabled even inside ``torch.no_grad()`` (the samplers run under it);
    only x is differentiated, so the guide's parameters receive no gradient."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(x_in).sum(), x_in)
    return grad.detach().to(x.dtype)


def log_prob_grad(classifier: nn.Module, x: torch.Tensor, t: torch.Tensor | float,
                  y: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x, t) for ``classifier(x, t) -> logits (B, classes)`` (``input_gradient``). ``t`` is
    passed on as a (B,) tensor."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    labels = y.to(x.device).long().reshape(-1, 1)

    def log_prob(x_in: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(classifier(x_in, t), dim=-1).gather(1, labels)[:, 0]     # (B,)
    return input_gradient(log_prob, x)


class GradientGuidance(DenoiserWrapper):
    """D + sigma^2 * scale * grad_x log f(x; sigma) (see the module docstring) for a guide that gives
    ``guide_grad(x_t, t, cond)`` = grad_{x_t} log f at its own inputs x_t = c_in x, t = c_noise of ``guide_precond``
    (then grad_x = c_in grad_{x_t}). Rows whose record has no ``field``, a scale of 0 or no record at all are
    not guided: the inner denoiser's output is returned as it is."""

    def __init__(self, inner: nn.Module, guide_precond: Precond, scale: float, field: str):
        super().__init__(inner)
        self.guide_precond, self.scale, self.field = guide_precond, scale, field

    def guide_grad(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def output(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: Cond | None = None) -> DenoiserOutput:
        out = self.inner.output(x, sigma, cond)
        if cond is None or self.field not in cond or self.scale == 0:
            return out
        sigma = as_sigma(sigma, x.shape[0])
        _, _, c_in, c_noise = self.guide_precond.scalings(sigma)
        c_in = per_example(c_in, x)
        grad = c_in * self.guide_grad(x * c_in, c_noise.to(x.device), cond)                       # grad_x
        return DenoiserOutput(out.x0 + per_example(sigma ** 2, x) * self.scale * grad, out.variance)


class ClassifierGuidance(GradientGuidance):
    """D + sigma^2 * scale * grad_x log p(label | x; sigma), the label read from the record's ``label`` field."""

    def __init__(self, inner: nn.Module, classifier: nn.Module, classifier_precond: Precond, scale: float,
                 label: str = "label"):
        super().__init__(inner, classifier_precond, scale, label)
        self.classifier = classifier

    @property
    def classifier_precond(self) -> Precond:
        return self.guide_precond

    def guide_grad(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return log_prob_grad(self.classifier, x_t, t, cond[self.field])
