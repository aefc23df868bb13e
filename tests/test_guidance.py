"""Classifier-free guidance and thresholding: the algebra, and their effect on the exact mixture."""

import pytest
import torch
from closed_forms import old_eps, old_x0

from difflab.build import build_model
from difflab.conditioning import ClassLabel, Cond
from difflab.config import Config, DataConfig, ModelConfig, SampleConfig
from difflab.data import load_toy
from difflab.denoiser import Denoiser, VPPrecond, t_to_sigma
from difflab.errors import DifflabError
from difflab.guidance import ClassifierFreeGuidance, Thresholded, dynamic_threshold, static_threshold
from difflab.nets import MLP, MLPConfig
from difflab.pipelines.ddpm import sample
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import generate, sample_ancestral
from difflab.schedules import NoiseSchedule, space_timesteps

SCHEDULE = NoiseSchedule.from_name("linear", 1000)


class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t, cond=None):
        self.calls += 1
        return self.net(x, t, cond)


class Float64Output(torch.nn.Module):
    """A float32 network seen in float64: the conversions to D (whose values reach 1 / sqrt(abar) ~ 157 at
    t = 999) and the test's own closed forms then add no float32 rounding to the compared quantities."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None):
        return self.net(x.float(), t, cond).double()


def random_mlp(classes=3):
    torch.manual_seed(0)
    net = MLP(MLPConfig(dim=2, hidden=16, depth=1, num_classes=classes))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return Float64Output(net)


def labelled(net, kind="eps", classes=3, learned_variance=False) -> Denoiser:
    return Denoiser(net, VPPrecond(SCHEDULE, kind), {"label": ClassLabel("label", 0.0, classes)}, learned_variance)


def at_timesteps(t):
    """sigma, alpha-bar (B, 1) of (integer or real) timesteps t on SCHEDULE."""
    sigma = t_to_sigma(SCHEDULE.sigmas.log(), torch.as_tensor(t))
    return sigma, (1 / (1 + sigma ** 2))[:, None]


def test_cfg_algebra_in_one_forward_pass():
    net = CountingNet(random_mlp())
    denoiser = labelled(net)
    xt, t = torch.randn(5, 2, dtype=torch.float64), torch.tensor([1, 50, 300, 700, 999])
    y = torch.tensor([0, 1, 2, 0, 1])
    sigma, abar = at_timesteps(t)
    x = xt / abar.sqrt()                                                  # VE-scaled
    cond, null = Cond(label=y), Cond(label=torch.full_like(y, 3))
    conditional, unconditional = net(xt, t, cond), net(xt, t, null)      # raw eps outputs F_c, F_u
    d_c, d_u = denoiser(x, sigma, cond), denoiser(x, sigma, null)
    for w in (0.0, 0.5, 4.0):
        guided = ClassifierFreeGuidance(denoiser, w)
        net.calls = 0
        out = guided(x, sigma, cond)
        assert net.calls == 1
        assert torch.allclose(out, d_u + (1 + w) * (d_c - d_u), atol=1e-6)
        # the old formula (1 + w) F_c - w F_u, converted to x0
        assert torch.allclose(out, old_x0("eps", xt, abar, (1 + w) * conditional - w * unconditional), atol=1e-6)


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_cfg_is_exact_for_x0_and_v_networks(kind):
    # Guiding D equals guiding the raw eps, x0 or v outputs (the conversions are affine in the output).
    net = random_mlp()
    xt, t, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 1])
    sigma, abar = at_timesteps(t)
    x = xt / abar.sqrt()
    w = 2.0
    cond, null = Cond(label=y), Cond(label=torch.full_like(y, 3))
    guided = ClassifierFreeGuidance(labelled(net, kind), w)(x, sigma, cond)
    combined = (1 + w) * net(xt, t, cond) - w * net(xt, t, null)         # the old guided raw output
    assert torch.allclose(guided, old_x0(kind, xt, abar, combined), atol=1e-5)
    # and in eps form, the old assertion: eps of the guided D = (1 + w) eps_c - w eps_u
    expected = (1 + w) * old_eps(kind, xt, abar, net(xt, t, cond)) - w * old_eps(kind, xt, abar, net(xt, t, null))
    assert torch.allclose((x - guided) / sigma[:, None], expected, atol=1e-5)


def test_guidance_raises_the_target_class_likelihood_on_the_exact_mixture():
    # Two overlapping components: guidance pushes samples of class 0 away from class 1, so the exact
    # class posterior p(y = 0 | x) of the samples rises with w.
    mixture = GaussianMixture(torch.tensor([[-0.4, 0.0], [0.4, 0.0]]), torch.tensor([0.4, 0.4]))
    denoiser = labelled(ExactEpsNet(mixture, SCHEDULE), classes=2)
    grid = SCHEDULE.respace(space_timesteps(1000, 1000))
    labels = torch.zeros(2000, dtype=torch.long)
    posterior = []
    for w in (0.0, 1.0, 4.0):
        x = generate(sample_ancestral, ClassifierFreeGuidance(denoiser, w), grid, (2,), range(2000),
                     batch_size=2000, cond=Cond(label=labels), variance="beta_tilde").double()
        posterior.append(mixture.class_posterior(x)[:, 0].log().mean().item())
    assert posterior[0] < posterior[1] < posterior[2]
    # w = 0 is the plain conditional model: its samples have the true conditional class posterior
    true_x = mixture.means[0] + mixture.stds[0] * torch.randn(20000, 2, generator=torch.Generator().manual_seed(1),
                                                              dtype=torch.float64)
    assert posterior[0] == pytest.approx(mixture.class_posterior(true_x)[:, 0].log().mean().item(), abs=0.03)


def test_static_and_dynamic_thresholds():
    x0 = torch.tensor([[0.5, -0.2, 0.9, 0.1], [3.0, -2.0, 0.5, 1.5]]).reshape(2, 1, 2, 2)
    assert torch.equal(static_threshold(x0), x0.clamp(-1, 1))
    out = dynamic_threshold(x0, percentile=0.995)
    assert torch.equal(out[0], x0[0])                                   # in range: unchanged
    s = torch.quantile(x0[1].abs().flatten(), 0.995)
    assert torch.allclose(out[1], x0[1].clamp(-s, s) / s)
    assert out.abs().max() <= 1.0


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_thresholded_denoiser_is_the_threshold_of_d(kind):
    # Thresholded(D) returns threshold(D), D = the x0 implied by the raw output (old closed forms), at
    # integer and real timesteps, for every parameterisation.
    net = random_mlp()
    xt, t = torch.randn(6, 2, dtype=torch.float64) * 3, torch.tensor([0, 5, 100, 400.5, 800, 999])
    sigma, abar = at_timesteps(t)
    x = xt / abar.sqrt()
    denoiser = Denoiser(net, VPPrecond(SCHEDULE, kind))
    x0 = old_x0(kind, xt, abar, net(xt, t))
    identity = Thresholded(denoiser, lambda x0: x0)
    assert torch.allclose(identity(x, sigma), x0, atol=1e-4)
    assert torch.allclose(denoiser(x, sigma), x0, atol=1e-4)
    clipped = Thresholded(denoiser, static_threshold)(x, sigma)
    assert torch.allclose(clipped, static_threshold(x0), atol=1e-4)
    assert clipped.abs().max() <= 1 + 1e-4
    dynamic = Thresholded(denoiser, dynamic_threshold)(x, sigma)
    assert torch.allclose(dynamic, dynamic_threshold(x0), atol=1e-4)


def test_guidance_needs_a_conditional_model():
    config = Config(data=DataConfig(dataset="toy", num_points=64), model=ModelConfig("mlp", {"hidden": 8, "depth": 1}))
    denoiser, spec = build_model(config, load_toy(config.data.toy, config.data.num_points))
    with pytest.raises(DifflabError, match="conditional model"):
        sample(denoiser, 4, SampleConfig(sampler="ancestral", steps=5, guidance=2.0), spec=spec)


def test_learned_variance_channels_are_not_guided_or_thresholded():
    """A learned-variance net's second half (the variance interpolation) passes through from the conditional
    prediction (GLIDE); only the first half (D) is guided and thresholded."""
    torch.manual_seed(1)
    mean_net, var_net = random_mlp(), random_mlp()
    net = lambda x, t, cond=None: torch.cat([mean_net(x, t, cond), var_net(x, t, cond)], dim=1)   # noqa: E731
    xt, t, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 1])
    sigma, abar = at_timesteps(t)
    x = xt / abar.sqrt()
    cond, null = Cond(label=y), Cond(label=torch.full_like(y, 3))
    denoiser = labelled(net, learned_variance=True)
    guided = ClassifierFreeGuidance(denoiser, 2.0).output(x, sigma, cond)
    torch.testing.assert_close(guided.x0,
                               old_x0("eps", xt, abar, 3 * mean_net(xt, t, cond) - 2 * mean_net(xt, t, null)))
    torch.testing.assert_close(guided.variance, var_net(xt, t, cond))
    thresholded = Thresholded(denoiser, static_threshold).output(x, sigma, cond)
    torch.testing.assert_close(thresholded.variance, var_net(xt, t, cond))
    plain = Thresholded(labelled(mean_net), static_threshold)(x, sigma, cond)
    torch.testing.assert_close(thresholded.x0, plain)
