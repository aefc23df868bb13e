"""Bits/dim through the variational bound (Ho et al. 2020, Eq. 5) against an independent float64 computation.

Data: each of D coordinates is N(m, s^2) rounded to the 256 levels of [-1, 1] (as pixels are). Model: the
Bayes-optimal eps network of a Gaussian N(m', s'^2) (difflab.references), exact when (m', s') = (m, s) up to
the rounding. For such a model x0_hat(x_t) = k x_t + c is linear, so with a_t = alpha-bar_t

    E (x_0 - x0_hat)^2 = E ((1 - k sqrt(a_t)) x_0 - c)^2 + k^2 (1 - a_t),  k = sqrt(a_t) s'^2 / v,
    c = m' (1 - a_t) / v,  v = a_t s'^2 + 1 - a_t,

and every KL term's expectation is closed-form (the moments of x_0 are sums over the 256 levels); the
prior term too; the decoder term is a sum over levels of a Gauss-Hermite quadrature over the noise.
"""

import math

import numpy as np
import pytest
import torch

from difflab.denoiser import Denoiser, VPPrecond
from difflab.diffusion import discretized_gaussian_log_likelihood
from difflab.errors import DifflabError
from difflab.metrics import bits_per_dim
from difflab.references.gaussian_mixture import ExactEpsNet, GaussianMixture
from difflab.schedules import NoiseSchedule

D, M, S = 8, 0.1, 0.3
LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1


def level_probabilities(m=M, s=S):
    """P(x_0 = level) for N(m, s^2) rounded to the nearest level (the end levels take the tails)."""
    edges = torch.cat([torch.tensor([-math.inf]), (LEVELS[:-1] + LEVELS[1:]) / 2,
                       torch.tensor([math.inf])]).double()
    return torch.special.ndtr((edges[1:] - m) / s) - torch.special.ndtr((edges[:-1] - m) / s)


def sample_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LEVELS[torch.multinomial(level_probabilities(), n * D, replacement=True, generator=g)].reshape(n, D)


def gaussian_model(schedule, m=M, s=S):
    return Denoiser(ExactEpsNet(GaussianMixture(torch.full((1, D), m), torch.tensor([s])), schedule),
                    VPPrecond(schedule, "eps"))


def analytic_bound_terms(schedule, variance, m_model=M, s_model=S):
    """Expected L_0, L_1..L_{T-1}, L_T per dimension, in nats, written out from the formulas above."""
    p = level_probabilities()
    ex, ex2 = (p * LEVELS).sum(), (p * LEVELS ** 2).sum()
    beta = schedule.betas
    a = torch.cumprod(1 - beta, 0)
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    beta_tilde = beta * (1 - a_prev) / (1 - a)
    if variance == "beta":
        log_var = beta.log()
    else:   # beta-tilde, whose first value (0) is replaced by the second
        log_var = torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log()
    v = a * s_model ** 2 + 1 - a
    k, c = a.sqrt() * s_model ** 2 / v, m_model * (1 - a) / v
    alpha = 1 - k * a.sqrt()
    mse = alpha ** 2 * ex2 - 2 * alpha * c * ex + c ** 2 + k ** 2 * (1 - a)      # E (x_0 - x0_hat)^2
    coef_x0 = beta * a_prev.sqrt() / (1 - a)                                     # of x_0 in mu-tilde (Eq. 7)
    kl = 0.5 * (-1 + log_var - beta_tilde.log() + beta_tilde / log_var.exp()
                + coef_x0 ** 2 * mse / log_var.exp())
    prior = 0.5 * (-1 - (1 - a[-1]).log() + (1 - a[-1]) + a[-1] * ex2)
    nodes, weights = np.polynomial.hermite_e.hermegauss(120)                     # E over eps ~ N(0, 1)
    e, w = torch.from_numpy(nodes), torch.from_numpy(weights / math.sqrt(2 * math.pi))
    x1 = a[0].sqrt() * LEVELS[:, None] + (1 - a[0]).sqrt() * e[None]             # (levels, nodes)
    mean = k[0] * x1 + c[0]                                                      # mu_theta(x_1, 1) = x0_hat
    log_lik = discretized_gaussian_log_likelihood(LEVELS[:, None].expand_as(mean), mean,
                                                  torch.full_like(mean, 0.5 * log_var[0].item()))
    decoder = -(p[:, None] * w[None] * log_lik).sum()
    return torch.cat([decoder.reshape(1), kl[1:], prior.reshape(1)])


