"""Samplers against the exact Gaussian-mixture reference, and per-sample seeding."""

import pytest
import torch

from difflab.denoiser import Denoiser, VPPrecond
from difflab.metrics import sliced_wasserstein
from difflab.nets import UNet, UNetConfig
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import generate, sample_ancestral
from difflab.schedules import NoiseSchedule, space_timesteps

MIXTURE = GaussianMixture.ring(k=8, radius=1.5, std=0.15)


def exact_denoiser(schedule_name: str = "linear") -> Denoiser:
    schedule = NoiseSchedule.from_name(schedule_name, 1000)
    return Denoiser(ExactEpsNet(MIXTURE, schedule), VPPrecond(schedule, "eps"))


def draw(denoiser, steps, variance, n=3000):
    schedule = denoiser.precond.schedule.respace(space_timesteps(1000, steps))
    return generate(sample_ancestral, denoiser, schedule, (2,), list(range(n)), batch_size=n,
                    variance=variance).double()                 # not thresholded: D is not clipped


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ancestral_sampler_with_exact_model_reaches_the_mixture(schedule_name, variance):
    samples = draw(exact_denoiser(schedule_name), 1000, variance)
    reference = MIXTURE.sample(3000, torch.Generator().manual_seed(123))
    floor = sliced_wasserstein(MIXTURE.sample(3000, torch.Generator().manual_seed(7)), reference)
    distance = sliced_wasserstein(samples, reference)
    assert distance < 3 * floor + 0.01, (distance, floor)
    # log-likelihood of the samples matches that of true samples (too-wide or too-narrow samples fail)
    gap = MIXTURE.log_prob(samples).mean() - MIXTURE.log_prob(reference).mean()
    assert abs(gap.item()) < 0.1


def test_a_wrong_model_is_caught():
    # The same check fails for a model whose eps is off by 20%: the test is able to fail.
    class Scaled(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, cond=None):
            return 0.8 * self.net(x, t, cond)

    denoiser = exact_denoiser()
    denoiser.net = Scaled(denoiser.net)
    samples = draw(denoiser, 1000, "beta_tilde")
    reference = MIXTURE.sample(3000, torch.Generator().manual_seed(123))
    gap = MIXTURE.log_prob(samples).mean() - MIXTURE.log_prob(reference).mean()
    assert abs(gap.item()) > 0.1


def test_respaced_ancestral_sampling_with_100_steps_stays_close():
    samples = draw(exact_denoiser("cosine"), 100, "beta")
    reference = MIXTURE.sample(3000, torch.Generator().manual_seed(123))
    assert sliced_wasserstein(samples, reference) < 0.06


def test_same_seed_same_sample_whatever_the_batch_size():
    torch.manual_seed(0)
    net = UNet(UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                          image_size=8, groups=8))
    for p in net.parameters():         # non-zero output so that the network matters
        torch.nn.init.normal_(p, std=0.05)
    schedule = NoiseSchedule.from_name("linear", 1000)
    denoiser = Denoiser(net, VPPrecond(schedule)).eval()
    short = schedule.respace(space_timesteps(1000, 10))
    seeds = list(range(100, 106))
    a = generate(sample_ancestral, denoiser, short, (1, 8, 8), seeds, batch_size=6)
    b = generate(sample_ancestral, denoiser, short, (1, 8, 8), seeds, batch_size=4)
    c = generate(sample_ancestral, denoiser, short, (1, 8, 8), seeds[2:3], batch_size=1)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a[2:3], c, atol=1e-5)
    d = generate(sample_ancestral, denoiser, short, (1, 8, 8), [999], batch_size=1)
    assert not torch.allclose(a[0], d[0], atol=1e-2)
