"""The core interface: D(x; sigma, cond) with named preconditionings, the condition record, guidance as
wrappers of D, pluggable objectives, models saved as a whole, and the layers' one-way imports."""

import ast
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from difflab import diffusion
from difflab.conditioning import ClassLabel, Cond, Condition, drop_conditions, with_null
from difflab.denoiser import (ConsistencyPrecond, Denoiser, EDMPrecond, VPPrecond, precond_from_json, sigma_to_t,
                              split_output)
from difflab.errors import DifflabError
from difflab.guidance import ClassifierFreeGuidance
from difflab.losses import simple_loss
from difflab.noise import PerSampleNoise
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import build_sigmas, prior_std, sample_ancestral, sample_dpmpp_2m, sample_heun
from difflab.schedules import NoiseSchedule
from difflab.train.objectives import DiffusionObjective
from difflab.train.timesteps import LogNormalSigmas, UniformTimesteps

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"


# -- the layers' imports ----------------------------------------------------------------------------------------
def imports_of(path: Path) -> set[str]:
    """Every difflab module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("difflab"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("difflab"))
    return names


def files_under(part: str) -> list[Path]:
    target = SRC / part
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("importer, forbidden", [
    ("", "difflab.cli"),                         # nothing imports the CLI
    ("train", "difflab.pipelines"),              # training knows nothing of sampling pipelines
    ("metrics", "difflab.samplers"),             # metrics know nothing of samplers
    ("config.py", "difflab.nets"),               # the config does not import networks (a registry does)
    ("nets", "difflab.denoiser"),                # networks know nothing of diffusion
    ("nets", "difflab.diffusion"),
    ("nets", "difflab.samplers"),
    ("samplers", "difflab.train"),               # samplers know nothing of training
])
def test_imports_point_one_way(importer, forbidden):
    offenders = [f"{path.relative_to(SRC)} imports {name}"
                 for path in files_under(importer) if path.name != "__main__.py" and path.name != "cli.py"
                 for name in imports_of(path) if name == forbidden or name.startswith(forbidden + ".")]
    assert not offenders, offenders


# -- preconditionings --------------------------------------------------------------------------------------------
SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)


def test_edm_preconditioning_is_karras_table_1():
    sd = 0.7
    c_skip, c_out, c_in, c_noise = EDMPrecond(sigma_data=sd).scalings(SIGMAS)
    for i, s in enumerate(SIGMAS.tolist()):
        assert c_skip[i].item() == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-12)
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12)


def test_edm_loss_is_lambda_times_the_denoising_error():
    """Karras et al. 2022, Eq. 8 / Table 1: lambda(sigma) ||D - x0||^2 with lambda = (s^2 + sd^2) / (s sd)^2."""
    sd = 0.6
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    denoiser = Denoiser(WithNoise(net), EDMPrecond(sigma_data=sd))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    sigma = SIGMAS
    loss = simple_loss(denoiser, x0, noise, sigma)
    d = denoiser(x0 + sigma[:, None].float() * noise, sigma)
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    expected = weight.float() * ((d - x0) ** 2).mean(1)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_vp_preconditioning_matches_table_1_and_the_closed_form_conversions(prediction):
    schedule = NoiseSchedule.from_name("cosine", 1000)
    c_skip, c_out, c_in, c_noise = VPPrecond(schedule, prediction).scalings(SIGMAS)
    torch.testing.assert_close(c_in, 1 / (SIGMAS ** 2 + 1).sqrt())
    # D = c_skip x + c_out F equals the x0 of Ho et al. / Salimans & Ho for output F at x_t = c_in x
    x, f = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    abar = (1 / (1 + SIGMAS ** 2))[:, None]
    xt = x * abar.sqrt()
    x0 = {"eps": diffusion.x0_from_eps(xt, abar, f), "x0": f, "v": diffusion.x0_from_v(xt, abar, f)}[prediction]
    torch.testing.assert_close(c_skip[:, None] * x + c_out[:, None] * f, x0)
    # c_noise is the fractional timestep, exactly t on the schedule's own levels
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(VPPrecond(schedule, prediction).scalings(schedule.sigmas[t])[3], t.double())


def test_consistency_boundary_condition_is_exact():
    """Song et al. 2023, App. C: c_skip(sigma_min) = 1, c_out(sigma_min) = 0, so f(x, sigma_min) = x."""
    precond = ConsistencyPrecond(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    c_skip, c_out, _, _ = precond.scalings(torch.tensor([0.002], dtype=torch.float64))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    denoiser = Denoiser(WithNoise(nn.Sequential(nn.Flatten(), nn.Linear(4, 4))), precond)
    x = torch.randn(5, 4)
    assert torch.equal(denoiser(x, 0.002), x)
    assert not torch.allclose(denoiser(x, 0.5), x)


def test_preconditionings_round_trip_through_json():
    schedule = NoiseSchedule.from_name("linear", 100)
    for precond in (VPPrecond(schedule, "v"), EDMPrecond(0.7, 0.01, 50.0), ConsistencyPrecond(0.5)):
        again = precond_from_json(precond.to_json())
        for a, b in zip(precond.scalings(SIGMAS), again.scalings(SIGMAS)):
            assert torch.equal(a, b)


# -- guidance on D equals the old formulas ---------------------------------------------------------------------
class WithNoise(nn.Module):
    """net(x, t, cond) around a module of x alone, with a dependence on t and on the label (if any)."""

    def __init__(self, body: nn.Module, classes: int = 0):
        super().__init__()
        self.body = body
        self.label = nn.Embedding(classes + 1, 4) if classes else None
        self.consumes = ("label",) if classes else ()

    def forward(self, x, t, cond=None):
        h = self.body(x) + 0.01 * torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        if self.label is not None:
            y = cond.get("label") if cond is not None else None
            y = y if y is not None else torch.full((x.shape[0],), self.label.num_embeddings - 1)
            h = h + self.label(y)
        return h


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_cfg_on_the_denoiser_equals_the_old_formula(prediction):
    """Ho & Salimans 2021, Eq. 6 on the network output, F~ = (1 + w) F(c) - w F(null), converted to x0 as the
    old network-level wrapper did, equals D_u + (1 + w)(D_c - D_u)."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.from_name("cosine", 1000)
    net = WithNoise(nn.Linear(4, 4), classes=3)
    label = ClassLabel("label", 0.1, 3)
    denoiser = Denoiser(net, VPPrecond(schedule, prediction), {"label": label})
    w, x, sigma = 2.5, torch.randn(5, 4), torch.tensor([0.1, 0.7, 2.0, 9.0, 60.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    guided = ClassifierFreeGuidance(denoiser, w)(x, sigma, Cond(label=labels))
    # the old path: raw outputs at x_t = x sqrt(abar), integer-or-fractional t, the guided output converted
    abar = (1 / (1 + sigma ** 2)).float()[:, None]
    xt, t = x * abar.sqrt(), sigma_to_t(schedule.sigmas.log(), sigma)
    f = (1 + w) * net(xt, t, {"label": labels}) - w * net(xt, t, {"label": torch.full_like(labels, 3)})
    old = {"eps": diffusion.x0_from_eps(xt, abar, f), "x0": f, "v": diffusion.x0_from_v(xt, abar, f)}[prediction]
    torch.testing.assert_close(guided, old, rtol=1e-5, atol=1e-5)


# -- the old and the new path give the same samples --------------------------------------------------------------
def old_x0(net, prediction, xt, t, abar):
    """The old ``Denoiser.to_prediction``: x0 from a network output at x_t (VP) and timestep t."""
    out = net(xt, t, None)
    return {"eps": diffusion.x0_from_eps(xt, abar, out), "x0": out, "v": diffusion.x0_from_v(xt, abar, out)}[prediction]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_vp_model_samples_the_same_through_the_old_and_the_new_path(prediction, one_thread):
    torch.manual_seed(1)
    schedule = NoiseSchedule.from_name("linear", 1000)
    net = WithNoise(nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4)))
    denoiser = Denoiser(net, VPPrecond(schedule, prediction))
    seeds = range(6)
    # ancestral (Ho et al. 2020, Alg. 2) on a 50-step respacing, x0 unclipped, the old chain written out
    respaced = schedule.respace(list(range(0, 1000, 20)))
    noise = PerSampleNoise(seeds)
    x = noise.randn((4,))                                                  # as ``generate`` draws x_T first
    new = sample_ancestral(denoiser, x.clone(), respaced, noise)
    noise, old = PerSampleNoise(seeds), x.clone()
    noise.randn((4,))
    for i in reversed(range(len(respaced))):
        index = torch.full((6,), i)
        abar = diffusion.extract(respaced.alphas_cumprod, index, old)
        x0 = old_x0(net, prediction, old, respaced.timesteps[index], abar)
        mean, _, _ = diffusion.q_posterior(respaced, x0, old, index)
        var = diffusion.extract(respaced.posterior_variance, index, old)
        old = mean + var.sqrt() * noise.randn_like(old) if i > 0 else mean
    torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    # DPM-Solver++(2M) through the old SigmaDenoiser formula: x_t = x sqrt(abar), t = sigma_to_t(sigma)
    sigmas = build_sigmas(schedule, 12, "logsnr", sigma_max=80.0)
    start = PerSampleNoise(seeds).randn((4,)) * prior_std(sigmas)

    def old_model(x, sigma, cond=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        abar = (1 / (1 + sigma ** 2)).reshape(-1, 1).to(x)
        return old_x0(net, prediction, x * abar.sqrt(), sigma_to_t(schedule.sigmas.log(), sigma), abar)

    torch.testing.assert_close(sample_dpmpp_2m(denoiser, start, sigmas, PerSampleNoise(seeds)),
                               sample_dpmpp_2m(old_model, start, sigmas, PerSampleNoise(seeds)), rtol=1e-4, atol=1e-5)


def test_exact_mixture_denoiser_is_the_posterior_mean_at_every_sigma():
    """D(x; sigma) of the exact eps network is E[x0 | x] of the mixture, the quantity every sampler needs."""
    mixture = GaussianMixture.ring()
    schedule = NoiseSchedule.from_name("cosine", 1000)
    denoiser = Denoiser(ExactEpsNet(mixture, schedule), VPPrecond(schedule, "eps"))
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    for sigma in (0.05, 0.8, 5.0):
        abar = 1 / (1 + sigma ** 2)
        expected = x + sigma ** 2 * mixture.score(x * math.sqrt(abar), abar) * math.sqrt(abar)   # Tweedie (VE)
        torch.testing.assert_close(denoiser(x, sigma), expected, rtol=1e-9, atol=1e-9)


# -- a condition added only here reaches the network and is dropped by CFG ---------------------------------------
class DummySeer(nn.Module):
    """An MLP that consumes a test-only condition ``dummy`` (a (B, 3) vector) and records what it saw."""

    consumes = ("dummy",)

    def __init__(self):
        super().__init__()
        self.body, self.cond_proj, self.seen = nn.Linear(2, 2), nn.Linear(3, 2), []

    def forward(self, x, t, cond=None):
        dummy = cond["dummy"] if cond is not None and "dummy" in cond else torch.zeros(x.shape[0], 3)
        self.seen.append(dummy.detach().clone())
        return self.body(x) + self.cond_proj(dummy) * (1 + 0 * torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1))


