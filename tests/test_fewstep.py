"""Few-step generators: progressive distillation and consistency models (CD, CT, iCT) and their sampler,
checked against closed forms, the papers' formulas and the exact Gaussian mixture."""

from __future__ import annotations

import math
import shutil

import numpy as np

import pytest
import torch
from torch import nn

from difflab.config import Config, DistillConfig, TrainConfig
from difflab.data import InMemoryData
from difflab.denoiser import ConsistencyPrecond, Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.metrics import sliced_wasserstein
from difflab.nets.mlp import MLP, MLPConfig
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import PerSampleNoise, generate, sample_consistency
from difflab.samplers.ddim import ddim_step
from difflab.schedules import NoiseSchedule
from difflab.train.consistency import (ConsistencyObjective, ReplayedRandomness, ct_levels, ct_target_ema, ict_level_probabilities,
                                       ict_levels, karras_levels, pseudo_huber)
from difflab.train.progressive import ProgressiveDistillationObjective, round_steps, trailing_sigmas
from difflab.train.trainer import Trainer

MIXTURE = GaussianMixture.ring(8, radius=1.5, std=0.15)
SCHEDULE = NoiseSchedule.from_name("linear", 1000)


def mlp(hidden: int, depth: int) -> MLP:
    return MLP(MLPConfig(dim=2, hidden=hidden, depth=depth))


def exact_denoiser(schedule: NoiseSchedule = SCHEDULE, mixture: GaussianMixture = MIXTURE) -> Denoiser:
    return Denoiser(ExactEpsNet(mixture, schedule), VPPrecond(schedule, "eps"))


# -- progressive distillation -------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 4, 64])
def test_progressive_target_reproduces_two_teacher_ddim_steps(steps):
    """Salimans & Ho 2022, Alg. 2: one student DDIM step to x~ lands where two teacher steps land, at every
    level of the grid (the last step's target is the teacher's x0 at the midpoint)."""
    teacher = exact_denoiser()
    objective = ProgressiveDistillationObjective(teacher, teacher, steps)
    g = torch.Generator().manual_seed(0)
    x0 = MIXTURE.sample(steps * 8, g).double()
    i = torch.arange(steps).repeat(8)
    sigma = objective.student_sigmas[i]
    x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    target = objective.target(x, i, None).double()
    noise = PerSampleNoise(list(range(len(x))))
    for k in range(len(x)):
        s, s_mid, s_next = (objective.teacher_sigmas[2 * i[k] + j].item() for j in range(3))
        two = ddim_step(teacher, ddim_step(teacher, x[k:k + 1], s, s_mid, noise), s_mid, s_next, noise)
        one = target[k:k + 1] + s_next / s * (x[k:k + 1] - target[k:k + 1])               # the student's step
        torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)
        if i[k] == steps - 1:                                                             # sigma'' = 0
            x_mid = ddim_step(teacher, x[k:k + 1], s, s_mid, noise)
            torch.testing.assert_close(target[k:k + 1], teacher(x_mid, s_mid), rtol=1e-6, atol=1e-6)


def test_progressive_grids_nest_and_start_from_pure_noise():
    precond = VPPrecond(NoiseSchedule.from_name("cosine", 1000), "v")
    for steps in (1, 2, 8, 256):
        student, teacher = trailing_sigmas(precond, steps), trailing_sigmas(precond, 2 * steps)
        assert torch.equal(teacher[::2], student) and len(student) == steps + 1 and student[-1] == 0
        assert student[0] == precond.schedule.sigmas[-1]                 # the last timestep: alpha-bar ~ 0
    assert round_steps(DistillConfig(start_steps=256, end_steps=1)) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    with pytest.raises(DifflabError, match="halved"):
        round_steps(DistillConfig(start_steps=12, end_steps=5))


def test_progressive_loss_weighting_is_v_mse():
    """'snr_plus_one' weighting of the x0 error is the MSE of v for a v-prediction student (Sec. 4)."""
    precond = VPPrecond(NoiseSchedule.from_name("cosine", 1000), "v")
    teacher = Denoiser(ExactEpsNet(MIXTURE, precond.schedule), VPPrecond(precond.schedule, "eps"))
    net = mlp(16, 2)
    student = Denoiser(net, precond)
    objective = ProgressiveDistillationObjective(student, teacher, 4)
    g = torch.Generator().manual_seed(1)
    batch = objective.draw(MIXTURE.sample(64, g).float(), None, g)
    loss = objective.loss(batch, net)
    sigma = objective.student_sigmas[batch.i]
    x = batch.x0 + sigma[:, None].float() * batch.noise
    target_x0 = objective.target(x, batch.i, None)
    abar = (1 / (1 + sigma ** 2))[:, None]
    xt, eps = x * abar.sqrt(), (x - target_x0) / sigma[:, None]              # VP x_t and eps of the target
    v_target = abar.sqrt() * eps - (1 - abar).sqrt() * target_x0
    v = net(xt.float(), precond.scalings(sigma)[3], None)
    torch.testing.assert_close(loss, (v - v_target).pow(2).mean(1).float(), rtol=1e-4, atol=1e-6)


