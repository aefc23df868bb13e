"""Classifier guidance (Dhariwal & Nichol 2021): the eps correction against hand computations, Bayes' rule
on the exact Gaussian mixture, the noise-aware classifier, and its training and files."""

import dataclasses
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
from closed_forms import old_eps, old_x0
import yaml
from safetensors.torch import save_file

from difflab.build import build_data, build_model, build_schedule
from difflab.classifier_guidance import ClassifierGuidance, log_prob_grad
from difflab.cli import main
from difflab.conditioning import Cond
from difflab.config import Config, DataConfig, DiffusionConfig, ModelConfig, SampleConfig, to_dict
from difflab.denoiser import Denoiser, VPPrecond, t_to_sigma
from difflab.errors import DifflabError
from difflab.nets import NoisyClassifier, NoisyClassifierConfig, UNet, UNetConfig
from difflab.pipelines.ddpm import guided as guided_model, sample
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import generate, sample_ancestral
from difflab.schedules import NoiseSchedule, space_timesteps
from difflab.train.classifier import (ClassifierExperiment, ClassifierTrainConfig, evaluate_noisy_classifier,
                                      load_classifier_experiment, load_noisy_classifier, read_noisy_classifier,
                                      save_noisy_classifier, train_noisy_classifier)

SCHEDULE = NoiseSchedule.from_name("cosine", 1000)
CLASSIFIER_PRECOND = VPPrecond(SCHEDULE)          # the classifiers below take x_t and t of SCHEDULE


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + t_to_sigma(SCHEDULE.sigmas.log(), torch.as_tensor(t)) ** 2)


def sigma_of(t: torch.Tensor) -> torch.Tensor:
    return t_to_sigma(SCHEDULE.sigmas.log(), torch.as_tensor(t))


