"""Score-based samplers (annealed Langevin dynamics, predictor-corrector) against the exact Gaussian mixture,
whose noised marginals p_sigma, and so the true score at every sigma, are known in closed form."""

import dataclasses
import inspect
import math

import pytest
import torch

from difflab.config import SampleConfig
from difflab.denoiser import Denoiser, VPPrecond
from difflab.metrics import sliced_wasserstein
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import (SAMPLER_OPTIONS, SAMPLERS, CountingModel, PerSampleNoise, build_sigmas, prior_std,
                              sample_langevin, sample_pc)
from difflab.samplers.langevin import langevin_dynamics, score
from difflab.schedules import NoiseSchedule

MIXTURE = GaussianMixture.ring(k=8, radius=1.5, std=0.15)
SCHEDULE = NoiseSchedule.from_name("linear", 1000)
MODEL = Denoiser(ExactEpsNet(MIXTURE, SCHEDULE), VPPrecond(SCHEDULE, "eps"))          # D(x; sigma)
N = 2000


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny 2-D batches (conftest.py)


def half_score(x, sigma, cond=None):
    """A wrong model: the exact one with its eps (so its score) scaled by 0.5, D = x - sigma eps / 2."""
    return x - (x - MODEL(x, sigma, cond)) / 2


def noised(sigma: float, n: int, seed: int) -> torch.Tensor:
    """Exact draws of p_sigma in VE scaling: x0 from the mixture plus sigma z."""
    g = torch.Generator().manual_seed(seed)
    return MIXTURE.sample(n, g) + sigma * torch.randn(n, MIXTURE.dim, generator=g, dtype=torch.float64)


def mean_loglik(x: torch.Tensor, sigma: float) -> float:
    """Mean log p_sigma(x) of VE-scaled x, up to a constant that depends on sigma only (the Jacobian of
    x_vp = sqrt(alpha-bar) x)."""
    abar = 1 / (1 + sigma ** 2)
    return MIXTURE.log_prob(x * math.sqrt(abar), abar).mean().item()


def assert_samples(x: torch.Tensor, sigma: float, wasserstein: float, loglik: float):
    """x is close to p_sigma (p_0 = the mixture): sliced Wasserstein to N exact draws below ``wasserstein``
    (the floor between two exact sets is about 0.02 at sigma = 0, 0.04 at sigma = 0.5) and mean log-density
    under p_sigma within ``loglik`` nats of that of exact draws (< 0: too spread, > 0: too concentrated)."""
    distance = sliced_wasserstein(x, noised(sigma, N, 123))
    assert distance < wasserstein, distance
    gap = mean_loglik(x, sigma) - mean_loglik(noised(sigma, 100_000, 11), sigma)
    assert abs(gap) < loglik, gap


def run(sampler, sigmas, n=N, model=MODEL, seed=0, **kwargs):
    """Samples (float64) from the prior at sigmas[0] and the number of network evaluations of one batch."""
    counting = CountingModel(model)
    noise = PerSampleNoise(range(seed, seed + n))
    x = noise.randn((MIXTURE.dim,), torch.float64) * prior_std(sigmas)
    return sampler(counting, x, sigmas, noise, **kwargs), counting.nfe


# -- the score ----------------------------------------------------------------------------------------------
def test_score_is_the_exact_score_of_the_noised_data():
    # grad_x log p_sigma(x) of VE-scaled x = sqrt(alpha-bar) times the VP score at x_vp = sqrt(alpha-bar) x
    x = noised(1.0, 50, 0) * 1.3
    for sigma in (0.02, 0.5, 3.0):
        abar = 1 / (1 + sigma ** 2)
        exact = math.sqrt(abar) * MIXTURE.score(x * math.sqrt(abar), abar)
        assert torch.allclose(score(MODEL, x, sigma), exact, rtol=1e-6, atol=1e-8), sigma


# -- Langevin dynamics at one noise level samples p_sigma ---------------------------------------------------
SIGMA = 0.5
ALPHA = 0.01            # relative step alpha / Var(mode of p_sigma) = 0.04: about 300 steps to converge
STEPS = 300


def test_langevin_dynamics_converges_to_the_noised_marginal():
    start = MIXTURE.sample(N, torch.Generator().manual_seed(3))          # the clean data: far from p_sigma
    with pytest.raises(AssertionError):
        assert_samples(start, SIGMA, wasserstein=0.06, loglik=0.05)
    x = langevin_dynamics(MODEL, start, SIGMA, ALPHA, STEPS, PerSampleNoise(range(N)))
    assert_samples(x, SIGMA, wasserstein=0.06, loglik=0.05)
    wrong = langevin_dynamics(half_score, start, SIGMA, ALPHA, STEPS, PerSampleNoise(range(N)))
    with pytest.raises(AssertionError):                                   # the same checks catch a wrong score
        assert_samples(wrong, SIGMA, wasserstein=0.06, loglik=0.05)


