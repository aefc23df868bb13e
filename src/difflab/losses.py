"""Training losses, each ``loss(denoiser, x0, t, noise, y) -> (B,)``, one value per example.

- ``simple``: L_simple of Ho et al. 2020, Eq. 14, || target - net(x_t, t) ||^2 averaged over dimensions;
  the target is eps (the paper), x0 or v (Salimans & Ho 2022), by ``denoiser.prediction``.
- ``vlb``: the variational bound's term L_{t-1} at the sampled t (``diffusion.vlb_term``), in bits/dim,
  times T so that E_t[loss] is L_vlb = sum_t L_t (Nichol & Dhariwal 2021, Sec. 3.1; with importance-sampled
  t, Sec. 3.3, the trainer weights each example by 1 / (T p_t)).
- ``hybrid``: L_hybrid = L_simple + lambda L_vlb with lambda = 0.001 (Nichol & Dhariwal 2021, Eq. 16), where
  the L_vlb term sees the mean through a stop-gradient, so it trains only the variance (Sec. 3.1).

``simple`` and ``hybrid`` take an optional Min-SNR-gamma weighting of the L_simple term (Hang et al. 2023,
"Efficient Diffusion Training via Min-SNR Weighting Strategy", Sec. 3.4): every prediction's loss is a
multiple of the x0 loss, ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1)
||x0 - x0_hat||^2, and the weight makes the x0-loss weight min(SNR_t, gamma): low-noise steps, whose
gradients conflict with the rest, stop dominating.

L_vlb is in bits per dimension (per-dimension mean / ln 2), as in the paper's code, so lambda keeps the
paper's meaning: lambda * T * L_t(bits/dim) balances L_simple (a per-dimension mean).
"""

from __future__ import annotations

import functools
import math

import torch

from difflab import diffusion
from difflab.denoiser import Denoiser, split_output, to_prediction

LOSSES = ("simple", "hybrid", "vlb")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) outputs in float32 for the loss; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def network_output(denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x_t ~ q(x_t | x_0) (Eq. 4) and the network's output there, split into (mean output, variance output)."""
    xt = diffusion.q_sample(denoiser.schedule, x0, t, noise)
    output = denoiser.net(xt, t, y) if y is not None else denoiser.net(xt, t)
    mean, variance = split_output(full_precision(output), denoiser.learned_variance)
    return xt, mean, variance


def vlb_bits_per_dim(denoiser: Denoiser, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     mean_output: torch.Tensor, variance_output: torch.Tensor | None) -> torch.Tensor:
    """L_{t-1} of the bound for each example, in bits/dim (per-dimension mean); x0_hat is not clipped, as in
    the paper's code. Without a learned variance the reverse variance is beta-tilde_t (Ho et al. 2020)."""
    schedule = denoiser.schedule
    x0_hat = to_prediction(denoiser.prediction, xt, diffusion.extract(schedule.alphas_cumprod, t, xt), mean_output).x0
    model_mean, _, fixed_log_var = diffusion.q_posterior(schedule, x0_hat, xt, t)
    model_log_var = (diffusion.learned_log_variance(schedule, t, variance_output)
                     if variance_output is not None else fixed_log_var)
    nats = diffusion.vlb_term(schedule, x0, xt, t, model_mean, model_log_var)
    return mean_flat(nats) / math.log(2.0)


# The x0 loss's multiple that each prediction's L_simple is, as a function of SNR_t.
X0_LOSS_MULTIPLE = {"eps": lambda snr: snr, "x0": lambda snr: torch.ones_like(snr), "v": lambda snr: snr + 1}


def min_snr_weight(denoiser: Denoiser, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of each example's L_simple (Hang et al. 2023, Eq. 10 and Sec. 3.4): (B,)."""
    abar = denoiser.schedule.alphas_cumprod.to(t.device)[t]
    snr = abar / (1 - abar)
    return (snr.clamp(max=gamma) / X0_LOSS_MULTIPLE[denoiser.prediction](snr)).float()


def simple_term(denoiser: Denoiser, mean: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                min_snr_gamma: float | None) -> torch.Tensor:
    """|| target - mean output ||^2 per example, Min-SNR-gamma weighted when ``min_snr_gamma`` is set."""
    loss = mean_flat((mean - full_precision(denoiser.target(x0, t, noise))) ** 2)
    return loss if min_snr_gamma is None else loss * min_snr_weight(denoiser, t, min_snr_gamma)


def simple_loss(denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                y: torch.Tensor | None = None, min_snr_gamma: float | None = None) -> torch.Tensor:
    """L_simple (Ho et al. 2020, Eq. 14); a learned-variance network's variance output is left untrained."""
    _, mean, _ = network_output(denoiser, x0, t, noise, y)
    return simple_term(denoiser, mean, x0, t, noise, min_snr_gamma)


def vlb_loss(denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             y: torch.Tensor | None = None) -> torch.Tensor:
    """T * L_{t-1}: an unbiased estimate of L_vlb under uniform t (Nichol & Dhariwal 2021, Sec. 3.1)."""
    xt, mean, variance = network_output(denoiser, x0, t, noise, y)
    return len(denoiser.schedule) * vlb_bits_per_dim(denoiser, x0, xt, t, mean, variance)


def hybrid_loss(denoiser: Denoiser, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                y: torch.Tensor | None = None, vlb_weight: float = 0.001,
                min_snr_gamma: float | None = None) -> torch.Tensor:
    """L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Eq. 16), with the mean detached in the L_vlb term."""
    xt, mean, variance = network_output(denoiser, x0, t, noise, y)
    simple = simple_term(denoiser, mean, x0, t, noise, min_snr_gamma)
    vlb = len(denoiser.schedule) * vlb_bits_per_dim(denoiser, x0, xt, t, mean.detach(), variance)
    return simple + vlb_weight * vlb


def build_loss(name: str, vlb_weight: float = 0.001, min_snr_gamma: float | None = None):
    """The loss function ``name`` (one of ``LOSSES``) with its options bound."""
    if min_snr_gamma is not None and (name == "vlb" or min_snr_gamma <= 0):
        raise ValueError(f"min_snr_gamma {min_snr_gamma} needs a positive gamma and loss 'simple' or 'hybrid'")
    if name == "simple":
        return functools.partial(simple_loss, min_snr_gamma=min_snr_gamma)
    if name == "vlb":
        return vlb_loss
    if name == "hybrid":
        return functools.partial(hybrid_loss, vlb_weight=vlb_weight, min_snr_gamma=min_snr_gamma)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")
