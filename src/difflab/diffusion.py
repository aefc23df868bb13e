"""The Gaussian diffusion process itself, independent of any network.

Ho et al. 2020 ("DDPM"): the forward process q(x_t | x_0) in closed form (Eq. 4), the posterior
q(x_{t-1} | x_t, x_0) (Eqs. 6-7), conversions between the eps-, x0-, v- and score-parameterisations
(v from Salimans & Ho 2022, Sec. 4), and the terms of the variational bound (Eq. 5): Gaussian KLs and
the discretised Gaussian decoder for L_0. ``t`` is always an integer index into ``schedule``.
"""

from __future__ import annotations

import math

import torch

from difflab.schedules import NoiseSchedule


def extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcast against ``like`` (batch first), in ``like``'s dtype and device."""
    out = values.to(like.device)[t.to(like.device)]
    return out.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


# -- forward process ----------------------------------------------------------------------------------------
def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps (Ho et al. 2020, Eq. 4)."""
    a = extract(schedule.alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def q_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor):
    """Mean and variance of q(x_t | x_0)."""
    a = extract(schedule.alphas_cumprod, t, x0)
    return a.sqrt() * x0, (1 - a).expand_as(x0)


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
    """Mean mu-tilde_t, variance beta-tilde_t and clipped log-variance of q(x_{t-1} | x_t, x_0) (Eq. 7)."""
    mean = extract(schedule.posterior_mean_coef_x0, t, xt) * x0 + extract(schedule.posterior_mean_coef_xt, t, xt) * xt
    var = extract(schedule.posterior_variance, t, xt).expand_as(xt)
    log_var = extract(schedule.posterior_log_variance_clipped, t, xt).expand_as(xt)
    return mean, var, log_var


# -- parameterisations --------------------------------------------------------------------------------------
# Each conversion is written once, for alpha-bar given as a tensor broadcastable against x_t, so that it serves
# integer timesteps (abar = alphas_cumprod[t]) and continuous noise levels (abar = 1 / (1 + sigma^2)) alike.
def x0_from_eps(xt: torch.Tensor, abar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - alpha-bar) eps) / sqrt(alpha-bar) (Ho et al. 2020, Eq. 4 solved for x_0)."""
    return (xt - (1 - abar).sqrt() * eps) / abar.sqrt()


def eps_from_x0(xt: torch.Tensor, abar: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return (xt - abar.sqrt() * x0) / (1 - abar).sqrt()


def v_from_eps(x0: torch.Tensor, abar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022, Sec. 4)."""
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def x0_from_v(xt: torch.Tensor, abar: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return abar.sqrt() * xt - (1 - abar).sqrt() * v


def eps_from_v(xt: torch.Tensor, abar: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (1 - abar).sqrt() * xt + abar.sqrt() * v


def v_target(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0 (Salimans & Ho 2022, Sec. 4)."""
    return v_from_eps(x0, extract(schedule.alphas_cumprod, t, x0), eps)


def score_from_eps(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """grad log q(x_t) = -eps / sqrt(1 - alpha-bar_t) (Song et al. 2021, the VP-SDE's score)."""
    a = extract(schedule.alphas_cumprod, t, xt)
    return -eps / (1 - a).sqrt()


# -- the reverse process's variance -------------------------------------------------------------------------
def learned_log_variance(schedule: NoiseSchedule, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log Sigma_theta = v log beta_t + (1 - v) log beta-tilde_t (Nichol & Dhariwal 2021, Eq. 15), per element.

    ``v`` is the network's raw output in [-1, 1] mapped to [0, 1] by (v + 1) / 2, as in the paper's code;
    log beta-tilde is clipped at t = 1 (``posterior_log_variance_clipped``). On a respaced schedule the betas
    are the respaced ones (Sec. 4), so the same output interpolates the right range at every stride.
    """
    frac = (v + 1) / 2
    log_beta = extract(schedule.betas.log(), t, v)
    log_beta_tilde = extract(schedule.posterior_log_variance_clipped, t, v)
    return frac * log_beta + (1 - frac) * log_beta_tilde


# -- variational bound terms (Ho et al. 2020, Eq. 5) ---------------------------------------------------------
def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (-1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2)
                  + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF used by Ho et al.'s and ADM's decoders."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bins: int = 256) -> torch.Tensor:
    """log p(x) under the discretised Gaussian decoder of Ho et al. 2020, Eq. 13 (in nats, elementwise).

    ``x`` holds data scaled to [-1, 1] from ``bins`` integer levels; the edge bins extend to -inf / +inf.
    """
    half_bin = 1.0 / (bins - 1)
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


def prior_kl(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)), elementwise, in nats."""
    t = torch.full((x0.shape[0],), len(schedule) - 1, dtype=torch.long, device=x0.device)
    mean, var = q_mean_variance(schedule, x0, t)
    return normal_kl(mean, var.log(), torch.zeros_like(mean), torch.zeros_like(mean))


def vlb_term(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
             model_mean: torch.Tensor, model_log_var: torch.Tensor) -> torch.Tensor:
    """One term of the bound per element, in nats, for p_theta(x_{t-1} | x_t) = N(model_mean, exp(model_log_var)):
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta) where t > 0 (index), and L_0 = -log p_theta(x_0 | x_1),
    the discretised decoder (Eq. 13), where t = 0. ``x0`` holds the data (256 levels in [-1, 1])."""
    true_mean, _, true_log_var = q_posterior(schedule, x0, xt, t)
    kl = normal_kl(true_mean, true_log_var, model_mean, model_log_var)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    first = (t == 0).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.where(first, decoder, kl)
