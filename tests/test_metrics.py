"""FID, KID, precision/recall and the class-probability scores against closed forms; the feature extractors
(the shipped Fashion-MNIST classifier, user callables, the Inception adapter) and the statistics cache."""

import math
import sys
import types

import numpy as np
import pytest
import torch

from difflab.data import load_fashion_mnist
from difflab.errors import DifflabError
from difflab.metrics import (CallableExtractor, GaussianFit, class_accuracy, extract, fid, frechet_distance,
                             inception_score, kid, load_classifier, load_fmnist_classifier, precision_recall,
                             reference_stats)
from difflab.metrics.features import save_classifier
from difflab.metrics.inception import InceptionExtractor
from difflab.metrics.kid import polynomial_kernel
from difflab.nets.classifier import Classifier, ClassifierConfig


def random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# -- FID ------------------------------------------------------------------------------------------------------
def test_frechet_distance_of_commuting_gaussians_is_closed_form():
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(GaussianFit(mu1, np.diag(a)), GaussianFit(mu2, np.diag(b))) == pytest.approx(expected)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    for d in (2, 7, 30):
        s1, s2 = random_cov(rng, d), random_cov(rng, d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(GaussianFit(mu1, s1), GaussianFit(mu2, s2)) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_the_analytic_distance():
    rng = np.random.default_rng(1)
    d, n = 4, 100_000
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    analytic = frechet_distance(GaussianFit(mu1, s1), GaussianFit(mu2, s2))
    x = rng.multivariate_normal(mu1, s1, n)
    y = rng.multivariate_normal(mu2, s2, n)
    assert fid(x, y) == pytest.approx(analytic, rel=0.03)
    assert fid(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid(x[: n // 2], x[n // 2:]) < 0.01 * analytic


def test_fid_rejects_bad_features():
    with pytest.raises(DifflabError, match="first feature set"):
        fid(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(DifflabError, match="2- and 3-dimensional"):
        fid(np.zeros((5, 2)), np.ones((5, 3)))
    with pytest.raises(DifflabError, match="NaN"):
        fid(np.full((5, 2), np.nan), np.ones((5, 2)))


# -- KID ------------------------------------------------------------------------------------------------------
def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(12, 3))
    k = lambda a, b: (a @ b / 3 + 1) ** 3                                   # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    result = kid(x, y, subsets=3, subset_size=m)                         # the whole sets, in any order
    assert result.mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and result.std < 1e-10
    assert polynomial_kernel(x, y)[1, 2] == pytest.approx(k(x[1], y[2]))


def test_kid_is_unbiased():
    rng = np.random.default_rng(3)
    # Same distribution: mean over nearly independent small subsets is 0 within its standard error ...
    x, y = rng.normal(size=(20_000, 8)), rng.normal(size=(20_000, 8))
    same = kid(x, y, subsets=100, subset_size=100)
    assert abs(same.mean) < 3 * same.std / math.sqrt(100)
    # ... and for different distributions small subsets estimate the same value as large ones.
    z = rng.normal(0.3, 1.1, size=(20_000, 8))
    small, large = kid(x, z, subsets=200, subset_size=50), kid(x, z, subsets=5, subset_size=2000)
    error = 3 * small.std / math.sqrt(200) + 3 * large.std / math.sqrt(5)
    assert small.mean == pytest.approx(large.mean, abs=error)
    assert large.mean > 5 * error          # the comparison is not vacuous


# -- precision and recall -------------------------------------------------------------------------------------
def test_precision_recall_of_identical_and_far_sets():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 5))
    assert (precision_recall(x, x).precision, precision_recall(x, x).recall) == (1.0, 1.0)
    far = precision_recall(x, x + 100.0)
    assert (far.precision, far.recall) == (0.0, 0.0)


def test_precision_recall_of_a_half_wrong_set():
    # Half the generated points lie far away: precision ~ 1/2; the real set is still covered: recall ~ 1.
    rng = np.random.default_rng(5)
    real = rng.normal(size=(2000, 2))
    fake = np.concatenate([rng.normal(size=(1000, 2)), rng.normal(size=(1000, 2)) + 50])
    result = precision_recall(real, fake, k=3)
    assert 0.45 <= result.precision <= 0.5 and result.recall > 0.9


def test_precision_recall_radius_is_the_kth_neighbour():
    # Points on a line at 0, 1, 3, 6 (gaps 1, 2, 3): with k = 1 the radii are 1, 1, 2, 3.
    real = np.array([[0.0], [1.0], [3.0], [6.0]])
    # -1.5 and 9.1 lie just outside (of 0's radius 1 and 6's radius 3), 8.9 and 4.5 just inside
    assert precision_recall(real, np.array([[-1.5], [8.9], [9.1], [4.5]]), k=1).precision == 0.5
    with pytest.raises(DifflabError, match="k=4"):
        precision_recall(real, real, k=4)


# -- class-probability scores ---------------------------------------------------------------------------------
def test_inception_score_limits():
    confident_diverse = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(confident_diverse, splits=10).mean == pytest.approx(10.0)
    assert inception_score(np.eye(10)[np.zeros(1000, int)]).mean == pytest.approx(1.0)
    assert inception_score(np.full((1000, 10), 0.1)).mean == pytest.approx(1.0)
    # Two equiprobable classes predicted with certainty: exp(log 2) = 2.
    assert inception_score(np.eye(10)[np.arange(1000) % 2], splits=5).mean == pytest.approx(2.0)
    with pytest.raises(DifflabError, match="sum to 1"):
        inception_score(np.ones((10, 10)))


def test_class_accuracy():
    probs = np.eye(3)[[0, 1, 2, 2]]
    assert class_accuracy(probs, [0, 1, 2, 0]) == 0.75
    with pytest.raises(DifflabError, match="4 probability rows but 3 labels"):
        class_accuracy(probs, [0, 1, 2])


# -- feature extractors ---------------------------------------------------------------------------------------
@pytest.fixture
def tiny_classifier_file(tmp_path):
    torch.manual_seed(0)
    net = Classifier(ClassifierConfig(channels=(4, 8), convs_per_stage=1, feature_dim=6)).eval()
    return save_classifier(net, tmp_path / "tiny.safetensors", {"test_accuracy": 0.1})


def fmnist_images(n, size=28):
    return load_fashion_mnist("test", image_size=size).data[:n]


def test_classifier_extractor_scores_28_and_padded_32_alike(tiny_classifier_file):
    extractor = load_classifier(tiny_classifier_file)
    assert extractor.metadata["test_accuracy"] == 0.1 and extractor.name.startswith("tiny-")
    out28, out32 = extractor(fmnist_images(16, 28)), extractor(fmnist_images(16, 32))
    assert out28["features"].shape == (16, 6) and out28["probs"].shape == (16, 10)
    assert torch.equal(out28["features"], out32["features"])
    assert torch.allclose(out28["probs"].sum(1), torch.ones(16))
    with pytest.raises(DifflabError, match=r"\(4, 1, 30, 29\)"):
        extractor(torch.zeros(4, 1, 30, 29, dtype=torch.uint8))
    with pytest.raises(DifflabError, match="uint8"):
        extractor(torch.zeros(4, 1, 28, 28))


def test_classifier_name_follows_its_weights(tiny_classifier_file, tmp_path):
    net = load_classifier(tiny_classifier_file).net
    (tmp_path / "same").mkdir(), (tmp_path / "changed").mkdir()
    same = save_classifier(net, tmp_path / "same" / "tiny.safetensors", {"test_accuracy": 0.1})
    with torch.no_grad():
        net.head[1].bias += 1
    changed = save_classifier(net, tmp_path / "changed" / "tiny.safetensors", {"test_accuracy": 0.1})
    name = load_classifier(tiny_classifier_file).name
    assert load_classifier(same).name == name and load_classifier(changed).name != name
    with pytest.raises(DifflabError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")


def test_shipped_classifier_is_accurate():
    extractor = load_fmnist_classifier()
    assert extractor.metadata["test_accuracy"] >= 0.92
    data = load_fashion_mnist("test", image_size=32)
    out = extract(extractor, data.data[:2000], batch_size=1000)
    assert out["features"].shape == (2000, extractor.net.config.feature_dim)
    assert class_accuracy(out["probs"], data.labels[:2000]) >= 0.9


def test_callable_extractor_and_batching():
    extractor = CallableExtractor(lambda x: x.float().flatten(1)[:, :5], name="first-pixels")
    images = torch.randint(0, 256, (23, 1, 4, 4), dtype=torch.uint8)
    out = extract(extractor, images, batch_size=5)
    assert out["features"].shape == (23, 5) and "probs" not in out
    np.testing.assert_array_equal(out["features"], images.flatten(1)[:, :5].double().numpy())


# -- Inception adapter: without the packages here, a fake package checks the plumbing ------------------------
def test_inception_without_packages_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)       # makes `import pytorch_fid` fail
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(DifflabError, match="pip install pytorch-fid"):
        InceptionExtractor(tmp_path / "weights.pth")


class FakeInceptionV3(torch.nn.Module):
    """Stands in for pytorch_fid.inception.InceptionV3: loads its weights through load_state_dict_from_url."""

    BLOCK_INDEX_BY_DIM = {2048: 3}

    def __init__(self, output_blocks):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2048)
        self.load_state_dict(sys.modules["pytorch_fid.inception"].load_state_dict_from_url("https://unreachable"))

    def forward(self, x):                                        # floats in [0, 1], (B, 3, H, W)
        return [self.proj(x.mean(dim=(2, 3)))[:, :, None, None]]


@pytest.fixture
def fake_pytorch_fid(monkeypatch):
    package, module = types.ModuleType("pytorch_fid"), types.ModuleType("pytorch_fid.inception")
    module.InceptionV3 = FakeInceptionV3
    module.load_state_dict_from_url = lambda *a, **k: pytest.fail("the extractor must not download weights")
    package.inception = module
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
    return module


def test_inception_loads_user_weights_into_the_package_model(fake_pytorch_fid, tmp_path):
    torch.manual_seed(0)
    weights = {"proj.weight": torch.randn(2048, 3), "proj.bias": torch.randn(2048)}
    torch.save(weights, tmp_path / "pt_inception.pth")
    extractor = InceptionExtractor(tmp_path / "pt_inception.pth")
    assert extractor.backend == "pytorch_fid" and extractor.name.startswith("inception_pool3-pytorch_fid-")
    grey = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    features = extractor(grey)["features"]
    expected = (grey.float() / 255).mean(dim=(2, 3)).expand(-1, 3) @ weights["proj.weight"].T + weights["proj.bias"]
    assert features.shape == (5, 2048) and torch.allclose(features, expected, atol=1e-5)
    assert fake_pytorch_fid.load_state_dict_from_url is not None      # restored after construction
    with pytest.raises(DifflabError, match="1- or 3-channel"):
        extractor(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))