def test_one_level_is_langevin_dynamics_then_the_denoising_step():
    sigmas = torch.tensor([SIGMA, 0.0], dtype=torch.float64)
    x = noised(SIGMA, 20, 4)
    ours = sample_langevin(MODEL, x, sigmas, PerSampleNoise(range(20)), langevin_steps=5, step_size=ALPHA)
    expected = MODEL(langevin_dynamics(MODEL, x, SIGMA, ALPHA, 5, PerSampleNoise(range(20))), SIGMA)
    assert torch.equal(ours, expected)
    # PC: with no corrector step, the predictor's last step to sigma = 0 is the denoising step
    assert torch.allclose(sample_pc(MODEL, x, sigmas, PerSampleNoise(range(20)), langevin_steps=0),
                          MODEL(x, SIGMA), atol=1e-12)


def test_pc_corrector_step_is_song_et_al_algorithm_4():
    # one corrector step, written out: e = 2 (r ||z|| / ||g||)^2 with the norms averaged over the batch,
    # x + e g + sqrt(2 e) z, then the denoising step
    sigmas = torch.tensor([SIGMA, 0.0], dtype=torch.float64)
    x, snr = noised(SIGMA, 20, 5), 0.3
    ours = sample_pc(MODEL, x, sigmas, PerSampleNoise(range(20)), langevin_steps=1, snr=snr)
    z, g = PerSampleNoise(range(20)).randn((2,), torch.float64), score(MODEL, x, SIGMA)
    e = 2 * (snr * z.norm(dim=1).mean() / g.norm(dim=1).mean()) ** 2
    assert torch.allclose(ours, MODEL(x + e * g + (2 * e).sqrt() * z, SIGMA), atol=1e-12)


# -- from the prior to the mixture --------------------------------------------------------------------------
# Annealed Langevin needs small steps relative to sigma_L^2 and many of them: 50 levels from sigma = 10 (far
# above the data's scale 1.5) with step_size / sigma_L^2 = 1 (the default 2e-5 is NCSN's 0.2) reach the bar at
# 501 NFE. PC on grids over the schedule's whole range: with the default corrector (200 NFE), and the
# predictor alone (reverse diffusion, 200 NFE), which the corrector would otherwise mask.
ANNEALED = [
    ("langevin", build_sigmas(SCHEDULE, 50, "logsnr", sigma_max=10.0), {"langevin_steps": 10, "step_size": 1e-4}),
    ("pc", build_sigmas(SCHEDULE, 100, "logsnr"), {}),
    ("pc", build_sigmas(SCHEDULE, 200, "logsnr"), {"langevin_steps": 0}),
]


@pytest.mark.parametrize("name, sigmas, kwargs", ANNEALED)
def test_sampler_reaches_the_mixture_and_a_wrong_score_does_not(name, sigmas, kwargs):
    samples, _ = run(SAMPLERS[name], sigmas, **kwargs)
    assert_samples(samples, 0.0, wasserstein=0.05, loglik=0.1)
    wrong, _ = run(SAMPLERS[name], sigmas, model=half_score, **kwargs)
    with pytest.raises(AssertionError):
        assert_samples(wrong, 0.0, wasserstein=0.05, loglik=0.1)


# -- network evaluations, options and randomness ------------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2, 7])
@pytest.mark.parametrize("langevin_steps", [0, 1, 3])
def test_network_evaluations(levels, langevin_steps):
    sigmas = build_sigmas(SCHEDULE, levels, "karras")
    assert run(sample_langevin, sigmas, n=4, langevin_steps=langevin_steps)[1] == levels * langevin_steps + 1
    assert run(sample_pc, sigmas, n=4, langevin_steps=langevin_steps)[1] == levels * (langevin_steps + 1)


def test_options_are_config_fields_and_keyword_arguments():
    fields = {field.name for field in dataclasses.fields(SampleConfig)}
    for name, sampler in (("langevin", sample_langevin), ("pc", sample_pc)):
        parameters = inspect.signature(sampler).parameters
        assert set(SAMPLER_OPTIONS[name]) <= fields & set(parameters) and SAMPLERS[name] is sampler


def test_a_langevin_sample_depends_on_its_seed_not_on_the_batch():
    sigmas = build_sigmas(SCHEDULE, 5, "karras")
    batch, _ = run(sample_langevin, sigmas, n=6, seed=100, langevin_steps=3)
    alone, _ = run(sample_langevin, sigmas, n=1, seed=103, langevin_steps=3)
    assert torch.allclose(batch[3:4], alone, atol=1e-12)
