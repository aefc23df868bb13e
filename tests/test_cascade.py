"""Cascades (Ho et al. 2021) and the Efficient U-Net (Saharia et al. 2022, App. B): the super-resolution stage
sees the augmentation it was trained and sampled with, truncated and non-truncated conditioning equal their
formulas, the downsampler and blur are what they say, and the U-Net's switches change its structure as
specified."""

import dataclasses
import math

import pytest
import torch

from difflab.cli import main
from difflab.config import SampleConfig
from difflab.denoiser import Denoiser, VPPrecond
from difflab.model import ModelSpec
from difflab.nets.unet import ResBlock, UNet, UNetConfig
from difflab.pipelines.cascade import augmentation_noise, sample_cascade, sample_to_level
from difflab.pipelines.ddpm import LoadedModel, load_model
from difflab.schedules import NoiseSchedule
from difflab.superres import (blur_augment, downsample, gaussian_augment, level_of_sigma, path_coefficients,
                              sigma_of_level, truncated_condition)
from difflab.train.objectives import superres_fields
from difflab.typed import to_dict

SMALL = UNetConfig(in_channels=1, image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), num_heads=2, groups=4)


# -- the conditioning's formulas ---------------------------------------------------------------------------------
def test_downsample_is_block_means():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(downsample(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


def test_levels_are_a_variance_preserving_path_and_match_ve_noise_levels():
    levels = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = path_coefficients(levels)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones(5, dtype=torch.float64))
    s = sigma_of_level(levels)
    assert torch.allclose(level_of_sigma(s), levels)
    assert torch.allclose(alpha, 1 / torch.sqrt(1 + s ** 2)) and torch.allclose(sigma, s / torch.sqrt(1 + s ** 2))
    low, noise = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    z = gaussian_augment(low, levels, noise)
    for i, (a, b) in enumerate(zip(alpha.tolist(), sigma.tolist())):
        assert torch.allclose(z[i], a * low[i] + b * noise[i], atol=1e-6)
    # truncated: a VE sample x = x0 + s n divided by sqrt(1 + s^2) is alpha x0 + sigma n
    x0, n = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    s3 = s[3].item()
    assert torch.allclose(truncated_condition(x0 + s3 * n, s3), alpha[3].item() * x0 + sigma[3].item() * n, atol=1e-6)


def test_blur_keeps_level_zero_and_the_mean_and_smooths():
    g = torch.Generator().manual_seed(0)
    low = torch.rand(3, 1, 8, 8, generator=g)
    levels = torch.tensor([0.0, 0.5, 1.0])
    blurred = blur_augment(low, levels, max_blur=1.0)
    assert torch.allclose(blurred[0], low[0], atol=1e-6)
    assert blurred[1].var() < low[1].var() and blurred[2].var() < blurred[1].var()
    constant = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(blur_augment(constant, torch.tensor([0.7]), 1.0), constant, atol=1e-6)


def test_training_corrupts_the_low_res_image_at_the_level_it_tells_the_model():
    x0 = torch.rand(6, 1, 16, 16) * 2 - 1
    derive = superres_fields(8, "gaussian", 0.4, 1.0)
    fields = derive(x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)                       # the same draws, replayed
    level = torch.rand(6, generator=g) * 0.4
    noise = torch.randn(6, 1, 8, 8, generator=g)
    assert torch.equal(fields["aug_level"], level) and 0 <= level.min() and level.max() <= 0.4
    assert torch.allclose(fields["low_res"], gaussian_augment(downsample(x0, 8), level, noise))
    clean = superres_fields(8, "none", 0.4, 1.0)(x0, torch.Generator().manual_seed(3))
    assert set(clean) == {"low_res"} and torch.equal(clean["low_res"], downsample(x0, 8))


# -- the Efficient U-Net's switches ------------------------------------------------------------------------------
def block_resolutions(net: UNet, size: int = 16) -> list[tuple[str, int]]:
    """(down | up, input resolution) of every residual block, in the order they run."""
    seen = []
    for name, module in net.named_modules():
        if isinstance(module, ResBlock):
            module.register_forward_hook(lambda m, args, out, name=name: seen.append((name.split(".")[0],
                                                                                      args[0].shape[-1])))
    with torch.no_grad():
        net(torch.randn(1, 1, size, size), torch.tensor([10.0]))
    return seen


def test_downsample_first_runs_no_block_at_full_resolution_and_keeps_shapes():
    plain = block_resolutions(UNet(SMALL))
    efficient_net = UNet(dataclasses.replace(SMALL, downsample_first=True))
    efficient = block_resolutions(efficient_net)
    assert ("down", 16) in plain and ("up", 16) in plain
    assert all(res < 16 for _, res in efficient)                   # every block at 8x8 or 4x4
    assert efficient_net(torch.randn(2, 1, 16, 16), torch.tensor([3.0, 7.0])).shape == (2, 1, 16, 16)


def test_level_res_blocks_puts_more_blocks_at_low_resolution():
    net = UNet(dataclasses.replace(SMALL, level_res_blocks=(1, 3)))
    resolutions = block_resolutions(net)
    down = [res for part, res in resolutions if part == "down"]
    up = [res for part, res in resolutions if part == "up"]
    assert down == [16, 8, 8, 8] and up == [8, 8, 8, 8, 16, 16]    # decoder: blocks + 1 per level
    assert net(torch.randn(2, 1, 16, 16), torch.tensor([3.0, 7.0])).shape == (2, 1, 16, 16)


def test_scale_skips_multiplies_every_skip_by_one_over_sqrt_two():
    torch.manual_seed(0)
    plain = UNet(SMALL)
    scaled = UNet(dataclasses.replace(SMALL, scale_skips=True))
    scaled.load_state_dict(plain.state_dict())
    inputs = {}
    for name, net in (("plain", plain), ("scaled", scaled)):
        net.up[0].register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        with torch.no_grad():
            net(torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([5.0]))
    h_channels = scaled.encoder_channels
    assert torch.equal(inputs["scaled"][:, :h_channels], inputs["plain"][:, :h_channels])
    assert torch.allclose(inputs["scaled"][:, h_channels:], inputs["plain"][:, h_channels:] / math.sqrt(2), atol=1e-6)


def test_a_super_resolution_unet_needs_and_uses_its_low_res_image():
    net = UNet(dataclasses.replace(SMALL, low_res_channels=1, augmentation_embedding=True))
    for p in net.parameters():                                     # no zero-initialised layer left
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 9.0])
    low = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="low_res"):
        net(x, t, {})
    with torch.no_grad():
        a = net(x, t, {"low_res": low, "aug_level": torch.tensor([0.1, 0.1])})
        b = net(x, t, {"low_res": low, "aug_level": torch.tensor([0.3, 0.3])})
        c = net(x, t, {"low_res": -low, "aug_level": torch.tensor([0.1, 0.1])})
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