class Opaque:
    pass


def test_inception_refuses_pickled_code(fake_pytorch_fid, tmp_path):
    torch.save({"proj.weight": Opaque()}, tmp_path / "evil.pth")
    with pytest.raises(DifflabError, match="weights_only"):
        InceptionExtractor(tmp_path / "evil.pth")
    with pytest.raises(DifflabError, match="do not exist"):
        InceptionExtractor(tmp_path / "missing.pth")


# -- cached reference statistics ------------------------------------------------------------------------------
def test_reference_stats_are_computed_once_and_cached(tmp_path):
    calls = []
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)

    def load():
        calls.append(1)
        return images

    extractor = CallableExtractor(lambda x: x.float().flatten(1), name="pixels")
    first = reference_stats("toyset", "test", 4, extractor, load, cache_dir=tmp_path)
    second = reference_stats("toyset", "test", 4, extractor, load, cache_dir=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.features, second.features)
    np.testing.assert_allclose(second.fit.cov, np.cov(images.flatten(1).double().numpy(), rowvar=False))
    assert [p.name for p in tmp_path.iterdir()] == ["toyset-test-4px-pixels.npz"]     # no temporary files left
    reference_stats("toyset", "test", 4, CallableExtractor(extractor.fn, "other"), load, cache_dir=tmp_path)
    assert len(calls) == 2
    (tmp_path / "toyset-test-4px-pixels.npz").write_bytes(b"garbage")
    with pytest.raises(DifflabError, match="corrupt cached statistics"):
        reference_stats("toyset", "test", 4, extractor, load, cache_dir=tmp_path)
