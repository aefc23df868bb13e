"""Sliced score matching (Song, Garg, Shi & Ermon 2019) against exact answers.

A linear score s(x) = A x + b has the Jacobian A, so on Gaussian data N(mu, s^2 I) the objective's expectation
is known, tr(A) + 1/2 (||A mu + b||^2 + s^2 ||A||_F^2), and its minimiser is the data's score (A, b) =
(-I / s^2, mu / s^2). Through the denoiser, the sliced loss of an eps network is L_simple - 1 in expectation
(both are sigma^2-weighted Fisher divergences, up to their constants), and a small MLP trained with it at one
noise level learns the exact Gaussian mixture's noised score."""

import math

import pytest
import torch
from torch import nn

from difflab.conditioning import ClassLabel, Cond
from difflab.config import load_config
from difflab.denoiser import Denoiser, EDMPrecond, VPPrecond
from difflab.errors import DifflabError
from difflab.losses import build_loss, denoiser_score, projection_vectors, simple_loss, sliced_loss, \
    sliced_score_matching
from difflab.nets import MLP, MLPConfig, UNet, UNetConfig
from difflab.references import GaussianMixture
from difflab.samplers.langevin import score as tweedie_score
from difflab.schedules import NoiseSchedule, geometric_betas
from difflab.train.diffusion import check_objective, diffusion_trainer
from difflab.train.objectives import SlicedScoreObjective, diffusion_levels

DIM, MU, STD = 3, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.7