def test_a_new_condition_field_needs_no_change_to_samplers_losses_or_guidance():
    torch.manual_seed(0)
    schedule = NoiseSchedule.from_name("linear", 100)
    net = DummySeer()
    denoiser = Denoiser(net, VPPrecond(schedule, "eps"), {"dummy": Condition("dummy", dropout=0.5)})
    dummy = torch.rand(400, 3) + 1                                         # never zero: null rows are visible
    objective = DiffusionObjective(denoiser, simple_loss, UniformTimesteps(len(schedule)))
    batch = objective.draw(torch.randn(400, 2), Cond(dummy=dummy), torch.Generator().manual_seed(0))
    dropped = (batch.cond["dummy"] == 0).all(1)
    assert 150 < int(dropped.sum()) < 250                                  # dropout 0.5, drawn per row
    assert torch.equal(batch.cond["dummy"][~dropped], dummy[~dropped])
    net.seen.clear()
    objective.loss(batch, net).mean().backward()                           # the loss passes it on untouched
    assert torch.equal(net.seen[0], batch.cond["dummy"]) and net.cond_proj.weight.grad.abs().sum() > 0
    # sampling with CFG: the conditional half sees the field, the unconditional half its null value
    net.seen.clear()
    sigmas = build_sigmas(schedule, 3, "karras")
    guided = ClassifierFreeGuidance(denoiser, 2.0, drop=["dummy"])
    sample_heun(guided, torch.randn(4, 2) * prior_std(sigmas), sigmas, PerSampleNoise(range(4)),
                Cond(dummy=dummy[:4]))
    for seen in net.seen:
        assert torch.equal(seen[:4], dummy[:4]) and torch.equal(seen[4:], torch.zeros(4, 3))
    assert len(net.seen) == 5                                              # Heun, 3 steps: 2N - 1 evaluations


