"""Noise-level grids optimised for a solver and an NFE budget (difflab.pipelines.grid_search), on the exact
Gaussian mixture: closer to the reference ODE than the logsnr grid of the same NFE (on other noise seeds than
the search's, and in distribution), valid and deterministic; grid files written beside a checkpoint and read
back, with one-line errors on bad files."""

import json
import math

import pytest
import torch

from difflab.build import build_data, build_model
from difflab.checkpoint import save_checkpoint
from difflab.config import load_config
from difflab.denoiser import Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.metrics import sliced_wasserstein
from difflab.pipelines.grid_search import distance, grid_of, load_grid, nelder_mead, optimise_grid, theta_of, tune_grid
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.samplers import SAMPLERS, CountingModel, generate, logsnr_sigmas, steps_for_nfe
from difflab.schedules import NoiseSchedule

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny 2-D batches (conftest.py)

MIXTURE = GaussianMixture.ring(k=8, radius=1.5, std=0.15)
SCHEDULE = NoiseSchedule.from_name("linear", 1000)
MODEL = Denoiser(ExactEpsNet(MIXTURE, SCHEDULE), VPPrecond(SCHEDULE, "eps"))
SIGMA_MIN, SIGMA_MAX = SCHEDULE.sigmas[0].item(), SCHEDULE.sigmas[-1].item()


def search(sampler="dpmpp-2m", nfe=5, **kwargs):
    options = dict(n_samples=200, sigma_max=SIGMA_MAX, reference_steps=50, max_evals=150, batch_size=200)
    return optimise_grid(MODEL, sampler, nfe, (2,), **{**options, **kwargs})


@pytest.fixture(scope="module")
def found():
    return search()


def samples(sampler, sigmas, seeds):
    grid = torch.tensor([*sigmas, 0.0], dtype=torch.float64)
    return generate(SAMPLERS[sampler], MODEL, grid, (2,), seeds, len(seeds), prior_std=math.sqrt(1 + sigmas[0] ** 2))


def test_optimised_grid_is_closer_to_the_reference_ode_than_logsnr_on_other_seeds(found):
    seeds = list(range(500))                                      # the search used 10^6 .. 10^6 + 199
    reference = samples("dpmpp-2m", logsnr_sigmas(100, SIGMA_MIN, SIGMA_MAX)[:-1].tolist(), seeds)
    logsnr = logsnr_sigmas(5, SIGMA_MIN, SIGMA_MAX)[:-1].tolist()
    ours = distance(samples("dpmpp-2m", found.sigmas, seeds), reference, "trajectory")
    theirs = distance(samples("dpmpp-2m", logsnr, seeds), reference, "trajectory")
    assert ours < 0.5 * theirs, (ours, theirs)
    assert found.loss < 0.5 * found.start_loss and found.start_sigmas == pytest.approx(logsnr)


def test_optimised_grid_is_closer_to_the_mixture_than_logsnr(found):
    seeds = list(range(2000))
    truth = MIXTURE.sample(2000, torch.Generator().manual_seed(123))
    logsnr = logsnr_sigmas(5, SIGMA_MIN, SIGMA_MAX)[:-1].tolist()
    ours = sliced_wasserstein(samples("dpmpp-2m", found.sigmas, seeds).double(), truth)
    theirs = sliced_wasserstein(samples("dpmpp-2m", logsnr, seeds).double(), truth)
    assert ours < 0.6 * theirs, (ours, theirs)


def test_grid_is_decreasing_positive_within_the_range_and_deterministic(found):
    sigmas = found.sigmas
    assert len(sigmas) == 5 and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert sigmas[0] <= SIGMA_MAX and sigmas[-1] >= SIGMA_MIN * (1 - 1e-9)
    assert search().sigmas == sigmas                               # same seeds, same grid
    assert search(seed=7).sigmas != sigmas                          # the seeds are used


def test_heun_grid_keeps_the_nfe_budget():
    result = search("heun", nfe=5, max_evals=40)
    assert len(result.sigmas) == steps_for_nfe("heun", 5) == 3
    counting = CountingModel(MODEL)
    grid = torch.tensor([*result.sigmas, 0.0], dtype=torch.float64)
    generate(SAMPLERS["heun"], counting, grid, (2,), [0, 1], prior_std=math.sqrt(1 + result.sigmas[0] ** 2))
    assert counting.nfe == 5 and result.loss <= result.start_loss


def test_theta_maps_to_decreasing_grids_below_sigma_max_and_back():
    theta = [0.3, -1.0, 2.0, 0.0]
    sigmas = grid_of(theta, 80.0)
    assert sigmas[0] == pytest.approx(80 * math.exp(-0.3)) and all(a > b > 0 for a, b in zip(sigmas, sigmas[1:]))
    assert grid_of([-0.3, *theta[1:]], 80.0) == sigmas                # reflected at sigma_max
    assert theta_of(sigmas, 80.0) == pytest.approx(theta)


def test_nelder_mead_finds_the_minimum_of_a_narrow_valley():
    def rosenbrock(x):
        return (1 - x[0]) ** 2 + 10 * (x[1] - x[0] ** 2) ** 2
    x, value, evals = nelder_mead(rosenbrock, [-1.0, 1.0], rosenbrock([-1.0, 1.0]), [0.5, 0.5], 400)
    assert x == pytest.approx([1.0, 1.0], abs=0.02) and value < 1e-4 and evals <= 410


def test_stochastic_samplers_and_bad_criteria_are_refused():
    with pytest.raises(DifflabError, match="deterministic"):
        search("euler-ancestral")
    with pytest.raises(DifflabError, match="criterion"):
        search(criterion="fid")


def test_tune_grid_writes_a_file_beside_the_checkpoint_that_load_grid_reads(tmp_path):
    config = load_config("configs/toy.yaml", ["train.steps=1", "data.num_points=64"])
    denoiser, spec = build_model(config, build_data(config.data))
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoint.safetensors", config, {"step": 3}, denoiser.net,
                                 records={"model": spec.to_json()})
    content = tune_grid(checkpoint, "unipc", 3, n_samples=32, reference_steps=8, max_evals=12, progress=False)
    path = tmp_path / "run" / "grids" / "unipc_nfe3.json"
    assert json.loads(path.read_text()) == content
    assert content["sampler"] == "unipc" and content["nfe"] == 3 and content["step"] == 3
    assert content["criterion"] == "trajectory" and content["reference"]["steps"] == 8
    assert load_grid(path) == ("unipc", tuple(content["sigmas"]))
    assert not list(path.parent.glob(".*tmp*"))                     # written atomically


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"sampler": "ancestral", "sigmas": [1.0]}', "sigma-space samplers"),
    ('{"sampler": "heun", "sigmas": []}', "non-empty list"),
    ('{"sampler": "heun", "sigmas": [1.0, "a"]}', "non-empty list"),
    ('{"sampler": "heun", "sigmas": [1.0, 2.0]}', "decreasing"),
    ('{"sampler": "heun", "sigmas": [1.0, 0.0]}', "positive"),
    ('{"sampler": "heun", "nfe": 5, "sigmas": [2.0, 1.0]}', "do not match"),
])
def test_load_grid_names_the_file_and_the_fault(tmp_path, text, message):
    path = tmp_path / "grid.json"
    path.write_text(text)
    with pytest.raises(DifflabError, match=message) as error:
        load_grid(path)
    assert str(path) in str(error.value)
    with pytest.raises(DifflabError, match="does not exist"):
        load_grid(tmp_path / "missing.json")
