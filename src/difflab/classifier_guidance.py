"""Classifier guidance (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 4).

A noise-aware classifier p_phi(y | x_t, t) (``difflab.nets.NoisyClassifier``) steers an (unconditional or
conditional) diffusion model towards class y by the gradient g = grad_{x_t} log p_phi(y | x_t, t):

- Algorithm 1 (ancestral sampling): the reverse step's mean moves by its variance times the scaled
  gradient, mu <- mu + s Sigma g. ``AncestralMeanShift`` computes s g; the sampler adds sigma_t^2 times it
  (``sample_ancestral(..., classifier_grad=AncestralMeanShift(classifier, s))``).
- Algorithm 2 / Eq. 14 (DDIM and every other sampler): the noise prediction is corrected,
  eps^ = eps - sqrt(1 - alpha-bar_t) s g, i.e. the score of p(x_t) p(y | x_t)^s. ``ClassifierGuidance``
  wraps a network ``net(x, t, y)`` and does this, so every sampler (and ``ThresholdedNet``,
  ``ClassifierFreeGuidance``) can use it. With s = 1 and exact models this is the conditional model:
  grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t) (Bayes).

``s`` is the paper's "classifier scale" (1 to 10 in its experiments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab import diffusion
from difflab.denoiser import PREDICTIONS, split_output, t_to_sigma, to_prediction
from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule


def log_prob_grad(classifier: nn.Module, x: torch.Tensor, t: torch.Tensor | float,
                  y: torch.Tensor) -> torch.Tensor:
    """grad_x log p(y | x, t) for ``classifier(x, t) -> logits (B, classes)``, detached, in x's dtype.

    Computed with autograd enabled even inside ``torch.no_grad()`` (the samplers run under it); the
    classifier's own parameters receive no gradient. ``t`` is passed on as a (B,) tensor."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t), dim=-1)                   # (B, classes)
        selected = log_probs.gather(1, y.to(x.device).long().reshape(-1, 1))    # (B, 1)
        (grad,) = torch.autograd.grad(selected.sum(), x_in)
    return grad.detach().to(x.dtype)


class AncestralMeanShift:
    """``shift(x_t, t, y) = scale * grad log p(y | x_t, t)``, for ancestral samplers (Alg. 1).

    Contract: at the step from x_t, with the model's posterior mean mu and reverse variance sigma_t^2 (beta_t
    or beta-tilde_t of the schedule being sampled, respaced or not), the sampler uses
    ``mu + sigma_t^2 * shift(x_t, t, y)`` in place of mu, before adding sigma_t z. ``t`` is the timestep the
    denoiser is called with (``schedule.timesteps[i]``, on the training schedule) and x_t the current
    sample (not mu). With sigma_t^2 = beta-tilde the last step (sigma_0^2 = 0) is unchanged.
    """

    def __init__(self, classifier: nn.Module, scale: float):
        self.classifier, self.scale = classifier, scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:
            return torch.zeros_like(x)
        return self.scale * log_prob_grad(self.classifier, x, t, y)


class ClassifierGuidance(nn.Module):
    """``net(x, t, y)`` with its noise prediction guided by ``classifier`` (Alg. 2 / Eq. 14):
    eps^ = eps - sqrt(1 - alpha-bar_t) * scale * grad log p(y | x_t, t), returned in the network's own
    parameterisation ``prediction`` (eps, x0 or v). Works at integer and real timesteps: alpha-bar comes
    from the schedule's sigma at ``t``, as in ``ThresholdedNet``.

    A network with twice the image's channels (a learned variance: mean parameterisation, then variance
    interpolation) has only its first half guided; the rest is passed through. With ``y`` None (or scale
    0) the network's plain output is returned. ``conditional_net`` says whether ``net`` takes the label
    too (a class-conditional or classifier-free-guided model); the classifier always gets the label.
    """

    def __init__(self, net: nn.Module, classifier: nn.Module, schedule: NoiseSchedule, prediction: str,
                 scale: float, *, conditional_net: bool):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise DifflabError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
        self.net, self.classifier, self.prediction = net, classifier, prediction
        self.scale, self.conditional_net = scale, conditional_net
        self.log_sigmas = schedule.sigmas.log()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        output = self.net(x, t, y) if self.conditional_net and y is not None else self.net(x, t)
        if y is None or self.scale == 0:
            return output
        channels = x.shape[1]
        if output.shape[1] not in (channels, 2 * channels):
            raise DifflabError(f"network output has {output.shape[1]} channels; expected {channels} or "
                               f"{2 * channels} (learned variance) for {channels}-channel inputs")
        mean_part, variance = split_output(output, learned_variance=output.shape[1] == 2 * channels)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        sigma = t_to_sigma(self.log_sigmas, t)
        abar = (1 / (1 + sigma ** 2)).reshape(-1, *([1] * (x.ndim - 1))).to(x)  # (B, 1, ...)
        eps = to_prediction(self.prediction, x, abar, mean_part.to(x.dtype)).eps
        eps = eps - (1 - abar).sqrt() * self.scale * log_prob_grad(self.classifier, x, t, y)
        guided = self.from_eps(x, abar, eps).to(output.dtype)
        return guided if variance is None else torch.cat([guided, variance], dim=1)

    def from_eps(self, x: torch.Tensor, abar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The guided eps in the network's parameterisation."""
        if self.prediction == "eps":
            return eps
        x0 = diffusion.x0_from_eps(x, abar, eps)
        return x0 if self.prediction == "x0" else diffusion.v_from_eps(x0, abar, eps)