def ve(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x = x_t / sqrt(alpha-bar_t): the denoiser's VE-scaled input for the VP sample x_t."""
    return xt / alpha_bar(t).sqrt().reshape(-1, *([1] * (xt.ndim - 1)))


class QuadraticClassifier(torch.nn.Module):
    """logits_k = -|x - m_k|^2 / (2 (1 + t)): grad_x log p(y | x) = (m_y - sum_k p_k m_k) / (1 + t)."""

    def __init__(self, means: torch.Tensor):
        super().__init__()
        self.means = means                                               # (K, C, H, W)

    def forward(self, x, t):
        d2 = ((x[:, None] - self.means[None]) ** 2).flatten(2).sum(-1)  # (B, K)
        return -d2 / (2 * (1 + t.to(x.dtype)[:, None]))

    def grad(self, x, t, y):
        p = torch.softmax(self(x, t), dim=1)                             # (B, K)
        mean = torch.einsum("bk,kchw->bchw", p, self.means)
        return (self.means[y] - mean) / (1 + t.to(x.dtype)).reshape(-1, 1, 1, 1)


class FixedNet(torch.nn.Module):
    """A deterministic stand-in network with ``out`` channels, recording the condition records it receives."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels, self.labels = out_channels, []

    def forward(self, x, t, cond=None):
        self.labels.append(cond)
        base = torch.cat([x, x.flip(-1)], dim=1)[:, :self.out_channels]
        return 0.3 * base.sin() + 1e-3 * t.to(x.dtype).reshape(-1, 1, 1, 1)


def quadratic_setup():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    return QuadraticClassifier(means), x, torch.tensor([0.0, 10.0, 333.5, 999.0]), torch.tensor([0, 2, 1, 2])


# -- the algebra ---------------------------------------------------------------------------------------------
def test_log_prob_grad_is_the_analytic_gradient_even_under_no_grad():
    classifier, x, t, y = quadratic_setup()
    with torch.no_grad():
        grad = log_prob_grad(classifier, x, t, y)
    assert not grad.requires_grad and grad.shape == x.shape
    assert torch.allclose(grad, classifier.grad(x, t, y), atol=1e-12)
    # a scalar t reaches the classifier as a (B,) tensor
    assert torch.allclose(log_prob_grad(classifier, x, 7.0, y), classifier.grad(x, torch.full((4,), 7.0), y))


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("out_channels", [2, 4])
def test_guided_eps_in_every_parameterisation(kind, out_channels):
    # Alg. 2 on D: D^ = D + sigma^2 s grad_x log p(y | x), which is the old eps^ = eps - sqrt(1 - abar) s
    # grad_{x_t} log p(y | x_t) converted to x0 (grad_x = sqrt(abar) grad_{x_t}).
    classifier, xt, t, y = quadratic_setup()
    net, scale = FixedNet(out_channels), 2.5
    denoiser = Denoiser(net, VPPrecond(SCHEDULE, kind), learned_variance=out_channels == 4)
    guided = ClassifierGuidance(denoiser, classifier, CLASSIFIER_PRECOND, scale)
    x, sigma, cond = ve(xt, t), sigma_of(t), Cond(label=y)
    plain = denoiser.output(x, sigma, cond)
    raw = net(xt, t)
    with torch.no_grad():
        out = guided.output(x, sigma, cond)
    assert out.x0.shape == plain.x0.shape == x.shape
    abar = alpha_bar(t).reshape(-1, 1, 1, 1)
    grad = classifier.grad(xt, t, y)                                     # grad_{x_t} log p(y | x_t, t)
    expected = old_eps(kind, xt, abar, raw[:, :2]) - (1 - abar).sqrt() * scale * grad
    assert torch.allclose((x - out.x0) / sigma.reshape(-1, 1, 1, 1), expected, atol=1e-10)   # eps of D^
    assert torch.allclose(out.x0, old_x0("eps", xt, abar, expected), atol=1e-10)
    assert torch.allclose(out.x0, plain.x0 + sigma.reshape(-1, 1, 1, 1) ** 2 * scale * abar.sqrt() * grad,
                          atol=1e-10)
    if out_channels == 4:
        assert torch.equal(out.variance, plain.variance)                 # the learned variance is untouched
        assert torch.allclose(out.variance, raw[:, 2:], atol=1e-12)     # the raw second half
    else:
        assert out.variance is None
    no_label = guided.output(x, sigma)                                   # no record: the plain output
    assert torch.equal(no_label.x0, denoiser(x, sigma))
    zero = ClassifierGuidance(denoiser, classifier, CLASSIFIER_PRECOND, 0.0).output(x, sigma, cond)
    assert torch.equal(zero.x0, plain.x0)


def test_guided_eps_at_integer_timesteps_uses_the_schedules_alpha_bar():
    # Eq. 14 written out with alphas_cumprod[t] (the real-t interpolation must agree at integers)
    classifier, xt, _, y = quadratic_setup()
    t = torch.tensor([0, 1, 500, 999])
    net = FixedNet(2)
    abar = SCHEDULE.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sigma = SCHEDULE.sigmas[t]
    x = xt / abar.sqrt()
    denoiser = Denoiser(net, VPPrecond(SCHEDULE, "eps"))
    out = ClassifierGuidance(denoiser, classifier, CLASSIFIER_PRECOND, 3.0)(x, sigma, Cond(label=y))
    expected = net(xt, t) - (1 - abar).sqrt() * 3.0 * classifier.grad(xt, t.double(), y)
    assert torch.allclose((x - out) / sigma.reshape(-1, 1, 1, 1), expected, atol=1e-10)   # eps of D^
    assert torch.allclose(out, (xt - (1 - abar).sqrt() * expected) / abar.sqrt(), atol=1e-10)


class RecordingClassifier(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier, self.calls = classifier, []

    def forward(self, x, t):
        self.calls.append((x.detach(), t))
        return self.classifier(x, t)


def test_labels_reach_the_net_and_always_the_classifier():
    # The denoiser (conditional or not) gets the whole record; the classifier gets its label field, at its
    # own inputs x_t = c_in x and t = c_noise; a network with the wrong number of channels is refused.
    classifier, xt, t, y = quadratic_setup()
    net, recording = FixedNet(2), RecordingClassifier(classifier)
    cond = Cond(label=y)
    guided = ClassifierGuidance(Denoiser(net, VPPrecond(SCHEDULE, "eps")), recording, CLASSIFIER_PRECOND, 1.0)
    out = guided(ve(xt, t), sigma_of(t), cond)
    assert net.labels[0] is cond
    (x_in, t_in), = recording.calls
    assert torch.allclose(x_in, xt, atol=1e-12) and torch.allclose(t_in, t.double(), atol=1e-9)
    # the classifier scored the record's labels: the correction is its gradient for exactly those labels
    abar = alpha_bar(t).reshape(-1, 1, 1, 1)
    expected = net(xt, t) - (1 - abar).sqrt() * classifier.grad(xt, t, y)
    assert torch.allclose((ve(xt, t) - out) / sigma_of(t).reshape(-1, 1, 1, 1), expected, atol=1e-10)
    # another field name: the label is read from there
    renamed = ClassifierGuidance(Denoiser(FixedNet(2), VPPrecond(SCHEDULE, "eps")), classifier, CLASSIFIER_PRECOND,
                                 1.0, label="target")
    torch.testing.assert_close(renamed(ve(xt, t), sigma_of(t), Cond(target=y)), out, rtol=0, atol=1e-10)
    # a record without the guided field is not guided
    assert torch.equal(guided(ve(xt, t), sigma_of(t), Cond(target=y)), guided.inner(ve(xt, t), sigma_of(t)))
    with pytest.raises(DifflabError, match="prediction"):
        ClassifierGuidance(Denoiser(FixedNet(2), VPPrecond(SCHEDULE, "score")), classifier, CLASSIFIER_PRECOND, 1.0)
    with pytest.raises(DifflabError, match="channels"):
        ClassifierGuidance(Denoiser(FixedNet(3), VPPrecond(SCHEDULE, "eps")), classifier, CLASSIFIER_PRECOND,
                           1.0)(ve(xt, t), sigma_of(t), cond)


# -- the exact Gaussian mixture: its class posteriors are an exact noise-aware classifier -------------------
class ExactClassifier(torch.nn.Module):
    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, t):
        return self.mixture.class_posterior(x, alpha_bar(t)).log()       # logits: log p(k | x_t)


MIXTURE = GaussianMixture(torch.tensor([[-1.0, 0.3], [0.8, 0.0], [0.0, -1.2]]), torch.tensor([0.5, 0.4, 0.6]),
                          torch.tensor([0.5, 0.3, 0.2]))


class Unconditional(torch.nn.Module):
    """The exact model's network without its label: the unconditional model (the label reaches only the
    classifier)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None):
        return self.net(x, t)


