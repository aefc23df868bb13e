import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule, cosine_betas, linear_betas, space_timesteps


def test_linear_schedule_end_points():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.all(betas[1:] > betas[:-1])


def test_cosine_schedule_matches_paper_formula():
    # Nichol & Dhariwal 2021, Eq. 17: alpha-bar_t = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)
    T, s = 1000, 0.008
    schedule = NoiseSchedule.from_betas(cosine_betas(T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (1, 10, 250, 500, 900):
        assert schedule.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert schedule.betas.max().item() <= 0.999
    assert schedule.betas[-1].item() == pytest.approx(0.999)   # clipped at the end, as in the paper


def test_derived_quantities_are_consistent():
    s = NoiseSchedule.from_name("linear", 1000)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    assert s.alphas_cumprod_prev[0] == 1.0
    assert torch.allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    # beta-tilde lies between 0 and beta
    assert torch.all(s.posterior_variance <= s.betas) and s.posterior_variance[0] == 0
    assert torch.isfinite(s.posterior_log_variance_clipped).all()


def test_respacing_keeps_alphas_cumprod_of_kept_steps():
    s = NoiseSchedule.from_name("cosine", 1000)
    keep = space_timesteps(1000, 50)
    r = s.respace(keep)
    assert len(r) == 50 and r.timesteps.tolist() == keep
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[keep], rtol=1e-12)
    assert keep[0] == 0 and keep[-1] == 999


def test_space_timesteps_sections():
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    assert sum(t < 100 for t in kept) == 10 and sum(100 <= t < 200 for t in kept) == 15
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(DifflabError):
        space_timesteps(100, "50,abc")
    with pytest.raises(DifflabError):
        space_timesteps(100, 0)
