"""Fast samplers (DDIM, Euler, Heun, DPM-Solver++(2M), Euler ancestral) against the exact Gaussian mixture,
cross-checked against each other, against DDPM's ancestral sampler and against diffusers."""

import math

import pytest
import torch

from difflab.adapters import from_callable, from_diffusers
from difflab import diffusion
from difflab.build import build_data
from difflab.config import Config, DataConfig, SampleConfig
from difflab.denoiser import Denoiser, VPPrecond, sigma_to_t, t_to_sigma
from difflab.errors import DifflabError
from difflab.guidance import Thresholded
from difflab.metrics import sliced_wasserstein
from difflab.model import ModelSpec
from difflab.pipelines.ddpm import sample
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import (SAMPLERS, CountingModel, PerSampleNoise, build_sigmas, ddim_invert, prior_std,
                              sample_ancestral, sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun, slerp)
from difflab.schedules import NoiseSchedule, space_timesteps

MIXTURE = GaussianMixture.ring(k=8, radius=1.5, std=0.15)
SCHEDULE = NoiseSchedule.from_name("linear", 1000)
N = 2000
REFERENCE = MIXTURE.sample(N, torch.Generator().manual_seed(123))
FLOOR = sliced_wasserstein(MIXTURE.sample(N, torch.Generator().manual_seed(7)), REFERENCE)
TRUE_LOGLIK = MIXTURE.log_prob(MIXTURE.sample(200_000, torch.Generator().manual_seed(11))).mean().item()
SIGMA_SAMPLERS = [name for name in SAMPLERS if name != "ancestral"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny 2-D batches (conftest.py)


EXACT = Denoiser(ExactEpsNet(MIXTURE, SCHEDULE), VPPrecond(SCHEDULE, "eps"))
MODEL = EXACT                          # the Denoiser is D(x; sigma) itself


def run(sampler, steps, spacing="karras", n=N, model=MODEL, seed=0, **kwargs):
    """Samples (float64) and the number of network evaluations of one batch of n."""
    counting = CountingModel(model)
    sigmas = build_sigmas(SCHEDULE, steps, spacing)
    noise = PerSampleNoise(range(seed, seed + n))
    x = noise.randn((2,), torch.float64) * prior_std(sigmas)
    return sampler(counting, x, sigmas, noise, **kwargs), counting.nfe


def assert_reaches_mixture(samples):
    """Close in sliced Wasserstein, and the mean log-likelihood under the mixture is that of true samples
    (within 0.1 nats: 2000 true samples are within +-0.05; too wide or too narrow samples fail)."""
    distance = sliced_wasserstein(samples, REFERENCE)
    assert distance < 3 * FLOOR + 0.01, (distance, FLOOR)
    gap = MIXTURE.log_prob(samples).mean().item() - TRUE_LOGLIK
    assert abs(gap) < 0.1, gap


# -- every sampler reaches the mixture ----------------------------------------------------------------------
@pytest.mark.parametrize("name, steps, spacing, kwargs", [
    ("ddim", 100, "uniform", {}),
    ("ddim", 200, "uniform", {"eta": 0.5}),
    ("euler", 200, "karras", {}),
    ("heun", 30, "karras", {}),
    ("heun", 50, "karras", {"s_churn": 10.0, "s_tmin": 0.05, "s_tmax": 50.0}),
    ("dpmpp-2m", 40, "karras", {}),
    ("dpmpp-2m", 30, "logsnr", {}),
    ("euler-ancestral", 200, "karras", {}),
])
def test_sampler_reaches_the_mixture(name, steps, spacing, kwargs):
    samples, _ = run(SAMPLERS[name], steps, spacing, **kwargs)
    assert_reaches_mixture(samples)


def test_too_few_steps_are_caught():
    # the same checks fail for Euler at 5 steps: they are able to fail
    samples, _ = run(sample_euler, 5, "uniform")
    with pytest.raises(AssertionError):
        assert_reaches_mixture(samples)


# -- ODE solvers converge at their order to the exact probability-flow ODE solution -------------------------
@pytest.mark.parametrize("sampler, order", [(sample_euler, 1), (sample_heun, 2), (sample_dpmpp_2m, 2)])
def test_ode_solvers_converge_at_their_order(sampler, order):
    exact, _ = run(sample_heun, 400, n=300)
    errors = [(run(sampler, steps, n=300)[0] - exact).norm(dim=1).mean().item() for steps in (40, 80)]
    rate = math.log2(errors[0] / errors[1])
    assert order - 0.35 < rate < order + 0.6, (errors, rate)


def test_ddim_eta_zero_is_euler_and_the_first_dpm_solver_step():
    sigmas = build_sigmas(SCHEDULE, 12, "karras")
    x = PerSampleNoise(range(50)).randn((2,), torch.float64) * prior_std(sigmas)
    noise = PerSampleNoise(range(50))
    assert torch.allclose(sample_ddim(MODEL, x, sigmas, noise), sample_euler(MODEL, x, sigmas, noise), atol=1e-12)
    two = sigmas[[0, 1]]           # one step without reaching 0: DPM-Solver++(2M) starts with DDIM
    assert torch.allclose(sample_dpmpp_2m(MODEL, x, two, noise), sample_ddim(MODEL, x, two, noise), atol=1e-12)


# -- DDIM with eta = 1 is DDPM's ancestral sampler ----------------------------------------------------------
@pytest.mark.parametrize("steps", [50, "10,10,20"])
def test_ddim_eta_one_equals_ancestral_with_the_same_noise(steps):
    denoiser = Denoiser(ExactEpsNet(MIXTURE, SCHEDULE), VPPrecond(SCHEDULE, "eps"))
    respaced = SCHEDULE.respace(space_timesteps(1000, steps))
    sigmas = build_sigmas(SCHEDULE, steps, "uniform")
    seeds = range(300)
    x_t = PerSampleNoise(seeds).randn((2,), torch.float64)
    noise = PerSampleNoise(seeds)
    noise.randn((2,), torch.float64)                                       # the draw of x_T
    ancestral = sample_ancestral(denoiser, x_t, respaced, noise, variance="beta_tilde")      # no clipping
    noise = PerSampleNoise(seeds)
    noise.randn((2,), torch.float64)
    ddim = sample_ddim(denoiser, x_t * prior_std(sigmas), sigmas, noise, eta=1.0)
    assert torch.allclose(ddim, ancestral, atol=1e-8), (ddim - ancestral).abs().max()
    noise = PerSampleNoise(seeds)
    noise.randn((2,), torch.float64)
    ddim_half = sample_ddim(denoiser, x_t * prior_std(sigmas), sigmas, noise, eta=0.5)
    assert not torch.allclose(ddim_half, ancestral, atol=1e-2)


# -- DDIM inversion and interpolation -----------------------------------------------------------------------
def test_ddim_inversion_round_trip():
    x0 = MIXTURE.sample(N, torch.Generator().manual_seed(5))
    errors = []
    for steps in (50, 200):
        sigmas = build_sigmas(SCHEDULE, steps, "uniform")
        latents = ddim_invert(MODEL, x0, sigmas)
        back = sample_ddim(MODEL, latents, sigmas, PerSampleNoise(range(N)))
        errors.append((back - x0).norm(dim=1))
    assert errors[1].mean() < 0.02 and errors[1].max() < 0.1, (errors[1].mean(), errors[1].max())
    assert errors[1].mean() < errors[0].mean() / 3                     # first order: 4x the steps
    x_t = latents / prior_std(sigmas)                    # the VP latent: the inversion maps data to N(0, I)
    assert x_t.mean(0).abs().max() < 0.05 and (x_t.std(0) - 1).abs().max() < 0.05, (x_t.mean(0), x_t.std(0))


def test_slerp():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    assert torch.allclose(slerp(z0, z1, 0.0), z0, atol=1e-6) and torch.allclose(slerp(z0, z1, 1.0), z1, atol=1e-6)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([[1.0, 1.0]]) / math.sqrt(2))  # stays on the circle
    mid = slerp(z0, z1, torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert torch.allclose(mid[0], z0[0], atol=1e-6) and torch.allclose(mid[3], z1[3], atol=1e-6)
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)                                 # parallel: linear


