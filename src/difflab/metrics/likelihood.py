"""Negative log-likelihood in bits/dim through the full variational bound of Ho et al. 2020 (Eq. 5):

    L = L_T + sum_{t=2}^{T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I))                                      (the prior term)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)),  x_t ~ q(x_t | x_0)
    L_0     = -log p_theta(x_0 | x_1), the discretised Gaussian decoder (Eq. 13)

with p_theta(x_{t-1} | x_t) = N(mu-tilde_t(x_t, x0_hat), sigma_t^2 I): the posterior mean at the
network's x_0 prediction (Eqs. 7, 11) and the fixed variance sigma_t^2 = beta_t or beta-tilde_t (Sec. 3.2),
or a learned-variance model's own Sigma_theta (Nichol & Dhariwal 2021, Eq. 15).
Every term is evaluated at every t (no sampling of t), one x_t per image and t; several timesteps share
one forward batch. The decoder's variance is sigma_1^2: beta_1 (the paper's choice) or, since
beta-tilde_1 = 0, beta-tilde_2 (the clipped value ADM uses). Bits/dim = L / (D ln 2).

In code index i = 0..T-1 is the paper's t = i + 1; column i of ``vlb_terms`` is L_0 for i = 0 and
L_i = KL at x_{i+1} -> x_i otherwise; column T is L_T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab import diffusion
from difflab.conditioning import Cond
from difflab.denoiser import Denoiser
from difflab.errors import DifflabError
from difflab.noise import PerSampleNoise
from difflab.schedules import NoiseSchedule

VARIANCES = ("beta", "beta_tilde")


@dataclass
class BitsPerDim:
    mean: float                  # bits/dim averaged over images
    stderr: float                # standard error of that mean over images
    per_image: np.ndarray        # (N,) bits/dim of each image's bound
    terms: np.ndarray            # (T + 1,) mean bits/dim of each term: L_0, L_1, ..., L_{T-1}, L_T

    @property
    def prior(self) -> float:
        return float(self.terms[-1])

    @property
    def decoder(self) -> float:
        return float(self.terms[0])


def reverse_log_variance(schedule: NoiseSchedule, variance: str) -> torch.Tensor:
    """log sigma_t^2 of the fixed reverse process (Ho et al. 2020, Sec. 3.2), per index, float64."""
    if variance == "beta":
        return schedule.betas.log()
    if variance == "beta_tilde":
        return schedule.posterior_log_variance_clipped
    raise DifflabError(f"unknown reverse variance {variance!r}; choose one of {VARIANCES}")


def term_nats(denoiser: Denoiser, x0: torch.Tensor, xt: torch.Tensor, index: torch.Tensor, log_var: torch.Tensor,
              cond: Cond | None, clip_x0: bool, net_dtype: torch.dtype) -> torch.Tensor:
    """L_i for each row (nats, summed over dimensions): the decoder NLL where index is 0, the KL elsewhere.

    x0_hat = D(x_t / sqrt(alpha-bar_t); sigma_t). The network sees its input in ``net_dtype``; everything
    else is float64.
    """
    schedule = denoiser.precond.schedule
    abar = diffusion.extract(schedule.alphas_cumprod, index, xt)
    sigma = schedule.sigmas.to(xt.device)[index]
    pred = denoiser.output((xt / abar.sqrt()).to(net_dtype), sigma, cond)
    x0_hat = pred.x0.double().clamp(-1, 1) if clip_x0 else pred.x0.double()
    model_mean, _, _ = diffusion.q_posterior(schedule, x0_hat, xt, index)       # Eq. 11 via Eq. 7
    if pred.variance is not None:                                               # Nichol & Dhariwal 2021, Eq. 15
        model_log_var = diffusion.learned_log_variance(schedule, index, pred.variance.double())
    else:
        model_log_var = diffusion.extract(log_var, index, xt).expand_as(xt)
    return diffusion.vlb_term(schedule, x0, xt, index, model_mean, model_log_var).flatten(1).sum(1)


@torch.no_grad()
def vlb_terms(denoiser: Denoiser, x0: torch.Tensor, variance: str = "beta_tilde",
              cond: Cond | None = None, batch_size: int = 1024, seed: int = 0,
              clip_x0: bool = False, progress: bool = False) -> torch.Tensor:
    """Every term of the bound for every image, in nats: (N, T + 1), columns as in the module docstring.

    ``x0`` holds data in [-1, 1] from 256 levels. Image i draws its noise from seed ``seed + i``, so the
    result does not depend on ``batch_size`` (the number of (image, timestep) pairs per forward pass).
    """
    if x0.ndim < 2 or x0.shape[0] == 0:
        raise DifflabError(f"likelihood: expected a batch of data (N, ...), got shape {tuple(x0.shape)}")
    if x0.min() < -1 or x0.max() > 1:
        raise DifflabError("likelihood: data must be scaled to [-1, 1] (256 levels), as the decoder assumes")
    schedule = denoiser.precond.schedule
    steps = len(schedule)
    log_var = reverse_log_variance(schedule, variance)
    parameter = next(denoiser.parameters(), None)
    device = parameter.device if parameter is not None else x0.device
    net_dtype = parameter.dtype if parameter is not None else x0.dtype
    out = torch.empty(len(x0), steps + 1, dtype=torch.float64)
    images_per_batch = min(len(x0), batch_size)
    steps_per_batch = max(1, batch_size // images_per_batch)
    bar = tqdm(total=len(x0) * steps, desc="bits/dim", unit="term", disable=not progress)
    for start in range(0, len(x0), images_per_batch):
        x = x0[start:start + images_per_batch].to(device, torch.float64)             # (b, ...)
        rows = cond.rows(start, start + len(x)).to(device) if cond is not None else None
        noise = PerSampleNoise(range(seed + start, seed + start + len(x)), device)
        out[start:start + len(x), steps] = diffusion.prior_kl(schedule, x).flatten(1).sum(1).cpu()
        for first in range(0, steps, steps_per_batch):
            ts = range(first, min(first + steps_per_batch, steps))
            index = torch.tensor(ts, device=device).repeat_interleave(len(x))         # (k b,)
            xs = x.repeat(len(ts), *([1] * (x.ndim - 1)))                             # (k b, ...)
            eps = torch.cat([noise.randn_like(x) for _ in ts])
            xt = diffusion.q_sample(schedule, xs, index, eps)
            repeated = Cond.cat([rows] * len(ts)) if rows is not None else None
            nats = term_nats(denoiser, xs, xt, index, log_var, repeated, clip_x0, net_dtype)
            out[start:start + len(x), first:first + len(ts)] = nats.reshape(len(ts), len(x)).T.cpu()
            bar.update(len(ts) * len(x))
    bar.close()
    return out


def bits_per_dim(denoiser: Denoiser, x0: torch.Tensor, variance: str = "beta_tilde",
                 cond: Cond | None = None, batch_size: int = 1024, seed: int = 0,
                 clip_x0: bool = False, progress: bool = False) -> BitsPerDim:
    """The bound's NLL in bits/dim over the images ``x0`` (in [-1, 1]), with its standard error."""
    terms = vlb_terms(denoiser, x0, variance, cond, batch_size, seed, clip_x0, progress)
    per_image_terms = (terms / (math.log(2) * x0[0].numel())).numpy()                 # bits/dim
    per_image = per_image_terms.sum(axis=1)
    stderr = float(per_image.std(ddof=1) / math.sqrt(len(per_image))) if len(per_image) > 1 else float("nan")
    return BitsPerDim(float(per_image.mean()), stderr, per_image, per_image_terms.mean(axis=0))