def exact_denoiser(mixture, conditional=False) -> Denoiser:
    net = ExactEpsNet(mixture, SCHEDULE)
    return Denoiser(net if conditional else Unconditional(net), VPPrecond(SCHEDULE, "eps"))


def test_scale_one_on_the_exact_model_is_the_exact_conditional_model():
    # Bayes: grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t), at integer and real t
    unconditional, conditional = exact_denoiser(MIXTURE), exact_denoiser(MIXTURE, conditional=True)
    classifier = ExactClassifier(MIXTURE)
    xt = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    t, y = torch.tensor([0.0, 3.5, 100.0, 500.25, 850.0, 999.0]), torch.tensor([0, 1, 2, 0, 1, 2])
    x, sigma, cond = ve(xt, t), sigma_of(t), Cond(label=y)
    guided = ClassifierGuidance(unconditional, classifier, CLASSIFIER_PRECOND, 1.0)(x, sigma, cond)
    assert torch.allclose(guided, conditional(x, sigma, cond), atol=1e-8)
    assert not torch.allclose(guided, unconditional(x, sigma, cond), atol=1e-3)
    # the same identity in eps form (the old test's): eps^ = the exact conditional eps
    assert torch.allclose((x - guided) / sigma[:, None], ExactEpsNet(MIXTURE, SCHEDULE)(xt, t, cond), atol=1e-8)
    # and in score form: (D^ - D) / sigma^2 = s grad_x log p(y | x) = s sqrt(abar) (score(x_t | y) - score(x_t))
    abar = alpha_bar(t)
    shifted = ClassifierGuidance(unconditional, classifier, CLASSIFIER_PRECOND, 2.0)(x, sigma, cond)
    shift = (shifted - unconditional(x, sigma, cond)) / sigma[:, None] ** 2
    assert torch.allclose(shift, 2.0 * abar.sqrt()[:, None] * (MIXTURE.score(xt, abar, y) - MIXTURE.score(xt, abar)),
                          atol=1e-8)
    # scale 0: D unchanged
    assert torch.equal(ClassifierGuidance(unconditional, classifier, CLASSIFIER_PRECOND, 0.0)(x, sigma, cond),
                       unconditional(x, sigma, cond))