class LinearScore(nn.Module):
    """s(x) = A x + b, whose Jacobian ds/dx is A."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.a.T + self.b


def true_score() -> LinearScore:
    return LinearScore(-torch.eye(DIM, dtype=torch.float64) / STD ** 2, MU / STD ** 2)


def closed_form(model: LinearScore) -> torch.Tensor:
    """E_x[tr(A) + 1/2 ||A x + b||^2] for x ~ N(MU, STD^2 I)."""
    a, b = model.a, model.b
    return torch.trace(a) + 0.5 * ((a @ MU + b).square().sum() + STD ** 2 * a.square().sum())


def gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    return MU + STD * torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def random_linear(seed: int = 1) -> LinearScore:
    g = torch.Generator().manual_seed(seed)
    return LinearScore(torch.randn(DIM, DIM, generator=g, dtype=torch.float64),
                       torch.randn(DIM, generator=g, dtype=torch.float64))


def within(values: torch.Tensor, expected: float, sigmas: float = 5.0) -> bool:
    """The mean of ``values`` is ``expected`` within ``sigmas`` standard errors."""
    return abs(values.mean().item() - expected) < sigmas * values.std().item() / math.sqrt(len(values)) + 1e-12


def test_variance_reduced_estimate_is_the_projected_jacobian_plus_the_exact_square():
    model, x = random_linear(), gaussian_data(8)
    v = projection_vectors((8, 1, DIM), "rademacher", torch.Generator().manual_seed(2)).double()
    s = model(x).detach()
    v_a_v = torch.einsum("bi,ij,bj->b", v[:, 0], model.a.detach(), v[:, 0])
    torch.testing.assert_close(sliced_score_matching(model, x, v), v_a_v + 0.5 * s.square().sum(1))
    # Eq. 8's estimate instead squares the projected score
    plain = sliced_score_matching(model, x, v, variance_reduced=False)
    torch.testing.assert_close(plain, v_a_v + 0.5 * (v[:, 0] * s).sum(1).square())


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_projections_estimate_the_trace_and_the_square(distribution):
    model, x = random_linear(), gaussian_data(1)
    m = 20000
    v = projection_vectors((m, 1, DIM), distribution, torch.Generator().manual_seed(3)).double()
    a, s = model.a.detach(), model(x).detach()[0]
    # one example repeated m times, one projection each: every row an independent estimate
    vr = sliced_score_matching(model, x.expand(m, DIM), v)
    assert within(vr - 0.5 * s.square().sum(), torch.trace(a).item())
    plain = sliced_score_matching(model, x.expand(m, DIM), v, variance_reduced=False)
    assert within(plain, (torch.trace(a) + 0.5 * s.square().sum()).item())
    # the M projections of one example are averaged: the same draws, grouped, give the same mean
    grouped = sliced_score_matching(model, x, v.reshape(1, m, DIM))
    torch.testing.assert_close(grouped, vr.mean().reshape(1))
    # Rademacher projections of a diagonal Jacobian estimate its trace with no error at all
    if distribution == "rademacher":
        diagonal = LinearScore(torch.diag(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)), model.b.detach())
        estimate = sliced_score_matching(diagonal, x.expand(100, DIM), v[:100]) - 0.5 * diagonal(x).square().sum()
        torch.testing.assert_close(estimate, torch.full((100,), -0.5, dtype=torch.float64))


def test_the_loss_has_its_closed_form_expectation_on_gaussian_data():
    x = gaussian_data(40000)
    v = projection_vectors((40000, 1, DIM), "rademacher", torch.Generator().manual_seed(4)).double()
    for model in (random_linear(), true_score()):
        assert within(sliced_score_matching(model, x, v).detach(), closed_form(model).item())
    # at the true score, J = -d / s^2 + 1/2 E||(MU - x) / s^2||^2 = -d / (2 s^2)
    assert closed_form(true_score()).item() == pytest.approx(-DIM / (2 * STD ** 2))


def test_the_minimiser_is_the_true_score_and_the_gradient_flows():
    x = gaussian_data(40000)
    v = projection_vectors((40000, 1, DIM), "gaussian", torch.Generator().manual_seed(5)).double()
    truth = true_score()
    at_truth = sliced_score_matching(truth, x, v).mean()
    at_truth.backward()
    # at the true score the estimate's gradient is sampling error only (a few percent of the scale 1 / s^2)
    assert truth.a.grad.abs().max() < 0.1 and truth.b.grad.abs().max() < 0.1
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        perturbed = LinearScore(truth.a.detach() + 0.3 * torch.randn(DIM, DIM, generator=g, dtype=torch.float64),
                                truth.b.detach() + 0.3 * torch.randn(DIM, generator=g, dtype=torch.float64))
        loss = sliced_score_matching(perturbed, x, v).mean()
        assert loss > at_truth + 0.05 and closed_form(perturbed) > closed_form(truth)
        loss.backward()
        assert perturbed.a.grad.abs().max() > 0.1 and torch.isfinite(perturbed.b.grad).all()


# -- through the denoiser -------------------------------------------------------------------------------------
def perturbed_mlp(dim: int = 2, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    net = MLP(MLPConfig(dim=dim, hidden=16, depth=1))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def geometric_schedule(levels: int = 10, sigma_min: float = 0.01, sigma_max: float = 50.0) -> NoiseSchedule:
    return NoiseSchedule.from_betas(geometric_betas(levels, sigma_min, sigma_max))


PRECONDS = {"eps": lambda: VPPrecond(geometric_schedule(), "eps"), "v": lambda: VPPrecond(geometric_schedule(), "v"),
            "x0": lambda: VPPrecond(geometric_schedule(), "x0"), "edm": lambda: EDMPrecond(0.5)}


@pytest.mark.parametrize("precond", sorted(PRECONDS))
def test_the_denoisers_score_is_tweedies_formula(precond):
    denoiser = Denoiser(perturbed_mlp(), PRECONDS[precond]())
    x = torch.randn(6, 2)
    for sigma in (0.05, 1.0, 20.0):
        expected = tweedie_score(denoiser, x, sigma)
        torch.testing.assert_close(denoiser_score(denoiser, x, torch.full((6,), sigma, dtype=torch.float64)),
                                   expected, rtol=1e-4, atol=1e-5 / sigma)


@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_for_an_eps_network_the_sliced_loss_is_l_simple_minus_one_in_expectation(sigma):
    denoiser = Denoiser(perturbed_mlp(), VPPrecond(geometric_schedule(), "eps"))
    g = torch.Generator().manual_seed(7)
    n = 30000
    x0 = GaussianMixture.ring().sample(n, g).float()
    noise, sigmas = torch.randn(n, 2, generator=g), torch.full((n,), sigma, dtype=torch.float64)
    v = projection_vectors((n, 1, 2), "rademacher", g)
    sliced = sliced_loss(denoiser, x0, noise, sigmas, projections=v).detach().double()
    simple = simple_loss(denoiser, x0, noise, sigmas).detach().double()
    assert within(simple - 1 - sliced, 0.0)
    assert sliced.shape == (n,) and build_loss("sliced") is sliced_loss


def ve_score(mixture: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The exact score of p_sigma (x = x0 + sigma z): a mixture with the variances s_k^2 + sigma^2."""
    return GaussianMixture(mixture.means, (mixture.stds ** 2 + sigma ** 2).sqrt(), mixture.weights).score(x, 1.0)