# -- the cascade -------------------------------------------------------------------------------------------------
def still_base(size: int = 8) -> LoadedModel:
    """A base whose eps network outputs zero: D(x) = x, so every ODE sampler keeps its starting noise."""
    config = dataclasses.replace(SMALL, image_size=size)
    net = UNet(config)                                             # zero-initialised output layer: F = 0
    precond = VPPrecond(NoiseSchedule.from_name("cosine", 1000), "eps")
    spec = ModelSpec("unet", to_dict(config), precond.to_json(), (1, size, size), (-1.0, 1.0))
    from difflab.config import Config
    experiment = Config(sample=SampleConfig(sampler="heun", steps=4, clip_x0=False, sigma_max=20.0))
    return LoadedModel(Denoiser(net, precond).eval(), spec, experiment, "ema", 0, None)


def test_truncated_conditioning_stops_the_base_at_the_level(monkeypatch):
    import difflab.pipelines.cascade as cascade

    base, grids = still_base(), []
    original = cascade.generate
    monkeypatch.setattr(cascade, "generate", lambda sampler, model, grid, *args, **kwargs:
                        grids.append(grid) or original(sampler, model, grid, *args, **kwargs))
    sigma = sigma_of_level(0.3).item()
    x = sample_to_level(base, 3, base.config.sample, None, sigma)
    grid = grids[0]                                                # the sampler's grid, cut at the level
    assert grid[-1].item() == pytest.approx(sigma) and (grid[:-1] > sigma).all()
    assert grid[0].item() == pytest.approx(20.0)
    start = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    assert torch.allclose(x, base.denoiser.precond.prior_std(20.0) * start, atol=1e-5)    # D = x: never moved