TWO_CLASSES = GaussianMixture(torch.tensor([[-0.4, 0.0], [0.4, 0.0]]), torch.tensor([0.4, 0.4]))


def fraction_favouring_class_0(denoiser, n=2000, cond=None, **sampler_options) -> float:
    """Ancestral samples (100 steps) with label 0 (or ``cond``); the fraction whose exact p(0 | x) exceeds 1/2."""
    grid = SCHEDULE.respace(space_timesteps(1000, 100))
    cond = Cond(label=torch.zeros(n, dtype=torch.long)) if cond is None else cond
    x = generate(sample_ancestral, denoiser, grid, (2,), range(n), batch_size=n, cond=cond,
                 variance="beta_tilde", dtype=torch.float64, **sampler_options)
    return (TWO_CLASSES.class_posterior(x)[:, 0] > 0.5).double().mean().item()


def test_guidance_raises_the_target_class_posterior_of_samples():
    # Two overlapping classes; the unconditional model guided towards class 0 (Alg. 2). s = 0: half the
    # samples favour class 0; s = 1: the exact conditional model; s = 4: sharper still.
    denoiser, classifier = exact_denoiser(TWO_CLASSES), ExactClassifier(TWO_CLASSES)
    fractions = [fraction_favouring_class_0(ClassifierGuidance(denoiser, classifier, CLASSIFIER_PRECOND, scale))
                 for scale in (0.0, 1.0, 4.0)]
    assert fractions[0] < fractions[1] < fractions[2]
    assert fractions[0] == pytest.approx(0.5, abs=0.05)
    x, labels = TWO_CLASSES.sample(20000, torch.Generator().manual_seed(1), return_labels=True)
    exact = (TWO_CLASSES.class_posterior(x[labels == 0])[:, 0] > 0.5).double().mean().item()
    assert fractions[1] == pytest.approx(exact, abs=0.05)                # about 0.84
    assert fractions[2] > exact + 0.05


def test_guided_ancestral_sampler_on_the_null_label_of_a_conditional_model():
    # (Replaces Alg. 1's mean shift in the ancestral sampler, which is gone: the ancestral chain now samples
    # the guided D.) The exact *conditional* model at its null label (2) is the unconditional model; the
    # classifier reads its target from another field, so the label reaches only the classifier.
    n = 1000
    denoiser = exact_denoiser(TWO_CLASSES, conditional=True)
    cond = Cond(label=torch.full((n,), 2, dtype=torch.long), target=torch.zeros(n, dtype=torch.long))
    fractions = [fraction_favouring_class_0(ClassifierGuidance(denoiser, ExactClassifier(TWO_CLASSES),
                                                               CLASSIFIER_PRECOND, scale, label="target"),
                                            n=n, cond=cond)
                 for scale in (0.0, 1.0, 4.0)]
    assert fractions[0] == pytest.approx(0.5, abs=0.05)
    assert fractions[1] == pytest.approx(0.84, abs=0.05)                 # about the exact conditional model
    assert fractions[2] > fractions[1] + 0.05


# -- networks ------------------------------------------------------------------------------------------------
def tiny_classifier(**overrides):
    config = dict(in_channels=1, image_size=12, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(6,), num_heads=2, groups=4, num_classes=5)
    return NoisyClassifier(NoisyClassifierConfig(**{**config, **overrides}))


def fill(net: torch.nn.Module) -> torch.nn.Module:
    """Deterministic non-zero weights, independent of any random generator."""
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.copy_(torch.sin(torch.arange(p.numel(), dtype=torch.float64) * 0.37 + i).reshape(p.shape) * 0.1)
    return net