# -- network evaluations and randomness ---------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_network_evaluations(steps):
    expected = {"ddim": steps, "euler": steps, "heun": 2 * steps - 1, "dpmpp-2m": steps, "unipc": steps,
                "euler-ancestral": steps, "consistency": steps,
                "langevin": 10 * steps + 1, "pc": 2 * steps}       # their defaults: 10 and 1 Langevin steps per level
    for name in SIGMA_SAMPLERS:
        assert run(SAMPLERS[name], steps, n=4)[1] == expected[name], name
    assert run(sample_heun, steps, n=4, s_churn=5.0)[1] == 2 * steps - 1
    counting = CountingModel(EXACT)
    respaced = SCHEDULE.respace(space_timesteps(1000, steps))
    sample_ancestral(counting, torch.zeros(4, 2), respaced, PerSampleNoise(range(4)))
    assert counting.nfe == steps


def test_churn_only_within_its_sigma_range_and_per_sample_noise():
    plain, _ = run(sample_heun, 10, n=20)
    outside, _ = run(sample_heun, 10, n=20, s_churn=10.0, s_tmin=1e4)
    churned, _ = run(sample_heun, 10, n=20, s_churn=10.0)
    assert torch.equal(plain, outside) and not torch.allclose(plain, churned, atol=1e-3)
    for name in ("euler-ancestral", "heun"):                # a sample depends on its seed, not on the batch
        kwargs = {"s_churn": 10.0} if name == "heun" else {}
        batch, _ = run(SAMPLERS[name], 10, n=6, seed=100, **kwargs)
        alone, _ = run(SAMPLERS[name], 10, n=1, seed=103, **kwargs)
        assert torch.allclose(batch[3:4], alone, atol=1e-12)


