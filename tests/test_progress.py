"""Progress bars that tell the truth: a time-budgeted run's bar counts the budget's seconds, a step-limited
run's bar its steps, and the sampling bar ticks once per sampler step of every batch."""

import sys

from difflab.denoiser import Denoiser, VPPrecond
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import build_sigmas, generate, prior_std, sample_heun
from difflab.schedules import NoiseSchedule
from difflab.train.diffusion import diffusion_trainer
from test_checkpoint import toy_config


def test_training_bar_total_is_the_budget_that_ends_the_run(tmp_path):
    timed = diffusion_trainer(toy_config(tmp_path / "a", steps=100000, **{"train.max_minutes": 0.5}))
    bar = timed.progress_bar()
    assert bar.total == 30 and bar.unit == "s"
    bar.close()
    counted = diffusion_trainer(toy_config(tmp_path / "b", steps=40))
    bar = counted.progress_bar()
    assert bar.total == 40 and bar.unit == "step"
    bar.close()


def test_sampling_bar_ticks_per_sampler_step(monkeypatch):
    ticks = []
    generate_module = sys.modules["difflab.samplers.generate"]

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0

        def update(self, k=1):
            self.n += k
            ticks.append(self.n)

        def close(self):
            pass

    monkeypatch.setattr(generate_module, "tqdm", Recorder)
    schedule = NoiseSchedule.from_name("linear", 1000)
    denoiser = Denoiser(ExactEpsNet(GaussianMixture.ring(), schedule), VPPrecond(schedule, "eps"))
    sigmas = build_sigmas(schedule, 6, "karras")
    generate(sample_heun, denoiser, sigmas, (2,), range(10), batch_size=4, prior_std=prior_std(sigmas))
    assert ticks == list(range(1, 6 * 3 + 1))             # 6 steps x 3 batches, one tick each