def test_noisy_classifier_shapes_and_real_timesteps():
    net = fill(tiny_classifier()).eval()
    x = torch.randn(3, 1, 12, 12)
    logits = net(x, torch.tensor([0.0, 12.5, 999.0]))
    assert logits.shape == (3, 5)
    assert net(x, 7.0).shape == (3, 5)
    assert not torch.allclose(net(x, torch.tensor([12.5] * 3)), net(x, torch.tensor([13.0] * 3)))
    assert tiny_classifier(image_size=11)(torch.randn(2, 1, 11, 11), torch.tensor([1, 2])).shape == (2, 5)
    net.train()
    net(x, torch.tensor([1, 2, 3])).logsumexp(1).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_attention_pool_matches_full_attention():
    # ADM computes every position's attention output and keeps the mean token's; only that one is computed.
    net = fill(tiny_classifier())
    pool = net.pool
    h = torch.randn(2, 16, 6, 6)
    tokens = torch.cat([h.flatten(2).mean(-1, keepdim=True), h.flatten(2)], -1) + pool.positional_embedding
    q, k, v = pool.qkv(tokens).chunk(3, dim=1)                            # (B, C, N) each
    heads = lambda z: z.reshape(2, 2, 8, -1)                              # (B, heads, C/heads, N)
    weights = torch.softmax(torch.einsum("bhcn,bhcm->bhnm", heads(q), heads(k)) / math.sqrt(8), dim=-1)
    full = torch.einsum("bhnm,bhcm->bhcn", weights, heads(v)).reshape(2, 16, -1)
    assert torch.allclose(pool(h), pool.proj(full)[:, :, 0], atol=1e-5)


def test_unet_outputs_and_keys_unchanged_by_the_shared_encoder():
    config = UNetConfig(in_channels=2, image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), num_heads=2, groups=4, num_classes=3, out_channels=4)
    net = fill(UNet(config)).eval()
    x = torch.cos(torch.arange(2 * 2 * 8 * 8, dtype=torch.float32) * 0.11).reshape(2, 2, 8, 8)
    out = net(x, torch.tensor([2.5, 600.0]), Cond(label=torch.tensor([0, 3]))).double()
    # golden values from the U-Net before the encoder was shared with the classifier
    assert out.sum().item() == pytest.approx(11.533649349803454, rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(23.052979769257945, rel=1e-5)
    assert out[0, :, 3, 5].tolist() == pytest.approx([0.108492411673, 0.052639793605, -0.028533648700,
                                                      -0.044924590737], abs=1e-6)
    assert {k.split(".")[0] for k in net.state_dict()} == {
        "time_embed", "label_embed", "input_conv", "down", "middle", "up", "out_norm", "out_conv"}
    fresh = UNet(config)
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh.eval()(x, torch.tensor([2.5, 600.0]), Cond(label=torch.tensor([0, 3]))).double(), out)


def test_classifier_and_unet_share_the_encoder():
    unet = fill(UNet(UNetConfig(in_channels=1, image_size=12, model_channels=8, channel_mult=(1, 2),
                                num_res_blocks=1, attention_resolutions=(6,), num_heads=2, groups=4))).eval()
    classifier = tiny_classifier().eval()
    encoder = {k: v for k, v in unet.state_dict().items() if not k.startswith(("up.", "out_"))}
    missing, unexpected = classifier.load_state_dict(encoder, strict=False)
    assert not unexpected and set(missing) == {k for k in classifier.state_dict() if k.startswith(("out_norm", "pool"))}
    x, t = torch.randn(2, 1, 12, 12), torch.tensor([4.0, 40.0])
    assert torch.equal(classifier.encode(x, t)[0], unet.encode(x, t)[0])


