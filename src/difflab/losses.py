"""Diffusion training losses, each ``loss(denoiser, x0, noise, sigma, cond, t) -> (B,)``, one value per example.

The example is noised in VE coordinates, x = x0 + sigma * noise, and the network's output F = net(c_in x,
c_noise, cond) is compared with its target (x0 - c_skip x) / c_out (``Precond.target``; Karras et al. 2022,
Eq. 8). ``t`` is the integer timestep of sigma on a VP model's discrete schedule (None for other models).

- ``simple``: || target - F ||^2 averaged over dimensions. For a VP model F is eps, x0 or v and this is L_simple
  of Ho et al. 2020, Eq. 14 (Salimans & Ho 2022 for x0 and v); for EDM it is Karras et al.'s loss
  lambda(sigma) || D - x0 ||^2 with lambda = 1 / c_out^2 (Eq. 8 and Table 1), since D - x0 = c_out (F - target).
- ``vlb``: the variational bound's term L_{t-1} at the sampled t (``diffusion.vlb_term``), in bits/dim, times T so
  that E_t[loss] is L_vlb = sum_t L_t (Nichol & Dhariwal 2021, Sec. 3.1; with importance-sampled t, Sec. 3.3,
  the trainer weights each example by 1 / (T p_t)). VP models only.
- ``hybrid``: L_hybrid = L_simple + lambda L_vlb with lambda = 0.001 (Nichol & Dhariwal 2021, Eq. 16), where
  the L_vlb term sees the mean through a stop-gradient, so it trains only the variance (Sec. 3.1).
- ``sliced``: sliced score matching (Song, Garg, Shi & Ermon 2019, "Sliced Score Matching: A Scalable Approach
  to Density and Score Estimation") of the model's score s = (D - x) / sigma^2 on the noised samples x, in
  NCSN's annealed form (Song & Ermon 2019, Eq. 6, lambda(sigma) = sigma^2): the score of p_sigma is learned
  from the samples x alone, never from the noise that made them (denoising score matching's target). It also
  takes each example's random projections v, which the objective draws (``train.objectives``).

``simple`` and ``hybrid`` take an optional Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion
Training via Min-SNR Weighting Strategy", Sec. 3.4): the loss on F is ||D - x0||^2 / c_out^2, so weighting it by
min(SNR, gamma) c_out^2 makes the x0-loss weight min(SNR, gamma) whatever the network predicts (for eps c_out^2
= 1 / SNR, for v 1 / (SNR + 1), for x0 1), SNR = 1 / sigma^2: low-noise levels stop dominating.

L_vlb is in bits per dimension (per-dimension mean / ln 2), as in the paper's code, so lambda keeps the
paper's meaning: lambda * T * L_t(bits/dim) balances L_simple (a per-dimension mean).

Not a denoiser's loss, but one per example too: ``contrastive_loss``, CLIP's symmetric InfoNCE over a batch's
image-caption logits (Radford et al. 2021, Fig. 3), which trains the noise-aware CLIP (``train.objectives``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from difflab import diffusion
from difflab.conditioning import Cond
from difflab.denoiser import Denoiser, VPPrecond, per_example, split_output
from difflab.errors import DifflabError

LOSSES = ("simple", "hybrid", "vlb", "sliced")
PROJECTIONS = ("rademacher", "gaussian")     # the distributions of the sliced loss's projections v


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) outputs in float32 for the loss; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def network_output(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                   cond: Cond | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x = x0 + sigma * noise and the network's output there, split into (F, variance output or None)."""
    x = x0 + per_example(sigma, x0) * noise
    output = denoiser.network_output(x, sigma, cond)
    mean, variance = split_output(full_precision(output), denoiser.learned_variance)
    return x, mean, variance


