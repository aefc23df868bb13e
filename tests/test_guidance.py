"""Classifier-free guidance and thresholding: the algebra, and their effect on the exact mixture."""

import pytest
import torch

from difflab.config import Config, DataConfig, SampleConfig
from difflab.denoiser import Denoiser, t_to_sigma, to_prediction
from difflab.errors import DifflabError
from difflab.guidance import ClassifierFreeGuidance, ThresholdedNet, dynamic_threshold, static_threshold
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

    def forward(self, x, t, y=None):
        self.calls += 1
        return self.net(x, t, y)


def random_mlp(classes=3):
    torch.manual_seed(0)
    net = MLP(MLPConfig(dim=2, hidden=16, depth=1, num_classes=classes))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return net


def test_cfg_algebra_in_one_forward_pass():
    net = CountingNet(random_mlp())
    x, t, y = torch.randn(5, 2), torch.tensor([1, 50, 300, 700, 999]), torch.tensor([0, 1, 2, 0, 1])
    conditional, unconditional = net(x, t, y), net(x, t, torch.full_like(y, 3))
    for w in (0.0, 0.5, 4.0):
        guided = ClassifierFreeGuidance(net, w, null_label=3)
        net.calls = 0
        out = guided(x, t, y)
        assert net.calls == 1
        assert torch.allclose(out, (1 + w) * conditional - w * unconditional, atol=1e-6)


def test_cfg_is_exact_for_x0_and_v_networks():
    # Guiding raw x0 or v outputs equals guiding the implied eps (the conversions are affine in the output).
    net = random_mlp()
    x, t, y = torch.randn(4, 2), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 1])
    abar = SCHEDULE.alphas_cumprod[t].float()[:, None]
    w = 2.0
    for kind in ("x0", "v"):
        eps = lambda out: to_prediction(kind, x, abar, out).eps
        guided = eps(ClassifierFreeGuidance(net, w, 3)(x, t, y))
        expected = (1 + w) * eps(net(x, t, y)) - w * eps(net(x, t, torch.full_like(y, 3)))
        assert torch.allclose(guided, expected, atol=1e-5)


def test_guidance_raises_the_target_class_likelihood_on_the_exact_mixture():
    # Two overlapping components: guidance pushes samples of class 0 away from class 1, so the exact
    # class posterior p(y = 0 | x) of the samples rises with w.
    mixture = GaussianMixture(torch.tensor([[-0.4, 0.0], [0.4, 0.0]]), torch.tensor([0.4, 0.4]))
    net = ExactEpsNet(mixture, SCHEDULE)
    grid = SCHEDULE.respace(space_timesteps(1000, 1000))
    labels = torch.zeros(2000, dtype=torch.long)
    posterior = []
    for w in (0.0, 1.0, 4.0):
        denoiser = Denoiser(ClassifierFreeGuidance(net, w, null_label=2), SCHEDULE)
        x = generate(sample_ancestral, denoiser, grid, (2,), range(2000), batch_size=2000, labels=labels,
                     clip_x0=False, variance="beta_tilde").double()
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
def test_thresholded_net_returns_its_own_parameterisation(kind):
    net = random_mlp()
    x, t = torch.randn(6, 2) * 3, torch.tensor([0, 5, 100, 400.5, 800, 999])
    identity = ThresholdedNet(net, SCHEDULE, kind, lambda x0: x0)
    assert torch.allclose(identity(x, t), net(x, t), atol=1e-4)
    clipped = ThresholdedNet(net, SCHEDULE, kind, static_threshold)
    abar = (1 / (1 + t_to_sigma(SCHEDULE.sigmas.log(), t) ** 2)).float()[:, None]
    x0 = to_prediction(kind, x, abar, clipped(x, t)).x0
    assert x0.abs().max() <= 1 + 1e-4


def test_guidance_needs_a_conditional_model():
    config = Config(data=DataConfig(dataset="toy"))
    denoiser = Denoiser(MLP(MLPConfig(dim=2, hidden=8, depth=1)), SCHEDULE)
    with pytest.raises(DifflabError, match="class-conditional"):
        sample(denoiser, config, 4, SampleConfig(steps=5, guidance=2.0))


def test_learned_variance_channels_are_not_guided_or_thresholded():
    """A learned-variance net's second half (the variance interpolation) passes through from the conditional
    prediction (GLIDE); only the first half is guided and thresholded."""
    torch.manual_seed(1)
    mean_net, var_net = random_mlp(), random_mlp()
    net = lambda x, t, y=None: torch.cat([mean_net(x, t, y), var_net(x, t, y)], dim=1)   # noqa: E731
    x, t, y = torch.randn(4, 2), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 1])
    null = torch.full_like(y, 3)
    guided = ClassifierFreeGuidance(net, 2.0, null_label=3, mean_channels=2)(x, t, y)
    torch.testing.assert_close(guided[:, :2], 3 * mean_net(x, t, y) - 2 * mean_net(x, t, null))
    torch.testing.assert_close(guided[:, 2:], var_net(x, t, y))
    thresholded = ThresholdedNet(net, SCHEDULE, "eps", static_threshold)(x, t, y)
    torch.testing.assert_close(thresholded[:, 2:], var_net(x, t, y))
    plain = ThresholdedNet(mean_net, SCHEDULE, "eps", static_threshold)(x, t, y)
    torch.testing.assert_close(thresholded[:, :2], plain)
