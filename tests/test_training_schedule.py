"""Learning-rate schedules over a run (steps or time budget) and the Min-SNR-gamma loss weighting."""

import math

import pytest
import torch

from difflab import diffusion
from difflab.checkpoint import load_checkpoint
from difflab.denoiser import Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.losses import build_loss, min_snr_weight
from difflab.schedules import NoiseSchedule
from difflab.train.diffusion import diffusion_trainer
from difflab.train.trainer import lr_multiplier

from test_checkpoint import assert_identical, interrupt_at, parameters, toy_config


def test_lr_multiplier_warms_up_then_decays_to_zero():
    assert lr_multiplier("constant", 0, 10, 0.9) == pytest.approx(0.1)
    assert lr_multiplier("constant", 50, 10, 0.9) == 1.0
    assert lr_multiplier("cosine", 50, 10, 0.5) == pytest.approx(0.5)
    assert lr_multiplier("cosine", 50, 10, 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier("linear", 50, 10, 0.25) == pytest.approx(0.75)
    for schedule in ("cosine", "linear"):
        assert lr_multiplier(schedule, 50, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
        assert lr_multiplier(schedule, 50, 10, 1.7) == pytest.approx(0.0, abs=1e-12)   # past the budget
        assert lr_multiplier(schedule, 4, 10, 0.0) == pytest.approx(0.5)                # warm-up still applies


def test_cosine_schedule_over_steps_reaches_the_logged_rates(tmp_path):
    trainer = diffusion_trainer(toy_config(tmp_path / "run", steps=20, **{"train.lr_schedule": "cosine",
                                                                            "train.warmup_steps": 1}),
                                progress=False)
    trainer.run()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        trainer.config.train.lr * 0.5 * (1 + math.cos(math.pi * 19 / 20)))


def test_time_budget_counts_over_resumed_invocations(tmp_path):
    first = diffusion_trainer(toy_config(tmp_path / "run", steps=5, **{"train.lr_schedule": "linear"}),
                              progress=False)
    first.run()
    seconds = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").state["train_seconds"]
    assert seconds > 0
    # A budget already spent by the first invocation: the resumed run stops after its first step.
    budget = seconds / 60 / 2
    second = diffusion_trainer(toy_config(tmp_path / "run", steps=40, **{"train.max_minutes": budget,
                                                                         "train.lr_schedule": "linear"}),
                               resume=True, progress=False)
    result = second.run()
    assert (result.step, result.stopped_by) == (6, "time")
    assert second.run_fraction(result.step) > 1 and second.lr_at(result.step) == 0.0
    assert load_checkpoint(result.checkpoint).state["train_seconds"] > seconds


def test_unknown_schedule_and_bad_min_snr_gamma_are_named(tmp_path):
    with pytest.raises(DifflabError, match="train.lr_schedule"):
        diffusion_trainer(toy_config(tmp_path / "a", **{"train.lr_schedule": "step"}), progress=False)
    with pytest.raises(DifflabError, match="train.min_snr_gamma"):
        diffusion_trainer(toy_config(tmp_path / "b", **{"train.min_snr_gamma": -1}), progress=False)


class X0Net(torch.nn.Module):
    """A fixed x0 guess, reported as the prediction ``kind`` asks for: eps, x0 or v of the same guess."""

    def __init__(self, schedule: NoiseSchedule, kind: str):
        super().__init__()
        self.schedule, self.kind = schedule, kind

    def forward(self, xt, t, cond=None):
        # the denoiser passes c_noise, the (real-valued) timestep of sigma: integer-valued at schedule.sigmas[t]
        abar = diffusion.extract(self.schedule.alphas_cumprod, t.round().long(), xt)
        x0_hat = torch.tanh(0.7 * xt + 0.1)
        eps_hat = diffusion.eps_from_x0(xt, abar, x0_hat)
        if self.kind == "x0":
            return x0_hat
        if self.kind == "eps":
            return eps_hat
        return abar.sqrt() * eps_hat - (1 - abar).sqrt() * x0_hat           # v (Salimans & Ho 2022)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weighting_gives_every_prediction_the_same_clamped_x0_loss(gamma):
    """Hang et al. 2023: the weighted loss is min(SNR_t, gamma) ||x0 - x0_hat||^2 whatever the network predicts."""
    schedule = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    xt = diffusion.q_sample(schedule, x0, t, noise)
    abar = schedule.alphas_cumprod[t]
    expected = (abar / (1 - abar)).clamp(max=gamma) * ((torch.tanh(0.7 * xt + 0.1) - x0) ** 2).flatten(1).mean(1)
    loss = build_loss("simple", min_snr_gamma=gamma)
    for kind in ("eps", "x0", "v"):
        denoiser = Denoiser(X0Net(schedule, kind), VPPrecond(schedule, prediction=kind))
        torch.testing.assert_close(loss(denoiser, x0, noise, schedule.sigmas[t], None, t).double(), expected,
                                   rtol=1e-5, atol=1e-7)
    # and the weight itself, for eps: min(SNR, gamma) / SNR, which is 1 at and below SNR = gamma
    weight = min_snr_weight(Denoiser(X0Net(schedule, "eps"), VPPrecond(schedule)), schedule.sigmas[t], gamma)
    snr = abar / (1 - abar)
    assert torch.all(weight[snr <= gamma] == 1) and torch.all(weight[snr > gamma] < 1)


def test_cosine_decay_over_steps_resumes_bit_exactly(tmp_path, monkeypatch):
    """Without a time budget the rate is a function of the step: an interrupted run resumes exactly."""
    extra = {"train.lr_schedule": "cosine", "train.warmup_steps": 3}
    full = diffusion_trainer(toy_config(tmp_path / "full", steps=20, **extra), progress=False)
    full.run()
    interrupt_at(diffusion_trainer(toy_config(tmp_path / "split", steps=20, **extra), progress=False), 9,
                 monkeypatch)
    second = diffusion_trainer(toy_config(tmp_path / "split", steps=20, **extra), resume=True, progress=False)
    assert second.step == 9
    second.run()
    assert_identical(parameters(full), parameters(second))