# -- consistency models -------------------------------------------------------------------------------------
def test_ict_and_ct_schedules_equal_the_papers_formulas():
    # Song & Dhariwal 2023, Eq. 9 with K = 400,000, s0 = 10, s1 = 1280: K' = floor(400000 / 8) = 50,000
    assert [ict_levels(k, 400_000) for k in (0, 49_999, 50_000, 100_000, 349_999, 350_000, 399_999)] == \
        [11, 11, 21, 41, 641, 1281, 1281]
    # Song et al. 2023, App. C with s0 = 2, s1 = 150: N(0) = 2, N(K) = 151, mu(N = 2) = mu0
    assert ct_levels(0, 1000) == 2 and ct_levels(1000, 1000) == 151
    assert ct_levels(250, 1000) == math.ceil(math.sqrt(0.25 * (151 ** 2 - 4) + 4) - 1) + 1
    assert ct_target_ema(2) == pytest.approx(0.9) and ct_target_ema(151) == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    levels = karras_levels(11, 0.002, 80.0)
    assert levels[0].item() == pytest.approx(0.002) and levels[-1].item() == pytest.approx(80.0)
    assert (levels[1:] > levels[:-1]).all()
    p = ict_level_probabilities(levels, -1.1, 2.0)
    erf = torch.erf((levels.log() + 1.1) / (math.sqrt(2) * 2.0))
    torch.testing.assert_close(p, (erf[1:] - erf[:-1]) / (erf[-1] - erf[0]))
    a, b = torch.zeros(3, 784), torch.full((3, 784), 0.1)
    c = 0.00054 * math.sqrt(784)
    torch.testing.assert_close(pseudo_huber(a, b, c), torch.full((3,), math.sqrt(7.84 + c * c) - c))


class SpyNet(nn.Module):
    """A network that records its inputs (what the preconditioning fed it)."""

    def __init__(self):
        super().__init__()
        self.body, self.inputs = nn.Linear(3, 2), []

    def forward(self, x, t, cond=None):
        self.inputs.append((x.detach().clone(), torch.as_tensor(t).detach().clone()))
        return self.body(torch.cat([x, torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(len(x), 1)], 1))


def test_consistency_training_and_sampling_precondition_alike():
    """One preconditioning for both: the network sees the same c_in x and c_noise for the same (x, sigma) in
    the training loss and in the sampler (diffusers' iCT example scales them differently)."""
    net = SpyNet()
    student = Denoiser(net, ConsistencyPrecond(1.0, 0.002, 80.0))
    objective = ConsistencyObjective(student, "ict", 100)
    g = torch.Generator().manual_seed(0)
    batch = objective.draw(torch.randn(4, 2, generator=g), None, g)
    objective.loss(batch, net)
    trained_input, trained_noise = net.inputs[-1]                     # the student pass at sigma_{n+1}
    x_next = batch.x0 + batch.sigma_next[:, None].float() * batch.noise
    net.inputs.clear()
    for k in range(4):
        sample_consistency(student, x_next[k:k + 1], torch.tensor([batch.sigma_next[k].item(), 0.0], dtype=torch.float64),
                           PerSampleNoise([k]))
    torch.testing.assert_close(torch.cat([i for i, _ in net.inputs]), trained_input)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for _, t in net.inputs]), trained_noise.reshape(-1))


def test_student_and_target_passes_share_dropout_masks():
    """The target pass replays the random state of the student pass: with theta- = theta (iCT) at the same
    input the two give the same output under dropout, and fresh masks would not."""
    student = Denoiser(DropoutNet(mlp(32, 2)), ConsistencyPrecond(1.0, 0.002, 80.0)).train()
    for p in student.net.net.out.parameters():
        nn.init.normal_(p)                                                # not the zero-initialised output
    x, sigma = torch.randn(8, 2), torch.full((8,), 3.0, dtype=torch.float64)
    randomness = ReplayedRandomness(x.device)
    first = student(x, sigma)
    randomness.replay()
    assert torch.equal(student(x, sigma), first)
    assert not torch.equal(student(x, sigma), first)                    # fresh masks differ


