"""Improved DDPM (Nichol & Dhariwal 2021): learned reverse variance, L_vlb / L_hybrid, importance-sampled t.

Checked against closed forms: the interpolation's end points, a zero KL at the true posterior, the optimal
variance of Gaussian data (beta_t for unit-variance data), the stop-gradient of L_hybrid, the unbiasedness of
importance weights, and bit-exact resume with the sampler's loss history.
"""

import math

import pytest
import torch
from torch import nn

from difflab import diffusion
from difflab.build import build_model
from difflab.conditioning import Cond
from difflab.config import Config, DataConfig, DiffusionConfig, ModelConfig, SampleConfig
from difflab.data import InMemoryData
from difflab.denoiser import Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.losses import build_loss, hybrid_loss, simple_loss, vlb_loss
from difflab.metrics.likelihood import vlb_terms
from difflab.pipelines.ddpm import sample
from difflab.references.gaussian_mixture import ExactEpsNet, GaussianMixture
from difflab.samplers import SAMPLERS, PerSampleNoise, sample_ancestral
from difflab.schedules import NoiseSchedule, space_timesteps
from difflab.train.timesteps import ImportanceTimesteps, UniformTimesteps
from difflab.train.diffusion import diffusion_trainer
from test_checkpoint import assert_identical, image_config, parameters

SCHEDULE = NoiseSchedule.from_name("linear", 100)


