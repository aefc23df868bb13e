"""The k-diffusion adapter both ways, checked against k-diffusion's own code (``difflab.adapters``).

k-diffusion's package ``__init__`` imports its training stack (torchvision, wandb, clip, ...), which is not
installed here; its ``sampling`` and ``external`` modules need only torch, scipy, torchsde, torchdiffeq and
``utils.append_dims``. They are loaded as they are from the installed package, under a package object that
skips the ``__init__``, with ``utils`` reduced to that one function (k-diffusion's own three lines).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from difflab.adapters import from_k_diffusion, to_k_diffusion
from difflab.conditioning import Cond
from difflab.denoiser import Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import karras
from difflab.samplers.dpm_solver import sample_dpmpp_2m
from difflab.samplers.noise import PerSampleNoise
from difflab.samplers.sigmas import karras_sigmas
from difflab.schedules import NoiseSchedule


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """k_diffusion.utils.append_dims."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


@pytest.fixture(scope="module")
def k_diffusion():
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None, "k-diffusion is not installed (scripts/install.sh installs it for the tests)"
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "k_diffusion"}
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = append_dims
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    package.utils = utils
    try:
        yield types.SimpleNamespace(sampling=importlib.import_module("k_diffusion.sampling"),
                                    external=importlib.import_module("k_diffusion.external"))
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "k_diffusion"]:
            del sys.modules[name]
        sys.modules.update(saved)


MIXTURE = GaussianMixture.ring()
SCHEDULE = NoiseSchedule.from_name("cosine", 1000)


def exact_denoiser() -> Denoiser:
    return Denoiser(ExactEpsNet(MIXTURE, SCHEDULE), VPPrecond(SCHEDULE, "eps"))


def start(sigma_max: float, n: int = 16) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_k_diffusion_samplers_drive_a_difflab_denoiser_as_difflab_does(k_diffusion, name):
    """to_k_diffusion: k-diffusion's Euler, Heun and DPM-Solver++(2M) on a difflab denoiser give difflab's own
    samplers' trajectories end points."""
    denoiser = exact_denoiser()
    model = to_k_diffusion(denoiser)
    sigmas = karras_sigmas(12, model.sigma_min, model.sigma_max).double()
    theirs_grid = k_diffusion.sampling.get_sigmas_karras(12, model.sigma_min, model.sigma_max)    # float32
    torch.testing.assert_close(theirs_grid.double(), sigmas, rtol=1e-5, atol=0)
    ours = {"euler": karras.sample_euler, "heun": karras.sample_heun, "dpmpp_2m": sample_dpmpp_2m}[name]
    theirs = getattr(k_diffusion.sampling, f"sample_{name}")
    x = start(model.sigma_max)
    expected = ours(denoiser, x, sigmas, PerSampleNoise(range(len(x))))
    torch.testing.assert_close(theirs(model, x, sigmas, disable=True), expected, rtol=1e-7, atol=1e-7)


def test_k_diffusion_passes_the_condition_record_through_extra_args(k_diffusion):
    """extra_args={"cond": record}: a class-conditional sample lands at its class's component."""
    model = to_k_diffusion(exact_denoiser())
    x = start(model.sigma_max, n=64)
    labels = torch.full((64,), 3)
    sigmas = k_diffusion.sampling.get_sigmas_karras(20, model.sigma_min, model.sigma_max).double()
    samples = k_diffusion.sampling.sample_heun(model, x, sigmas, extra_args={"cond": Cond(label=labels)},
                                               disable=True)
    distances = torch.cdist(samples, MIXTURE.means.to(samples))
    assert (distances.argmin(dim=1) == 3).all()


def test_a_k_diffusion_discrete_wrapper_is_difflabs_vp_preconditioning(k_diffusion):
    """from_k_diffusion on k-diffusion's DiscreteEpsDDPMDenoiser (its CompVis/OpenAI wrapper) around an eps
    network equals difflab's VPPrecond around the same network at every sigma, including between the
    schedule's steps (both interpolate log-sigma), and difflab's samplers give the same samples as k-diffusion's."""
    net = ExactEpsNet(MIXTURE, SCHEDULE)
    wrapped = k_diffusion.external.DiscreteEpsDDPMDenoiser(net, SCHEDULE.alphas_cumprod, quantize=False)
    adapted, ours = from_k_diffusion(wrapped), exact_denoiser()
    assert adapted.precond.sigma_min == pytest.approx(ours.precond.sigma_min)
    assert adapted.precond.sigma_max == pytest.approx(ours.precond.sigma_max)
    x = torch.randn(32, 2, dtype=torch.float64) * 3
    for sigma in (0.01, 0.37, 2.0, 55.0):
        torch.testing.assert_close(adapted(x, sigma), ours(x, sigma), rtol=1e-6, atol=1e-6)
    sigmas = karras_sigmas(10, ours.precond.sigma_min, 80.0).double()
    x = start(80.0)
    torch.testing.assert_close(karras.sample_heun(adapted, x, sigmas, PerSampleNoise(range(len(x)))),
                               k_diffusion.sampling.sample_heun(wrapped, x, sigmas, disable=True),
                               rtol=1e-7, atol=1e-7)


def test_from_k_diffusion_needs_a_noise_range():
    with pytest.raises(DifflabError, match="sigma_min/sigma_max"):
        from_k_diffusion(torch.nn.Identity())
    denoiser = from_k_diffusion(lambda_model(), sigma_min=0.002, sigma_max=80.0)
    x = torch.randn(4, 2)
    torch.testing.assert_close(denoiser(x, 1.5), x / 2.5)


def lambda_model() -> torch.nn.Module:
    """A k-diffusion-convention model: D(x; sigma) = x / (1 + sigma)."""

    class Shrink(torch.nn.Module):
        def forward(self, x, sigma):
            return x / (1 + append_dims(sigma, x.ndim))

    return Shrink()