@pytest.fixture(scope="module")
def tiny_cascade(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    common = ["--set", "train.max_minutes=null", "--set", "train.steps=3", "--set", "train.batch_size=8",
              "--set", "model.unet.model_channels=8", "--set", "train.num_sample_images=4", "--set", "sample.steps=2",
              "--quiet"]
    assert main(["train", "configs/fmnist_base14.yaml", "--set", f"train.out_dir={root / 'base'}", *common]) == 0
    assert main(["train", "configs/fmnist_sr28.yaml", "--set", f"train.out_dir={root / 'sr'}", *common]) == 0
    assert "low_res_error" in (root / "sr" / "metrics.jsonl").read_text()
    return root


def recorded_conditions(stage: LoadedModel) -> list[dict]:
    seen = []
    stage.denoiser.net.register_forward_pre_hook(lambda m, args: seen.append(dict(args[2])))
    return seen


def test_the_cascade_gives_the_super_resolution_stage_its_level_and_formula(tiny_cascade):
    base, sr = load_model(tiny_cascade / "base"), load_model(tiny_cascade / "sr")
    seen = recorded_conditions(sr)
    overrides = {"steps": 2}
    outputs = sample_cascade([base, sr], 3, aug_level=0.25, cond=None, overrides=overrides, seed=7)
    assert [o.shape for o in outputs] == [(3, 1, 14, 14), (3, 1, 28, 28)]
    assert torch.equal(seen[0]["aug_level"], torch.full((3,), 0.25))
    noise = augmentation_noise((1, 14, 14), 7 + 1_000_003, 3)
    expected = gaussian_augment(outputs[0], torch.full((3,), 0.25), noise)
    assert torch.allclose(seen[0]["low_res"], expected, atol=1e-6)
    # truncated: the base stops at the level's sigma and its z_s is passed on, not re-noised
    seen.clear()
    truncated = sample_cascade([base, sr], 3, aug_level=0.25, truncated=True, overrides=overrides, seed=7)
    sigma = sigma_of_level(0.25).item()
    base_options = dataclasses.replace(base.config.sample, steps=2, seed=7)
    z = truncated_condition(sample_to_level(base, 3, base_options, None, sigma), sigma)
    assert torch.allclose(seen[0]["low_res"], z, atol=1e-6) and truncated[1].shape == (3, 1, 28, 28)


def test_cascade_from_the_command_line(tiny_cascade, tmp_path, capsys):
    file = tmp_path / "cascade.yaml"
    file.write_text(f"cascade:\n  stages: [{tiny_cascade / 'base'}, {tiny_cascade / 'sr'}]\n  aug_level: 0.2\n")
    out = tmp_path / "out"
    assert main(["sample", str(file), "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    assert (out / "samples.png").is_file() and (out / "samples_stage0.png").is_file()
    assert main(["sample", str(file), "--n", "2", "--steps", "2", "--truncated", "--aug-level", "0.3",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    file.write_text(f"cascade:\n  stages: [{tiny_cascade / 'base'}, {tiny_cascade / 'base'}]\n")
    assert main(["sample", str(file), "--n", "2", "--out", str(out)]) == 2
    assert "not a super-resolution model" in capsys.readouterr().err
    file.write_text("cascade:\n  stages: [a]\n")
    assert main(["sample", str(file), "--n", "2", "--out", str(out)]) == 2
    assert "at least one super-resolution stage" in capsys.readouterr().err