def score_error(denoiser: Denoiser, mixture: GaussianMixture, sigma: float, n: int = 4000) -> float:
    """E||s_theta - s||^2 / E||s||^2 on samples of p_sigma."""
    g = torch.Generator().manual_seed(123)
    x = mixture.sample(n, g) + sigma * torch.randn(n, mixture.dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model = denoiser_score(denoiser, x.float(), torch.full((n,), sigma, dtype=torch.float64)).double()
    exact = ve_score(mixture, x, sigma)
    return ((model - exact).square().sum(1).mean() / exact.square().sum(1).mean()).item()


def test_a_small_mlp_trained_with_the_sliced_loss_learns_the_mixtures_score(one_thread):
    mixture, sigma = GaussianMixture.ring(), 0.5
    torch.manual_seed(0)
    denoiser = Denoiser(MLP(MLPConfig(dim=2, hidden=64, depth=2)), VPPrecond(geometric_schedule(), "eps"))
    untrained = score_error(denoiser, mixture, sigma)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    batch, sigmas = 256, torch.full((256,), sigma, dtype=torch.float64)
    for _ in range(400):
        x0 = mixture.sample(batch, g).float()
        noise, v = torch.randn(batch, 2, generator=g), projection_vectors((batch, 1, 2), "rademacher", g)
        loss = sliced_loss(denoiser, x0, noise, sigmas, projections=v).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = score_error(denoiser, mixture, sigma)
    print(f"relative score error at sigma {sigma}: untrained {untrained:.3f}, trained {trained:.3f}")
    assert untrained == pytest.approx(1.0)             # a zero-initialised eps network's score is 0
    assert trained < 0.25 * untrained


# -- as a training objective ----------------------------------------------------------------------------------
def tiny_unet(**overrides) -> UNet:
    config = dict(in_channels=1, image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, groups=4)
    return UNet(UNetConfig(**{**config, **overrides}))


@pytest.mark.parametrize("switches", [{}, dict(resblock_updown=True, rescale_residual=True, num_head_channels=4,
                                               num_classes=3)], ids=["default", "adm"])
@pytest.mark.parametrize("precond", ["ncsn", "edm"])
def test_sliced_objective_on_a_unet(switches, precond):
    torch.manual_seed(0)
    net = tiny_unet(**switches)
    with torch.no_grad():                    # move the zero-initialised layers so that every path is live
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    conditions = {"label": ClassLabel("label", 0.0, 3)} if switches else None
    # NCSN's geometric noise levels (an eps network on a VP schedule), or EDM's log-normal sigmas
    denoiser = Denoiser(net, VPPrecond(geometric_schedule(1000), "eps") if precond == "ncsn" else EDMPrecond(0.5),
                        conditions)
    objective = SlicedScoreObjective(denoiser, diffusion_levels(denoiser, "uniform", -1.2, 1.2), projections=2)
    x0 = torch.randn(4, 1, 8, 8)
    cond = Cond(label=torch.tensor([0, 1, 2, 3])) if switches else None
    batch = objective.draw(x0, cond, torch.Generator().manual_seed(0))
    assert (batch.cond is not None) == bool(switches)
    assert batch.projections.shape == (4, 2, 1, 8, 8) and set(batch.projections.unique().tolist()) == {-1.0, 1.0}
    # batch-first: micro-batches and rank shards slice the projections with their examples
    halves = batch.split(2)
    assert torch.equal(halves[1].projections, batch.projections[2:])
    losses = objective.loss(batch, net)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    losses.mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    assert sum(grad.abs().sum() for grad in grads) > 0
    # each example's loss is its own: the first half alone gives the same values
    torch.testing.assert_close(objective.loss(halves[0], net).detach(), losses[:2].detach(), rtol=1e-4, atol=1e-5)


def toy_overrides(out_dir, steps):
    return [f"train.out_dir={out_dir}", f"train.steps={steps}", "train.batch_size=32", "train.log_every=5",
            "train.checkpoint_every=1000", "train.sample_every=100000", "data.num_points=500",
            "model.mlp.hidden=16", "model.mlp.depth=1", "diffusion.schedule=geometric", "diffusion.timesteps=100",
            "diffusion.sigma_min=0.01", "diffusion.sigma_max=5", "train.loss=sliced", "train.sliced_projections=2",
            "train.sliced_distribution=gaussian", "train.lr_schedule=constant", "train.max_minutes=null"]


def test_the_trainer_runs_the_sliced_loss_and_resumes_it_exactly(tmp_path, one_thread):
    full = diffusion_trainer(load_config("configs/toy.yaml", toy_overrides(tmp_path / "full", 12)), progress=False)
    assert isinstance(full.objective, SlicedScoreObjective) and full.objective.distribution == "gaussian"
    full.run()
    first = diffusion_trainer(load_config("configs/toy.yaml", toy_overrides(tmp_path / "split", 5)), progress=False)
    first.run()
    second = diffusion_trainer(load_config("configs/toy.yaml", toy_overrides(tmp_path / "split", 12)), resume=True,
                               progress=False)
    second.run()
    for key, value in full.net.state_dict().items():
        assert torch.equal(value, second.net.state_dict()[key]), key


def test_config_checks():
    ncsn = load_config("configs/ncsn_fashion_mnist.yaml", ["train.loss=sliced"])
    check_objective(ncsn)                                          # the NCSN preset takes the sliced loss as it is
    assert (ncsn.train.sliced_projections, ncsn.train.sliced_distribution) == (1, "rademacher")
    for override, message in [("train.sliced_projections=0", "train.sliced_projections"),
                              ("train.sliced_distribution=uniform", "train.sliced_distribution")]:
        with pytest.raises(DifflabError, match=message):
            load_config("configs/ncsn_fashion_mnist.yaml", ["train.loss=sliced", override])
    for override, message in [("train.compile=true", "torch.compile"), ("train.gradient_checkpointing=true",
                                                                        "gradient checkpointing"),
                              ("train.min_snr_gamma=5", "min_snr_gamma")]:
        with pytest.raises(DifflabError, match=message):
            check_objective(load_config("configs/ncsn_fashion_mnist.yaml", ["train.loss=sliced", override]))
    with pytest.raises(ValueError, match="projections"):
        SlicedScoreObjective(Denoiser(perturbed_mlp(), EDMPrecond()), diffusion_levels(
            Denoiser(perturbed_mlp(), EDMPrecond()), "uniform", -1.2, 1.2), distribution="uniform")