def entropy_bits():
    p = level_probabilities()
    return -(p * p.clamp(min=1e-300).log()).sum().item() / math.log(2)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_name("linear", 1000)


@pytest.fixture(scope="module")
def data():
    return sample_data(100)


@pytest.fixture(scope="module")
def exact(schedule, data):
    """Bits/dim of the exact model for both fixed variances (computed once for the module)."""
    return {variance: bits_per_dim(gaussian_model(schedule), data, variance, batch_size=100_000)
            for variance in ("beta_tilde", "beta")}


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_bound_matches_the_analytic_bound(schedule, exact, variance):
    result = exact[variance]
    expected = analytic_bound_terms(schedule, variance) / math.log(2)
    assert result.terms.shape == (1001,) and result.per_image.shape == (100,)
    assert result.mean == pytest.approx(expected.sum().item(), abs=4 * result.stderr)
    assert result.stderr < 0.15
    assert result.prior == pytest.approx(expected[-1].item(), rel=0.05, abs=1e-6)
    # the KL terms, in blocks of timesteps (each block's Monte Carlo error is small against its value)
    for block in (slice(1, 10), slice(10, 100), slice(100, 1000)):
        assert result.terms[block].sum() == pytest.approx(expected[block].sum().item(), rel=0.1)
    assert result.decoder == pytest.approx(expected[0].item(), rel=0.05)


def test_bound_of_the_exact_model_is_above_the_entropy(schedule, exact):
    # Gibbs: E[bound] >= E[-log p_model] >= H(data), the true NLL of the data. The gap (0.77 bits/dim here)
    # is the bound's own slack: Gaussian reverse steps of fixed variance cannot follow q(x_{t-1} | x_t), which
    # is multimodal at the first steps for data on 256 levels; nearly all of it lies in L_0..L_9.
    analytic = analytic_bound_terms(schedule, "beta_tilde").sum().item() / math.log(2)
    result = exact["beta_tilde"]
    h = entropy_bits()
    assert h < analytic < h + 1.0
    assert h - 3 * result.stderr < result.mean < h + 1.0


def test_a_wrong_model_has_a_larger_bound(schedule, data, exact):
    right = exact["beta_tilde"]
    wrong = bits_per_dim(gaussian_model(schedule, m=0.0, s=0.4), data, batch_size=100_000)
    expected = analytic_bound_terms(schedule, "beta_tilde", 0.0, 0.4).sum().item() / math.log(2)
    assert wrong.mean == pytest.approx(expected, abs=4 * wrong.stderr)
    # same noise for both models (same seeds): compare image by image
    difference = wrong.per_image - right.per_image
    assert difference.mean() > 5 * difference.std(ddof=1) / math.sqrt(len(difference))
    assert difference.mean() == pytest.approx(
        expected - analytic_bound_terms(schedule, "beta_tilde").sum().item() / math.log(2), rel=0.2)


def test_result_does_not_depend_on_batching():
    schedule = NoiseSchedule.from_name("linear", 40)
    x = sample_data(6, seed=1)
    model = gaussian_model(schedule)
    one = bits_per_dim(model, x, batch_size=4)              # 4 images x 1 timestep per forward pass
    many = bits_per_dim(model, x, batch_size=6 * 20)        # 6 images x 20 timesteps
    np.testing.assert_allclose(one.per_image, many.per_image, rtol=1e-12)


def test_bad_input(schedule):
    model = gaussian_model(schedule)
    with pytest.raises(DifflabError, match=r"\[-1, 1\]"):
        bits_per_dim(model, torch.full((2, D), 3.0))
    with pytest.raises(DifflabError, match="reverse variance"):
        bits_per_dim(model, sample_data(2), variance="learned")