# -- training and files ----------------------------------------------------------------------------------------
def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    """A labelled 28x28 stand-in for Fashion-MNIST: class k is a bright band at row 3k."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 3 * k:3 * k + 3] = 250
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def tiny_experiment(data_path, out_dir) -> ClassifierExperiment:
    return ClassifierExperiment(
        data=DataConfig(dataset="fashion_mnist", path=str(data_path), image_size=28),
        diffusion=DiffusionConfig(schedule="cosine", timesteps=100),
        classifier=NoisyClassifierConfig(model_channels=8, channel_mult=(1, 2), attention_resolutions=(14,),
                                         num_heads=2, groups=4),
        train=ClassifierTrainConfig(out_dir=str(out_dir), steps=3, batch_size=16, log_every=2, checkpoint_every=2,
                                    eval_timesteps=(0, 99), eval_examples=20, device="cpu"))


def test_tiny_training_run_writes_a_file_that_loads_back(fake_fashion_mnist, tmp_path):
    experiment = tiny_experiment(fake_fashion_mnist, tmp_path / "run")
    result = train_noisy_classifier(experiment, progress=False)
    assert result.step == 3 and result.stopped_by == "steps" and math.isfinite(result.last_loss)
    assert set(result.accuracy) == {0, 99} and all(0 <= a <= 1 for a in result.accuracy.values())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 3] and "test_accuracy" in records[-1]
    model, diffusion_config = load_noisy_classifier(tmp_path / "run")
    assert diffusion_config == experiment.diffusion
    assert model.config.num_classes == 10 and model.config.in_channels == 1 and not model.training
    raw, _ = load_noisy_classifier(result.checkpoint, weights="model")
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw.state_dict().values()))
    # a classifier evaluated on its own training schedule
    test = build_data(experiment.data, split="test")
    accuracy = evaluate_noisy_classifier(model, test, build_schedule(experiment.diffusion), (0, 50))
    assert set(accuracy) == {0, 50}


def test_save_and_load_round_trip_and_clear_errors(tmp_path):
    experiment = ClassifierExperiment(classifier=NoisyClassifierConfig(
        image_size=12, model_channels=8, channel_mult=(1, 2), attention_resolutions=(6,), num_heads=2, groups=4,
        num_classes=5))
    model = fill(NoisyClassifier(experiment.classifier))
    path = save_noisy_classifier(tmp_path / "c.safetensors", experiment, {"step": 1}, model)
    loaded, diffusion_config = load_noisy_classifier(path)                 # no EMA in the file: the raw weights
    assert diffusion_config == experiment.diffusion
    for (name, a), (other, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == other and torch.equal(a, b)
    x, t = torch.randn(2, 1, 12, 12), torch.tensor([3.0, 300.0])
    assert torch.equal(model.eval()(x, t), loaded(x, t))

    with pytest.raises(DifflabError, match="does not exist"):
        load_noisy_classifier(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DifflabError, match="not a readable safetensors"):
        load_noisy_classifier(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DifflabError, match="truncated.safetensors"):
        load_noisy_classifier(truncated)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other), metadata={"format": "difflab-checkpoint/1"})
    with pytest.raises(DifflabError, match="not a difflab noise-aware classifier"):
        load_noisy_classifier(other)
    bad_config = tmp_path / "bad_config.safetensors"
    save_file({"model.w": torch.zeros(1)}, str(bad_config),
              metadata={"format": "difflab-noisy-classifier/1", "config": '{"classifier": {"bogus": 1}}'})
    with pytest.raises(DifflabError, match="invalid noise-aware classifier config"):
        load_noisy_classifier(bad_config)
    mismatched = ClassifierExperiment(classifier=NoisyClassifierConfig(
        image_size=12, model_channels=16, channel_mult=(1, 2), attention_resolutions=(6,), num_heads=2, groups=4))
    wrong = tmp_path / "wrong.safetensors"
    save_noisy_classifier(wrong, mismatched, {}, model)
    with pytest.raises(DifflabError, match="do not fit"):
        load_noisy_classifier(wrong)


def test_experiment_yaml_and_overrides(tmp_path):
    experiment = load_classifier_experiment("configs/fmnist_noisy_classifier.yaml", ["train.steps=7"])
    assert experiment.train.steps == 7
    assert (experiment.diffusion.schedule, experiment.diffusion.timesteps) == ("cosine", 1000)
    assert experiment.classifier.channel_mult == (1, 2, 3) and experiment.data.image_size == 28
    with pytest.raises(DifflabError, match="classifier.bogus"):
        load_classifier_experiment("configs/fmnist_noisy_classifier.yaml", ["classifier.bogus=1"])
    with pytest.raises(DifflabError, match="does not exist"):
        load_classifier_experiment(tmp_path / "none.yaml")


def test_training_needs_labelled_images(tmp_path):
    experiment = ClassifierExperiment(data=DataConfig(dataset="toy", num_points=64),
                                      train=ClassifierTrainConfig(out_dir=str(tmp_path), device="cpu"))
    with pytest.raises(DifflabError, match="labelled images"):
        train_noisy_classifier(experiment, progress=False)


# -- the pipeline and the command line -----------------------------------------------------------------------
def test_pipeline_and_cli_guide_with_a_trained_classifier_file(fake_fashion_mnist, tmp_path):
    """``difflab train-classifier`` writes a file; ``sample(..., classifier=...)`` guides the ancestral and the
    sigma-space samplers (both sample the corrected D) with it; the classifier is fed the inputs of its own
    schedule, also for a model on another one (T = 50 against its T = 100)."""

    experiment = tiny_experiment(fake_fashion_mnist, tmp_path / "clf")
    (tmp_path / "clf.yaml").write_text(yaml.safe_dump(to_dict(experiment)))
    assert main(["train-classifier", str(tmp_path / "clf.yaml"), "--quiet", "--set", "train.steps=2"]) == 0
    path = str(tmp_path / "clf")

    def model(timesteps):
        config = Config(data=DataConfig(dataset="fashion_mnist", path=str(fake_fashion_mnist), image_size=28),
                        model=ModelConfig("unet", {"model_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                                                   "attention_resolutions": [], "groups": 4}),
                        diffusion=DiffusionConfig(schedule="cosine", timesteps=timesteps))
        denoiser, spec = build_model(config, build_data(config.data))
        return denoiser.eval(), spec

    denoiser, spec = model(100)
    cond = Cond(label=torch.tensor([1, 2]))
    for sampler in ("ancestral", "ddim"):
        plain = sample(denoiser, 2, SampleConfig(sampler=sampler, steps=5), cond, spec=spec)
        guided = sample(denoiser, 2, SampleConfig(sampler=sampler, steps=5, classifier=path,
                                                  classifier_scale=20.0), cond, spec=spec)
        assert not torch.allclose(plain, guided, atol=1e-3), sampler
    # (A schedule mismatch used to be refused.) A model on another schedule: the classifier is fed x_t and t of
    # its own training schedule (T = 100) at the model's (T = 50) noise levels.
    other, other_spec = model(50)
    options = SampleConfig(sampler="ancestral", steps=5, classifier=path, classifier_scale=1.0, clip_x0=False)
    wrapped = guided_model(other, other_spec, options, cond)
    assert isinstance(wrapped, ClassifierGuidance)
    own = build_schedule(experiment.diffusion)                          # the classifier's: cosine, T = 100
    assert torch.equal(wrapped.classifier_precond.schedule.betas, own.betas)
    sigmas = other.precond.schedule.sigmas
    inside = (sigmas >= own.sigmas[0]) & (sigmas <= own.sigmas[-1])
    assert inside.sum() > 40
    _, _, c_in, c_noise = wrapped.classifier_precond.scalings(sigmas[inside])
    torch.testing.assert_close(t_to_sigma(own.sigmas.log(), c_noise), sigmas[inside])   # the same noise level
    torch.testing.assert_close(c_in, 1 / (1 + sigmas[inside] ** 2).sqrt())
    assert torch.isfinite(sample(other, 2, options, cond, spec=other_spec)).all()
    with pytest.raises(DifflabError, match="--classifier"):
        sample(denoiser, 2, SampleConfig(steps=5, classifier_scale=1.0), cond, spec=spec)


def test_classifier_training_resumes_exactly(fake_fashion_mnist, tmp_path):
    def experiment(out, steps, **train):
        e = tiny_experiment(fake_fashion_mnist, out)
        return dataclasses.replace(e, train=dataclasses.replace(e.train, steps=steps, eval_examples=0,
                                                                checkpoint_every=1000, **train))

    full = train_noisy_classifier(experiment(tmp_path / "full", 4), progress=False)
    train_noisy_classifier(experiment(tmp_path / "split", 2), progress=False)
    with pytest.raises(DifflabError, match=r"does not match the config: train\.lr"):
        train_noisy_classifier(experiment(tmp_path / "split", 4, lr=0.1), progress=False, resume=True)
    split = train_noisy_classifier(experiment(tmp_path / "split", 4), progress=False, resume=True)
    assert full.step == split.step == 4
    a, b = read_noisy_classifier(full.checkpoint), read_noisy_classifier(split.checkpoint)
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    with pytest.raises(DifflabError, match="does not exist"):
        train_noisy_classifier(experiment(tmp_path / "none", 4), progress=False, resume=True)