def test_condition_records_and_null_values():
    label = ClassLabel("label", 0.2, 10)
    cond = Cond(label=torch.tensor([1, 2, 3]), text=torch.ones(3, 2))
    nulled = with_null(cond, {"label": label, "text": Condition("text")}, ["label"])
    assert nulled["label"].tolist() == [10, 10, 10] and torch.equal(nulled["text"], cond["text"])
    both = Cond.cat([cond, nulled])
    assert both["label"].tolist() == [1, 2, 3, 10, 10, 10] and both.rows(1, 2)["label"].tolist() == [2]
    g = torch.Generator().manual_seed(0)
    many = drop_conditions(Cond(label=torch.zeros(10000, dtype=torch.long)), {"label": label}, g)
    assert abs((many["label"] == 10).float().mean().item() - 0.2) < 0.015
    with pytest.raises(Exception, match="batch sizes"):
        Cond(label=torch.zeros(3), text=torch.zeros(4))


def test_log_normal_training_sigmas():
    sigmas = LogNormalSigmas(-1.2, 1.2).sample(100000, torch.Generator().manual_seed(0))
    assert abs(sigmas.log().mean().item() + 1.2) < 0.02 and abs(sigmas.log().std().item() - 1.2) < 0.02


def test_learned_variance_passes_through_the_denoiser():
    schedule = NoiseSchedule.from_name("linear", 100)
    net = WithNoise(nn.Linear(4, 8))
    denoiser = Denoiser(net, VPPrecond(schedule, "eps"), learned_variance=True)
    x = torch.randn(3, 4)
    out = denoiser.output(x, 1.0)
    mean, variance = split_output(net(x / math.sqrt(2), sigma_to_t(schedule.sigmas.log(), torch.ones(3, dtype=torch.float64)),
                                      None), True)
    torch.testing.assert_close(out.variance, variance)
    torch.testing.assert_close(out.x0, x - mean)