class WithVariance(nn.Module):
    """An exact eps network plus a variance output: a constant v, or v per timestep from a table."""

    def __init__(self, net: nn.Module, v: float | torch.Tensor):
        super().__init__()
        self.net = net
        self.v = nn.Parameter(torch.as_tensor(v, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        eps = self.net(x, t, cond)
        # t is the denoiser's c_noise, the real timestep of sigma: integer-valued at the schedule's sigmas
        v = self.v[t.round().long()] if self.v.ndim else self.v
        return torch.cat([eps, v.reshape(-1, *([1] * (eps.ndim - 1))).to(eps.dtype).expand_as(eps)], dim=1)


def gaussian_denoiser(std: float, v, schedule=SCHEDULE, dim: int = 4) -> Denoiser:
    mixture = GaussianMixture(torch.zeros(1, dim), torch.tensor([std]))
    return Denoiser(WithVariance(ExactEpsNet(mixture, schedule), v), VPPrecond(schedule, "eps"), learned_variance=True)


def test_learned_variance_interpolates_beta_and_beta_tilde_on_respaced_schedules():
    for schedule in (SCHEDULE, SCHEDULE.respace(space_timesteps(100, 10))):
        t = torch.arange(1, len(schedule))
        like = torch.zeros(len(t), 1)
        top = diffusion.learned_log_variance(schedule, t, torch.ones_like(like, dtype=torch.float64))
        bottom = diffusion.learned_log_variance(schedule, t, -torch.ones_like(like, dtype=torch.float64))
        middle = diffusion.learned_log_variance(schedule, t, torch.zeros_like(like, dtype=torch.float64))
        torch.testing.assert_close(top[:, 0], schedule.betas[t].log())
        torch.testing.assert_close(bottom[:, 0], schedule.posterior_variance[t].log())
        torch.testing.assert_close(middle[:, 0], 0.5 * (schedule.betas[t] * schedule.posterior_variance[t]).log())


def test_vlb_term_is_zero_at_the_true_posterior():
    x0 = torch.rand(6, 3, dtype=torch.float64) * 2 - 1
    t = torch.arange(1, 7)
    xt = diffusion.q_sample(SCHEDULE, x0, t, torch.randn_like(x0))
    mean, _, log_var = diffusion.q_posterior(SCHEDULE, x0, xt, t)
    torch.testing.assert_close(diffusion.vlb_term(SCHEDULE, x0, xt, t, mean, log_var), torch.zeros_like(x0))
    assert (diffusion.vlb_term(SCHEDULE, x0, xt, t, mean + 0.01, log_var) > 0).all()


@pytest.mark.parametrize("std", [1.0, 0.3])
def test_vlb_loss_is_minimised_by_the_optimal_variance_of_gaussian_data(std):
    """For data N(0, s^2 I) and the exact mean, E[L_{t-1}] over v is minimised at
    Sigma* = beta-tilde_t + c_t^2 Var(x_0 | x_t) (c_t: x_0's coefficient in the posterior mean), which is
    exactly beta_t for s = 1 (Ho et al. 2020's remark on the two fixed choices)."""
    t_index = 30
    abar = SCHEDULE.alphas_cumprod[t_index]
    posterior_var_x0 = std ** 2 * (1 - abar) / (abar * std ** 2 + 1 - abar)
    optimum = SCHEDULE.posterior_variance[t_index] + SCHEDULE.posterior_mean_coef_x0[t_index] ** 2 * posterior_var_x0
    lo, hi = SCHEDULE.posterior_variance[t_index].log(), SCHEDULE.betas[t_index].log()
    v_star = 2 * (optimum.log() - lo) / (hi - lo) - 1
    if std == 1.0:
        assert abs(v_star.item() - 1) < 1e-9
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20000, 4, generator=g, dtype=torch.float64) * std
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.full((len(x0),), t_index)
    grid = torch.linspace(-1.5, 1.5, 61, dtype=torch.float64)
    losses = torch.stack([vlb_loss(gaussian_denoiser(std, v), x0, noise, SCHEDULE.sigmas[t], None, t).mean()
                          for v in grid])
    assert abs(grid[losses.argmin()] - v_star) <= 0.1, (grid[losses.argmin()], v_star)


def test_vlb_loss_matches_the_likelihood_bound_term_by_term():
    """T * L_{t-1} of the loss (bits/dim) equals the bound's term of ``metrics.likelihood`` at the same x_t."""
    schedule = NoiseSchedule.from_name("cosine", 20)
    denoiser = gaussian_denoiser(0.5, torch.linspace(-0.5, 0.8, 20), schedule, dim=3)
    x0 = (torch.randint(0, 256, (2, 3)).double() / 127.5 - 1)
    terms = vlb_terms(denoiser, x0, seed=5)                                 # (2, T + 1) nats, summed over dims
    noise = PerSampleNoise(range(5, 7), "cpu")
    for t_index in range(len(schedule)):
        eps = noise.randn_like(x0)
        t = torch.full((2,), t_index)
        loss = vlb_loss(denoiser, x0, eps, schedule.sigmas[t], None, t)
        torch.testing.assert_close(loss, len(schedule) * terms[:, t_index] / (3 * math.log(2)))


def test_hybrid_loss_trains_the_mean_by_l_simple_and_the_variance_by_l_vlb():
    schedule = NoiseSchedule.from_name("cosine", 50)
    net = nn.Conv2d(1, 2, 3, padding=1).double()
    net_t = lambda x, t, cond=None: net(x)                                  # noqa: E731
    denoiser = Denoiser(net_t, VPPrecond(schedule, "eps"), learned_variance=True)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(8, 1, 6, 6, generator=g).double() * 2 - 1, torch.randn(8, 1, 6, 6, generator=g).double()
    t = torch.randint(0, 50, (8,), generator=g)

    def grads(loss_fn):
        net.zero_grad()
        loss_fn(denoiser, x0, noise, schedule.sigmas[t], None, t).mean().backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()]), [p.grad.clone() for p in net.parameters()]

    weight_grad = lambda g_: g_[1][0]                                       # noqa: E731  (2, 1, 3, 3)
    simple, hybrid, vlb = grads(simple_loss), grads(hybrid_loss), grads(vlb_loss)
    # The mean output (channel 0) gets only L_simple's gradient; the variance output only lambda * L_vlb's.
    torch.testing.assert_close(weight_grad(hybrid)[0], weight_grad(simple)[0])
    torch.testing.assert_close(weight_grad(hybrid)[1], 0.001 * weight_grad(vlb)[1])
    assert weight_grad(vlb)[0].abs().sum() > 0 and weight_grad(simple)[1].abs().sum() == 0