# -- schedules of sigmas ------------------------------------------------------------------------------------
def test_sigma_grids():
    karras = build_sigmas(SCHEDULE, 10, "karras")
    assert len(karras) == 11 and karras[-1] == 0 and bool((karras[:-1].diff() < 0).all())
    assert math.isclose(karras[0], SCHEDULE.sigmas[-1]) and math.isclose(karras[-2], SCHEDULE.sigmas[0])
    # Karras et al. 2022, Eq. 5: sigma^(1/rho) is linear in i
    assert torch.allclose((karras[:-1] ** (1 / 7)).diff(), (karras[:-1] ** (1 / 7)).diff()[0].expand(9))
    # diffusers' DDIMScheduler timesteps for 10 of 1000 steps
    expected = {"uniform": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
                "leading": [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
                "trailing": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]}
    for spacing, timesteps in expected.items():
        assert torch.equal(build_sigmas(SCHEDULE, 10, spacing), torch.cat([SCHEDULE.sigmas[timesteps],
                                                                           torch.zeros(1, dtype=torch.float64)]))
    logsnr = build_sigmas(SCHEDULE, 10, "logsnr")       # Lu et al. 2022: uniform in lambda = -log sigma
    assert torch.allclose(logsnr[:-1].log().diff(), logsnr[:-1].log().diff()[0].expand(9))
    assert math.isclose(logsnr[0], SCHEDULE.sigmas[-1]) and math.isclose(logsnr[-2], SCHEDULE.sigmas[0])
    for spacing in ("karras", "logsnr"):
        ranged = build_sigmas(SCHEDULE, 6, spacing, sigma_min=0.05, sigma_max=10.0)
        assert math.isclose(ranged[0], 10.0) and math.isclose(ranged[-2], 0.05) and ranged[-1] == 0
    with pytest.raises(DifflabError):
        build_sigmas(SCHEDULE, 10, "trailing", sigma_min=0.05)
    with pytest.raises(DifflabError):
        build_sigmas(SCHEDULE, 10, "sideways")
    with pytest.raises(DifflabError):
        build_sigmas(SCHEDULE, "10,10", "karras")


