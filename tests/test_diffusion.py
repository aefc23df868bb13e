"""The diffusion math against closed forms and Monte Carlo."""

import math

import pytest
import torch

from difflab import diffusion
from difflab.schedules import NoiseSchedule


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule.from_name(request.param, 1000)


def test_forward_chain_matches_closed_form(schedule):
    # Iterate x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z and compare with q(x_t | x_0) (Eq. 4).
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for t in range(300):
        x = (1 - schedule.betas[t]).sqrt() * x + schedule.betas[t].sqrt() * torch.randn(x.shape, generator=g,
                                                                                           dtype=torch.float64)
        if t in (0, 49, 299):
            mean, var = diffusion.q_mean_variance(schedule, x0[:1], torch.tensor([t]))
            assert x.mean().item() == pytest.approx(mean.item(), abs=5e-3)
            assert x.var().item() == pytest.approx(var.item(), rel=2e-2, abs=1e-5)


def test_q_sample_uses_alphas_cumprod(schedule):
    x0, noise, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 5, 500, 999])
    a = schedule.alphas_cumprod[t][:, None]
    assert torch.allclose(diffusion.q_sample(schedule, x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_posterior_matches_bayes_rule(schedule):
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): multiply the two Gaussians in x_{t-1}.
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.4]], dtype=torch.float64)
    for t in (1, 10, 500, 999):
        beta, abar_prev = schedule.betas[t], schedule.alphas_cumprod[t - 1]
        # likelihood in x_{t-1}: N(x_t; sqrt(1-beta) x_{t-1}, beta) -> precision (1-beta)/beta, mean xt/sqrt(1-beta)
        prec_lik, mean_lik = (1 - beta) / beta, xt / (1 - beta).sqrt()
        prec_prior, mean_prior = 1 / (1 - abar_prev), abar_prev.sqrt() * x0
        var = 1 / (prec_lik + prec_prior)
        mean = var * (prec_lik * mean_lik + prec_prior * mean_prior)
        got_mean, got_var, _ = diffusion.q_posterior(schedule, x0, xt, torch.tensor([t]))
        assert got_mean.item() == pytest.approx(mean.item(), rel=1e-9, abs=1e-12)
        assert got_var.item() == pytest.approx(var.item(), rel=1e-9)


def test_posterior_numerically_by_grid(schedule):
    # The same, by normalising the product of densities on a grid: independent of any algebra.
    t = 100
    x0, xt = 0.5, 0.2
    grid = torch.linspace(-3, 3, 200_001, dtype=torch.float64)
    beta, abar_prev = schedule.betas[t], schedule.alphas_cumprod[t - 1]
    log_p = (-(xt - (1 - beta).sqrt() * grid) ** 2 / (2 * beta)
             - (grid - abar_prev.sqrt() * x0) ** 2 / (2 * (1 - abar_prev)))
    p = torch.softmax(log_p, 0)
    mean = (p * grid).sum()
    var = (p * (grid - mean) ** 2).sum()
    got_mean, got_var, _ = diffusion.q_posterior(schedule, torch.tensor([[x0]], dtype=torch.float64),
                                                 torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t]))
    assert got_mean.item() == pytest.approx(mean.item(), abs=1e-6)
    assert got_var.item() == pytest.approx(var.item(), rel=1e-4)


def test_parameterisations_round_trip(schedule):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 950, 999])
    xt = diffusion.q_sample(schedule, x0, t, eps)
    a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(diffusion.x0_from_eps(xt, a, eps), x0, atol=1e-6)
    assert torch.allclose(diffusion.eps_from_x0(xt, a, x0), eps, atol=1e-6)
    v = diffusion.v_target(schedule, x0, t, eps)
    assert torch.allclose(diffusion.x0_from_v(xt, a, v), x0, atol=1e-10)
    assert torch.allclose(diffusion.eps_from_v(xt, a, v), eps, atol=1e-10)
    assert torch.allclose(diffusion.score_from_eps(schedule, xt, t, eps), -eps / (1 - a).sqrt())


def test_normal_kl_matches_torch():
    m1, lv1, m2, lv2 = torch.randn(4, dtype=torch.float64).unbind()
    ours = diffusion.normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (lv1 / 2).exp()),
                                            torch.distributions.Normal(m2, (lv2 / 2).exp()))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)


def test_discretized_decoder_is_a_distribution_over_256_levels():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.1, math.log(0.05)), (-0.95, math.log(0.3)), (0.0, math.log(1e-3))):
        logp = diffusion.discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean),
                                                             torch.full_like(levels, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def test_prior_kl_is_small_at_T(schedule):
    x0 = torch.rand(16, 1, 8, 8, dtype=torch.float64) * 2 - 1
    assert diffusion.prior_kl(schedule, x0).mean().item() < 1e-4