def test_importance_sampler_is_uniform_until_warm_then_proportional_to_rms_loss():
    sampler = ImportanceTimesteps(5, history=3)
    torch.testing.assert_close(sampler.probabilities(), UniformTimesteps(5).probabilities())
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5], dtype=torch.float64)
    for _ in range(2):
        sampler.update(torch.arange(5), losses)
    assert not sampler.warmed_up
    sampler.update(torch.arange(4), losses[:4])
    assert not sampler.warmed_up                                            # t = 4 has only 2 losses
    sampler.update(torch.tensor([4]), torch.tensor([0.5]))
    expected = losses / losses.sum() * (1 - 1e-3) + 1e-3 / 5
    torch.testing.assert_close(sampler.probabilities(), expected)
    # the ring buffer keeps the last 3 losses: at t = 0 now (5, 1, 1), root mean square 3
    sampler.update(torch.tensor([0]), torch.tensor([5.0]))
    assert sampler.losses[0].tolist() == [5.0, 1.0, 1.0]
    rms = torch.tensor([3.0, 2.0, 3.0, 4.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(sampler.probabilities(), rms / rms.sum() * (1 - 1e-3) + 1e-3 / 5)
    # weights 1 / (T p_t) make the weighted loss unbiased for the uniform mean, and draws follow p
    p = sampler.probabilities()
    t, weights = sampler.sample(200000, torch.Generator().manual_seed(0))
    torch.testing.assert_close((weights.double() * losses[t]).mean(), losses.mean(), rtol=0.02, atol=0)
    torch.testing.assert_close(torch.bincount(t, minlength=5).double() / len(t), p, atol=0.005, rtol=0)


def test_learned_variance_ancestral_sampling_of_unit_gaussian_with_v_one_equals_beta_variance():
    """With v = 1 the learned-variance chain is the fixed sigma^2 = beta chain, step for step."""
    schedule = SCHEDULE.respace(space_timesteps(100, 25))
    mixture = GaussianMixture(torch.zeros(1, 2), torch.tensor([1.0]))
    learned = Denoiser(WithVariance(ExactEpsNet(mixture, SCHEDULE), 1.0), VPPrecond(SCHEDULE, "eps"),
                       learned_variance=True)
    fixed = Denoiser(ExactEpsNet(mixture, SCHEDULE), VPPrecond(SCHEDULE, "eps"))
    x = PerSampleNoise(range(8), "cpu").randn((2,), torch.float64)
    a = sample_ancestral(learned, x, schedule, PerSampleNoise(range(8), "cpu"))             # no thresholding
    b = sample_ancestral(fixed, x, schedule, PerSampleNoise(range(8), "cpu"), variance="beta")
    torch.testing.assert_close(a, b)
    c = sample_ancestral(fixed, x, schedule, PerSampleNoise(range(8), "cpu"), variance="beta_tilde")
    assert not torch.allclose(a, c)


def test_hybrid_needs_a_learned_variance(tmp_path, image_folder):
    config = image_config(tmp_path / "run", image_folder)
    config.train.loss = "hybrid"
    with pytest.raises(DifflabError, match="learn_variance"):
        diffusion_trainer(config, progress=False)
    config.train.loss = "kl"
    with pytest.raises(DifflabError, match="train.loss"):
        diffusion_trainer(config, progress=False)
    with pytest.raises(ValueError):
        build_loss("kl")


def test_importance_sampled_vlb_training_resumes_bit_exactly(tmp_path, image_folder):
    def config(out, steps):
        c = image_config(out, image_folder, steps)
        c.diffusion.timesteps, c.diffusion.learn_variance, c.sample.steps = 4, True, 4
        c.train.loss, c.train.timestep_sampling, c.train.batch_size = "vlb", "importance", 8
        c.train.min_snr_gamma = None                                         # weights L_simple only
        return c

    full = diffusion_trainer(config(tmp_path / "full", 12), progress=False)
    full.run()
    diffusion_trainer(config(tmp_path / "split", 6), progress=False).run()
    second = diffusion_trainer(config(tmp_path / "split", 12), resume=True, progress=False)
    assert second.objective.levels.counts.sum() == 6 * 8
    second.run()
    assert_identical(parameters(full), parameters(second))
    full_levels, second_levels = full.objective.levels, second.objective.levels
    assert full_levels.warmed_up and torch.equal(full_levels.losses, second_levels.losses)
    assert not torch.allclose(full_levels.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    assert full.net.out_conv.out_channels == 6                              # eps and v for 3 channels


def test_a_learned_variance_model_samples_with_every_sampler_and_guidance():
    """Every sampler of the pipeline takes a learned-variance network (the ODE/score samplers use its mean
    channels), with classifier-free guidance and dynamic thresholding on top."""
    config = Config(data=DataConfig(dataset="fashion_mnist", image_size=8, conditional=True),
                    model=ModelConfig("unet", dict(model_channels=8, channel_mult=(1,), num_res_blocks=1,
                                                   attention_resolutions=(), groups=4)),
                    diffusion=DiffusionConfig(schedule="cosine", timesteps=50, learn_variance=True))
    # what the model is fitted to: Fashion-MNIST's shape and classes (the images themselves are not needed)
    data = InMemoryData(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), 10,
                        "fashion_mnist")
    torch.manual_seed(0)
    denoiser, spec = build_model(config, data)
    denoiser = denoiser.eval()
    for p in denoiser.net.out_conv.parameters():                      # non-zero eps and v outputs
        torch.nn.init.normal_(p, std=0.05)
    labels = torch.tensor([0, 1])
    for name in SAMPLERS:
        options = SampleConfig(sampler=name, steps=4, spacing="uniform", langevin_steps=1, guidance=1.0,
                               dynamic_threshold=0.99)
        out = sample(denoiser, 2, options, Cond(label=labels), spec=spec)
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all(), name