# -- the adapter from discrete networks to D(x; sigma) ------------------------------------------------------
def test_sigma_to_t_is_exact_at_the_steps_and_inverts_t_to_sigma():
    log_sigmas = SCHEDULE.sigmas.log()
    t = torch.arange(1000)
    assert torch.equal(sigma_to_t(log_sigmas, SCHEDULE.sigmas), t.double())
    real_t = torch.linspace(0, 999, 777, dtype=torch.float64)
    assert torch.allclose(sigma_to_t(log_sigmas, t_to_sigma(log_sigmas, real_t)), real_t, atol=1e-8)
    assert sigma_to_t(log_sigmas, torch.tensor([1e-5, 1e5])).tolist() == [0.0, 999.0]   # clamped


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_sigma_denoiser_matches_the_discrete_denoiser_at_its_steps(prediction):
    def net(x, t):                                      # any smooth function of (x, t)
        return torch.sin(x * 1.3 + t[:, None] / 300.0) + 0.1 * x

    denoiser = from_callable(net, SCHEDULE.betas, prediction)
    t = torch.tensor([0, 10, 500, 999])
    x_vp = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    abar = SCHEDULE.alphas_cumprod[t][:, None]
    x0 = denoiser(x_vp / abar.sqrt(), SCHEDULE.sigmas[t])
    # the discrete denoiser's x0 at integer t: the network's output at (x_vp, t) converted at alpha-bar_t
    output = net(x_vp, t)
    discrete = {"eps": lambda: diffusion.x0_from_eps(x_vp, abar, output), "x0": lambda: output,
                "v": lambda: diffusion.x0_from_v(x_vp, abar, output)}[prediction]()
    assert torch.allclose(x0, discrete, atol=1e-9)
    clipped = Thresholded(denoiser)(x_vp / abar.sqrt(), SCHEDULE.sigmas[t])
    assert clipped.abs().max() <= 1


def test_sampling_a_diffusers_unet_matches_diffusers_ddim():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    for prediction in ("epsilon", "v_prediction", "sample"):
        scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                            set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                                            prediction_type=prediction)
        scheduler.set_timesteps(8)
        x_t = PerSampleNoise(range(3)).randn((1, 8, 8))
        x = x_t
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        denoiser = from_diffusers(unet, scheduler)
        sigmas = build_sigmas(denoiser.precond.schedule, 8, "leading")
        ours = sample_ddim(denoiser, x_t * prior_std(sigmas), sigmas, PerSampleNoise(range(3)))
        assert torch.allclose(ours, x, atol=1e-4), (prediction, (ours - x).abs().max())
        assert x.abs().max() > 0.1


# -- the pipeline runs every registered sampler by name ------------------------------------------------------
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_pipeline_samples_by_name(name):
    config = Config(data=DataConfig(dataset="toy"))
    options = SampleConfig(sampler=name, steps=50 if name != "euler-ancestral" else 100, spacing="logsnr",
                           sigma_min=0.02, batch_size=700, step_size=4e-4)   # langevin: epsilon for sigma_L = 0.02
    spec = ModelSpec("exact", {}, EXACT.precond.to_json(), build_data(config.data).sample_shape,
                     data_range=None)                                 # toy points: not clipped
    samples = sample(EXACT, 1000, options, spec=spec).double()
    assert samples.shape == (1000, 2)
    assert sliced_wasserstein(samples, REFERENCE) < 0.06


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_unipc_matches_diffusers_unipc_with_the_exact_model(steps):
    """UniP-2 + UniC (bh2, data prediction) step for step as diffusers' UniPCMultistepScheduler (trailing)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, trained_betas=SCHEDULE.betas.numpy(),
                                                  timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    net = ExactEpsNet(MIXTURE, SCHEDULE)
    x_t = PerSampleNoise(range(64)).randn((2,), torch.float64)
    x = x_t * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.expand(64)), t, x).prev_sample
    sigmas = build_sigmas(SCHEDULE, steps, "trailing")
    ours = SAMPLERS["unipc"](MODEL, x_t * prior_std(sigmas), sigmas, PerSampleNoise(range(64)))
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)
    plain = SAMPLERS["dpmpp-2m"](MODEL, x_t * prior_std(sigmas), sigmas, PerSampleNoise(range(64)))
    assert (plain - x).abs().max() > 1e-3                                   # the corrector changes the result