class DropoutNet(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.dropout = net, nn.Dropout(0.5)

    def forward(self, x, t, cond=None):
        return self.net(self.dropout(x), t, cond)


def test_consistency_sampler_follows_algorithm_1():
    calls = []

    class Recorder(nn.Module):
        precond = ConsistencyPrecond(1.0, 0.002, 80.0)

        def forward(self, x, sigma, cond=None):
            calls.append((x.clone(), sigma))
            return torch.zeros_like(x)

    noise = PerSampleNoise([7])
    x = noise.randn((2,)) * 80.0
    sample_consistency(Recorder(), x, torch.tensor([80.0, 2.0, 0.5, 0.0]), noise)   # x: its first draw
    assert [s for _, s in calls] == [80.0, 2.0, 0.5]
    replay = PerSampleNoise([7])
    replay.randn((2,))
    torch.testing.assert_close(calls[1][0], math.sqrt(4 - 0.002 ** 2) * replay.randn_like(x))


def train_consistency(method: str, steps: int, tmp_path) -> Denoiser:
    """A 2-D MLP consistency model of the mixture, CD with the exact teacher (Heun), or CT/iCT."""
    schedule = SCHEDULE
    torch.manual_seed(0)
    data = InMemoryData(MIXTURE.sample(20000, torch.Generator().manual_seed(5)).float(), name="ring")
    precond = ConsistencyPrecond(data.data.std().item(), schedule.sigmas[0].item(), 80.0)
    student = Denoiser(mlp(128, 3), precond)
    teacher = exact_denoiser(schedule) if method == "cd" else None
    objective = ConsistencyObjective(student, method, steps, teacher, levels=18, target_ema=0.9)
    config = Config(train=TrainConfig(out_dir=str(tmp_path / method), steps=steps, batch_size=512, lr=2e-3,
                                      warmup_steps=20, ema_halflife_images=20000, ema_rampup_ratio=0.1,
                                      log_every=100, sample_every=10 ** 6, checkpoint_every=10 ** 6))
    trainer = Trainer(config, objective, data, progress=False)
    trainer.run()
    return student.with_net(trainer.ema.model)


def one_step_distance(model: Denoiser) -> float:
    seeds = list(range(4000))
    samples = generate(sample_consistency, model, torch.tensor([80.0, 0.0], dtype=torch.float64), (2,), seeds,
                       batch_size=4000, prior_std=80.0)
    truth = MIXTURE.sample(4000, torch.Generator().manual_seed(9))
    return sliced_wasserstein(samples.double(), truth.double(), 128, seed=0)


def test_consistency_distillation_learns_the_exact_mixture(tmp_path):
    """CD from the exact teacher: one step reaches the mixture within a measured sliced-Wasserstein distance
    that the untrained student is far from."""
    trained = one_step_distance(train_consistency("cd", 400, tmp_path))
    torch.manual_seed(0)
    untrained = one_step_distance(Denoiser(mlp(128, 3), ConsistencyPrecond(1.5, 0.01, 80.0)))
    print(f"one-step sliced W: trained {trained:.4f}, untrained {untrained:.4f}")
    assert trained < 0.15 < untrained


# -- end to end from the command line -----------------------------------------------------------------------
TOY = ["--set", "data.num_points=2000", "--set", "model.mlp.hidden=32", "--quiet"]


def test_progressive_rounds_resume_and_sample_from_the_cli(tmp_path, capsys):
    from difflab.cli import main
    from difflab.pipelines.ddpm import load_model

    teacher = tmp_path / "teacher"
    assert main(["train", "configs/toy.yaml", "--set", f"train.out_dir={teacher}", "--set", "train.steps=30", *TOY]) == 0
    out = tmp_path / "pd"
    distill = ["--set", "distill.method=progressive", "--set", f"distill.teacher={teacher}",
               "--set", "distill.start_steps=4", "--set", "distill.end_steps=1", "--set", "train.steps=5",
               "--set", f"train.out_dir={out}", *TOY]
    assert main(["train", "configs/toy.yaml", *distill]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["steps_0001", "steps_0002", "steps_0004"]
    student = load_model(out / "steps_0001")
    assert (student.config.sample.sampler, student.config.sample.steps, student.config.sample.spacing) == \
        ("ddim", 1, "trailing")
    # a lost last round is retrained from the round before; finished rounds are kept
    before = (out / "steps_0002" / "checkpoint.safetensors").read_bytes()
    shutil.rmtree(out / "steps_0001")
    capsys.readouterr()
    assert main(["train", "configs/toy.yaml", *distill, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "round of 4 steps: finished earlier" in err and "round of 2 steps: finished earlier" in err
    assert (out / "steps_0002" / "checkpoint.safetensors").read_bytes() == before
    assert (out / "steps_0001" / "checkpoint.safetensors").exists()
    # without --resume an occupied run folder is refused
    assert main(["train", "configs/toy.yaml", *distill]) == 2
    assert main(["sample", str(out / "steps_0001"), "--n", "20", "--out", str(tmp_path / "s")]) == 0


@pytest.mark.parametrize("method", ["ict", "ct"])
def test_consistency_training_from_the_cli(method, tmp_path, capsys):
    from difflab.cli import main

    out = tmp_path / method
    assert main(["train", "configs/toy.yaml", "--set", f"distill.method={method}", "--set", "diffusion.precond=consistency",
                 "--set", "diffusion.sigma_min=0.002", "--set", "diffusion.sigma_max=80", "--set", "train.steps=20",
                 "--set", "sample.sampler=consistency", "--set", "sample.steps=1", "--set", f"train.out_dir={out}",
                 *TOY]) == 0
    for steps in (1, 2, 4):
        assert main(["sample", str(out), "--n", "30", "--steps", str(steps), "--out", str(tmp_path / f"s{steps}")]) == 0
        assert np.isfinite(np.load(tmp_path / f"s{steps}" / "samples.npz")["points"]).all()


@pytest.mark.parametrize("method", ["ct", "cd"])
def test_consistency_runs_resume_exactly(method, tmp_path):
    """A run stopped at step 12 and resumed to 20 ends with the weights of one that ran 20 steps straight: the
    target network and the schedules' step are restored."""
    from difflab.checkpoint import load_checkpoint
    from difflab.config import load_config
    from difflab.train.diffusion import diffusion_trainer

    teacher = tmp_path / "teacher"
    if method == "cd":
        trainer = diffusion_trainer(load_config("configs/toy.yaml", ["train.steps=10", f"train.out_dir={teacher}",
                                                                     "data.num_points=2000", "model.mlp.hidden=32"]),
                                    progress=False)
        trainer.run()
    overrides = [f"distill.method={method}", "diffusion.precond=consistency", "diffusion.sigma_min=0.002",
                 "train.steps=20", "data.num_points=2000", "model.mlp.hidden=32", f"distill.teacher={teacher}"]

    def run(name: str, stop_at: int | None = None):
        config = load_config("configs/toy.yaml", [*overrides, f"train.out_dir={tmp_path / name}"])
        trainer = diffusion_trainer(config, progress=False)
        if stop_at is None:
            return trainer.run().checkpoint
        while trainer.step < stop_at:
            trainer.train_step()
        trainer.save()
        return diffusion_trainer(config, resume=True, progress=False).run().checkpoint

    straight, resumed = load_checkpoint(run("straight")), load_checkpoint(run("resumed", stop_at=12))
    assert any(k.startswith("train.target.") for k in straight.tensors)
    for key, value in straight.tensors.items():
        assert torch.equal(value, resumed.tensors[key]), key


def test_tune_grid_and_sample_with_it_from_the_cli(tmp_path, capsys):
    """`difflab tune-grid` writes a grid beside the run; `difflab sample --grid` samples with it."""
    from difflab.cli import main
    from difflab.pipelines.grid_search import load_grid

    run = tmp_path / "toy"
    assert main(["train", "configs/toy.yaml", "--set", f"train.out_dir={run}", "--set", "train.steps=30", *TOY]) == 0
    assert main(["tune-grid", str(run), "--sampler", "dpmpp-2m", "--nfe", "3", "--n", "32",
                 "--reference-steps", "20", "--quiet"]) == 0
    sampler, sigmas = load_grid(run / "grids" / "dpmpp-2m_nfe3.json")
    assert sampler == "dpmpp-2m" and len(sigmas) == 3
    capsys.readouterr()
    assert main(["sample", str(run), "--grid", str(run / "grids" / "dpmpp-2m_nfe3.json"), "--n", "10",
                 "--out", str(tmp_path / "s")]) == 0
    assert "dpmpp-2m sampler, grid" in capsys.readouterr().err
    assert main(["sample", str(run), "--grid", str(tmp_path / "missing.json"), "--n", "10"]) == 2