def min_snr_weight(denoiser: Denoiser, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of each example's loss on F (Hang et al. 2023, Eq. 10 and Sec. 3.4): (B,)."""
    _, c_out, _, _ = denoiser.precond.scalings(sigma)
    return ((1 / sigma ** 2).clamp(max=gamma) * c_out ** 2).float()


def simple_term(denoiser: Denoiser, mean: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                min_snr_gamma: float | None) -> torch.Tensor:
    """|| target - F ||^2 per example, Min-SNR-gamma weighted when ``min_snr_gamma`` is set."""
    target = full_precision(denoiser.precond.target(x0, noise, sigma.to(x0.device)))
    loss = mean_flat((mean - target) ** 2)
    return loss if min_snr_gamma is None else loss * min_snr_weight(denoiser, sigma, min_snr_gamma).to(loss.device)


def vlb_bits_per_dim(denoiser: Denoiser, x0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor,
                     mean_output: torch.Tensor, variance_output: torch.Tensor | None) -> torch.Tensor:
    """L_{t-1} of the bound for each example, in bits/dim (per-dimension mean); x0_hat = D is not clipped, as in
    the paper's code. Without a learned variance the reverse variance is beta-tilde_t (Ho et al. 2020)."""
    precond = denoiser.precond
    schedule = precond.schedule
    c_skip, c_out, c_in, _ = precond.scalings(sigma)
    xt = per_example(c_in, x) * x                                                    # VP coordinates
    x0_hat = per_example(c_skip, x) * x + per_example(c_out, x) * mean_output
    model_mean, _, fixed_log_var = diffusion.q_posterior(schedule, x0_hat, xt, t)
    model_log_var = (diffusion.learned_log_variance(schedule, t, variance_output)
                     if variance_output is not None else fixed_log_var)
    nats = diffusion.vlb_term(schedule, x0, xt, t, model_mean, model_log_var)
    return mean_flat(nats) / math.log(2.0)


def simple_loss(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                cond: Cond | None = None, t: torch.Tensor | None = None,
                min_snr_gamma: float | None = None) -> torch.Tensor:
    """L_simple (Ho et al. 2020, Eq. 14) / EDM's loss; a learned-variance network's variance is left untrained."""
    _, mean, _ = network_output(denoiser, x0, noise, sigma, cond)
    return simple_term(denoiser, mean, x0, noise, sigma, min_snr_gamma)


def vlb_loss(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
             cond: Cond | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
    """T * L_{t-1}: an unbiased estimate of L_vlb under uniform t (Nichol & Dhariwal 2021, Sec. 3.1)."""
    x, mean, variance = network_output(denoiser, x0, noise, sigma, cond)
    return len(denoiser.precond.schedule) * vlb_bits_per_dim(denoiser, x0, x, sigma, t, mean, variance)


def hybrid_loss(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                cond: Cond | None = None, t: torch.Tensor | None = None, vlb_weight: float = 0.001,
                min_snr_gamma: float | None = None) -> torch.Tensor:
    """L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Eq. 16), with the mean detached in the L_vlb term."""
    x, mean, variance = network_output(denoiser, x0, noise, sigma, cond)
    simple = simple_term(denoiser, mean, x0, noise, sigma, min_snr_gamma)
    vlb = len(denoiser.precond.schedule) * vlb_bits_per_dim(denoiser, x0, x, sigma, t, mean.detach(), variance)
    return simple + vlb_weight * vlb


# -- sliced score matching ------------------------------------------------------------------------------------
def denoiser_score(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Cond | None = None
                   ) -> torch.Tensor:
    """The model's score of p_sigma at VE-scaled x, Tweedie's formula s = (D(x; sigma) - x) / sigma^2 (Karras
    et al. 2022, Eq. 3; ``samplers.langevin.score``), written ((c_skip - 1) x + c_out F) / sigma^2 so that x
    cancels exactly where c_skip = 1: an eps network's score is -F / sigma (a VP model's input scaling c_in is
    inside F's argument, so the gradient is with respect to the VE-scaled x)."""
    c_skip, c_out, _, _ = denoiser.precond.scalings(sigma)
    mean, _ = split_output(full_precision(denoiser.network_output(x, sigma, cond)), denoiser.learned_variance)
    return per_example((c_skip - 1) / sigma ** 2, x) * x + per_example(c_out / sigma ** 2, mean) * mean


def projection_vectors(shape: tuple[int, ...], distribution: str, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
    """Random projections with E[v v^T] = I (Song et al. 2019, Sec. 3): Rademacher entries (+1 or -1, equally
    likely) or standard normal ones."""
    if distribution == "rademacher":
        return torch.randint(0, 2, shape, generator=generator).float().mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator)
    raise ValueError(f"unknown projection distribution {distribution!r}; choose one of {PROJECTIONS}")


def sliced_score_matching(score_fn, x: torch.Tensor, projections: torch.Tensor,
                          variance_reduced: bool = True) -> torch.Tensor:
    """Each example's sliced score matching objective, averaged over its M projections v (``projections``
    (B, M, ...), batch first): Song et al. 2019, Eq. 8,

        v^T (ds/dx) v + 1/2 (v^T s)^2,

    or with ``variance_reduced`` (SSM-VR, Eqs. 9-10) the second term in closed form, E_v[(v^T s)^2] = ||s||^2:

        v^T (ds/dx) v + 1/2 ||s||^2.

    Over v both have the expectation tr(ds/dx) + 1/2 ||s||^2, Hyvarinen's (2005) score matching objective,
    whose expectation over the data is 1/2 E||s - grad log p||^2 less a constant. v^T (ds/dx) v is v dotted
    with the vector-Jacobian product grad_x (v . s), one backward pass with ``create_graph`` so that the loss
    is differentiable in the parameters; attention inside ``score_fn`` runs on PyTorch's math kernel, since
    the fused ones (flash, memory-efficient) have no second derivative. ``score_fn`` (N, ...) -> (N, ...) is
    called once, on the M copies of every example stacked in the batch (B M, ...), example-major
    (``repeat_interleave``), as the projections."""
    batch, m = projections.shape[:2]
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        copies = x.detach().repeat_interleave(m, dim=0).requires_grad_(True)     # (B M, ...)
        v = projections.reshape(copies.shape).to(copies.device, copies.dtype)
        s = score_fn(copies)
        (vjp,) = torch.autograd.grad((v * s).sum(), copies, create_graph=True)  # v^T ds/dx, (B M, ...)
    trace = (v * vjp).flatten(1).sum(1)                                        # v^T (ds/dx) v
    square = s.flatten(1).square().sum(1) if variance_reduced else (v * s).flatten(1).sum(1).square()
    return (trace + square / 2).reshape(batch, m).mean(1)                       # (B,)


def sliced_loss(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                cond: Cond | None = None, t: torch.Tensor | None = None,
                projections: torch.Tensor | None = None) -> torch.Tensor:
    """NCSN's annealed objective (Song & Ermon 2019, Eq. 6) with SSM-VR in place of denoising score matching,
    at x = x0 + sigma * noise (``noise`` only makes the sample): lambda(sigma) = sigma^2 times SSM-VR of the
    model's score, doubled and per dimension, sigma^2 (2 v^T (ds/dx) v + ||s||^2) / d.

    In expectation this is sigma^2 E||s - grad log p_sigma||^2 / d less a constant; for an eps network (s = -F /
    sigma) it is exactly L_simple - 1 in expectation (E||noise||^2 / d = 1): DSM's scale and, in expectation,
    its gradient. ``projections`` (B, M, ...): the objective's draws of ``projection_vectors``."""
    if projections is None:
        raise ValueError("the sliced loss needs each example's projections (B, M, ...)")
    m = projections.shape[1]
    x = x0 + per_example(sigma, x0) * noise
    copies_sigma = sigma.repeat_interleave(m)
    copies_cond = cond.map(lambda value: value.repeat_interleave(m, dim=0)) if cond is not None else None
    ssm = sliced_score_matching(lambda copies: denoiser_score(denoiser, copies, copies_sigma, copies_cond),
                                x, projections)
    return 2 * (sigma ** 2).to(ssm) * ssm / x0[0].numel()


def build_loss(name: str, vlb_weight: float = 0.001, min_snr_gamma: float | None = None):
    """The loss function ``name`` (one of ``LOSSES``) with its options bound."""
    if min_snr_gamma is not None and (name not in ("simple", "hybrid") or min_snr_gamma <= 0):
        raise ValueError(f"min_snr_gamma {min_snr_gamma} needs a positive gamma and loss 'simple' or 'hybrid'")
    if name == "simple":
        return functools.partial(simple_loss, min_snr_gamma=min_snr_gamma)
    if name == "vlb":
        return vlb_loss
    if name == "hybrid":
        return functools.partial(hybrid_loss, vlb_weight=vlb_weight, min_snr_gamma=min_snr_gamma)
    if name == "sliced":
        return sliced_loss
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def check_loss(name: str, denoiser: Denoiser) -> None:
    """The bound's terms need a discrete schedule."""
    if name in ("vlb", "hybrid") and not isinstance(denoiser.precond, VPPrecond):
        raise DifflabError(f"train.loss {name!r} needs a discrete schedule (diffusion.precond: vp)")


# -- contrastive: CLIP's loss ------------------------------------------------------------------------------------
def same_caption(tokens: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: rows i and j hold identical token sequences (the same caption)."""
    return (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Fig. 3: (CE(logits, labels, axis=0) + CE(logits,
    labels, axis=1)) / 2) for the (B, B) logits of image i against caption j, one value per example: the mean of
    image i's cross-entropy over the captions and caption i's over the images.

    ``positives`` (B, B) bool marks the pairs that match; by default only i = j (CLIP's labels = arange(B)).
    With templated captions a batch often holds the same caption twice, and one-hot targets would count the
    image's own caption, in its copy j, as a negative (an aim no model can reach). Passing ``positives =
    same_caption(tokens)`` makes the targets soft, uniform over the matching captions (image side) and over the
    images with that caption (caption side): the cross-entropy with q_ij = positives_ij / sum_j positives_ij.
    Its minimum is the targets' entropy (log k for k copies), not 0; without duplicates it is CLIP's loss."""
    logits = full_precision(logits)
    if positives is None:
        positives = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    image_targets = positives.to(logits.dtype) / positives.sum(dim=1, keepdim=True)      # rows: over captions
    text_targets = positives.T.to(logits.dtype) / positives.T.sum(dim=1, keepdim=True)   # rows: over images
    image_to_text = -(image_targets * F.log_softmax(logits, dim=1)).sum(dim=1)          # (B,)
    text_to_image = -(text_targets * F.log_softmax(logits.T, dim=1)).sum(dim=1)         # (B,)
    return (image_to_text + text_to_image) / 2