# -- a model is saved and loaded as a whole --------------------------------------------------------------------------
@dataclass
class TinyConfig:
    dim: int = 2
    width: int = 8


class TinyNet(nn.Module):
    """A network that exists only in this test: one registry entry makes it trainable and loadable."""

    consumes = ()

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(config.dim + 1, config.width), nn.SiLU(), nn.Linear(config.width, config.dim))

    def forward(self, x, t, cond=None):
        return self.fc(torch.cat([x, torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1) / 1000], dim=1))


def test_a_registered_network_trains_saves_and_samples_from_its_checkpoint_alone(tmp_path, monkeypatch):
    from difflab.config import load_config
    from difflab.nets import registry
    from difflab.pipelines.ddpm import load_model, sample
    from difflab.train.diffusion import diffusion_trainer

    fit = lambda config, shape, out, classes: dataclasses.replace(config, dim=shape[0])  # noqa: E731
    monkeypatch.setitem(registry.NETWORKS, "tiny", registry.NetworkEntry(TinyConfig, TinyNet, fit))
    config = load_config(None, ["data.dataset=toy", "data.num_points=256", "model.kind=tiny", "model.tiny.width=16",
                                "diffusion.timesteps=50", "train.steps=3", "train.batch_size=32",
                                f"train.out_dir={tmp_path / 'run'}", "train.log_every=1"])
    diffusion_trainer(config, progress=False).run()
    loaded = load_model(tmp_path / "run")                  # no data is read: the spec says what the model is
    assert isinstance(loaded.denoiser.net, TinyNet) and loaded.spec.sample_shape == (2,)
    assert loaded.spec.data_range is None and loaded.spec.network_options == {"dim": 2, "width": 16}
    points = sample(loaded, 10, dataclasses.replace(loaded.config.sample, steps=4))
    assert points.shape == (10, 2) and torch.isfinite(points).all()
    with pytest.raises(DifflabError, match="model.tiny.depth"):
        load_config(None, ["model.kind=tiny", "model.tiny.depth=3"]) and registry.network_config("tiny", {"depth": 3})
