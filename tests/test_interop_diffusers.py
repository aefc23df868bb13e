"""Interop with diffusers: ``difflab export RUN --format diffusers`` and ``difflab sample --diffusers DIR``.

Cross-implementation equivalence (as minGPT's test_huggingface_import checks logits against another library): the
exported UNet2DModel computes difflab's network to float tolerance, the scheduler config holds the trained betas,
and sampling the exported folder with difflab's samplers gives the run's own samples. Configurations that do not
map are refused in one line naming the config field. Also the U-Net's ``embedding_silu`` switch (ADM's
``emb_layers = Sequential(SiLU(), linear(...))``), which the export needs."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.checkpoint import save_checkpoint
from difflab.cli import main
from difflab.conditioning import ClassLabel, Cond
from difflab.config import Config, SampleConfig, load_config, to_dict
from difflab.denoiser import EDMPrecond, VPPrecond
from difflab.errors import DifflabError
from difflab.model import ModelSpec, denoiser_from_spec
from difflab.nets import UNet, UNetConfig
from difflab.nets.registry import resolve_network
from difflab.nets.unet import ResBlock
from difflab.pipelines.ddpm import load_model, sample
from difflab.pipelines.diffusers_export import (export_diffusers, exportable_unet, shared_sizes, unet2d_config,
                                                unet2d_state_dict)
from difflab.pipelines.diffusers_load import load_diffusers
from difflab.presets import resolve_config
from difflab.schedules import NoiseSchedule

diffusers = pytest.importorskip("diffusers")

TOLERANCE = 1e-4        # max abs difference in fp32 (measured: ~1e-7 for the networks, ~1e-6 for the samples)


def tiny(**overrides) -> UNetConfig:
    """A U-Net that maps: 8x8 RGB, widths 16 and 32, attention at 4x4 (and in the middle), 8 channels per head."""
    config = dict(in_channels=3, out_channels=3, image_size=8, model_channels=16, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(4,), num_head_channels=8, groups=8, embedding_silu=True)
    return UNetConfig(**{**config, **overrides})


def redrawn(net: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Every parameter from N(0, std^2), so that no zero-initialised layer hides a difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def diffusers_unet(net: UNet):
    config = unet2d_config(net.config, *shared_sizes(net, net.config))
    model = diffusers.UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    model.load_state_dict(unet2d_state_dict(net), strict=True)
    return model


def max_abs_diff(net: UNet, model, labels=None) -> float:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(TIMESTEPS), net.config.in_channels, net.config.image_size, net.config.image_size, generator=g)
    with torch.no_grad():
        ours = net(x, TIMESTEPS, Cond(label=labels) if labels is not None else None)
        theirs = model(x, TIMESTEPS, class_labels=labels).sample
    assert ours.abs().max() > 0.05                   # a real output, not a zero-initialised one
    return (ours - theirs).abs().max().item()


TIMESTEPS = torch.tensor([0.0, 3.5, 41.25, 99.0], dtype=torch.float64)     # fractional ones too (VP c_noise)
MAPPED = {
    "plain": {},
    "biggan_three_levels": dict(channel_mult=(1, 2, 2), resblock_updown=True, attention_resolutions=(8, 2),
                                level_res_blocks=(2, 2, 2), dropout=0.1),
    "num_heads_one_width": dict(num_head_channels=None, num_heads=2, attention_resolutions=()),
}


@pytest.mark.parametrize("name", sorted(MAPPED))
def test_unet2d_model_computes_difflab_network(name):
    torch.manual_seed(0)
    net = redrawn(UNet(tiny(**MAPPED[name]))).eval()
    assert max_abs_diff(net, diffusers_unet(net)) < TOLERANCE


def test_class_labels_and_the_null_row_map_to_num_class_embeds():
    net = redrawn(UNet(tiny(num_classes=3))).eval()
    model = diffusers_unet(net)
    assert model.config.num_class_embeds == 4                       # 3 classes and the null label
    assert max_abs_diff(net, model, torch.tensor([0, 2, 3, 1])) < TOLERANCE   # 3: the null label


def preset_spec(overrides: list[str]) -> ModelSpec:
    """The Fashion-MNIST preset's model with ``--set`` overrides (no data: its shape is known)."""
    options = load_config(resolve_config("fashion_mnist"), overrides).model.options
    return ModelSpec("unet", resolve_network("unet", options, (1, 28, 28), 1, None), {"kind": "vp"}, (1, 28, 28),
                     (-1.0, 1.0))


def test_fashion_mnist_preset_maps_with_embedding_silu_and_groups_8():
    """The preset's U-Net (widths 24, 48, 72 at 28x28) maps once every norm has the same groups, and the
    embedding has its SiLU; its defaults are refused on the first of them."""
    spec = preset_spec
    with pytest.raises(DifflabError, match="model.unet.embedding_silu is false"):
        exportable_unet(spec([]))
    with pytest.raises(DifflabError, match="model.unet.groups 32 does not divide"):
        config = exportable_unet(spec(["model.unet.embedding_silu=true"]))
        shared_sizes(UNet(config), config)
    net = redrawn(UNet(exportable_unet(spec(["model.unet.embedding_silu=true", "model.unet.groups=8"])))).eval()
    model = diffusers_unet(net)
    assert model.config.attention_head_dim == 18 and model.config.norm_num_groups == 8
    assert max_abs_diff(net, model) < TOLERANCE


# -- a run, exported -------------------------------------------------------------------------------------------
def write_run(folder, unet: UNetConfig | None = None, classes: int = 0, prediction: str = "eps",
              precond=None, learned_variance: bool = False, network: str = "unet", options: dict | None = None):
    """A checkpoint with random raw weights and different random EMA weights, as training writes it."""
    names = tuple(f"c{k}" for k in range(classes))
    conditions = [ClassLabel("label", 0.1, classes, names).to_json()] if classes else []
    unet = unet or tiny(num_classes=classes or None)
    precond = precond or VPPrecond(NoiseSchedule.from_name("cosine", 100), prediction)
    spec = ModelSpec(network, options if options is not None else to_dict(unet), precond.to_json(), (3, 8, 8),
                     (-1.0, 1.0), conditions, learned_variance)
    model, ema = denoiser_from_spec(spec).net, denoiser_from_spec(spec).net
    redrawn(model, seed=1), redrawn(ema, seed=2)
    config = Config(name="tiny", sample=SampleConfig(sampler="ddim", steps=3, seed=11, batch_size=4))
    save_checkpoint(folder / "checkpoint.safetensors", config, {"step": 7}, model, ema,
                    records={"model": spec.to_json()})
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An unconditional run predicting v, and its export (through the command line)."""
    run = write_run(tmp_path_factory.mktemp("run"), prediction="v")
    assert main(["export", str(run), "--format", "diffusers"]) == 0
    return run, run / "diffusers"


def test_export_loads_in_diffusers_with_the_ema_weights(exported):
    run, folder = exported
    assert {p.name for p in folder.iterdir()} == {"unet", "scheduler", "model_index.json", "difflab.json", "README.md"}
    model, info = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet", output_loading_info=True)
    assert not any(info.values()), info                              # no missing, unexpected or mismatched key
    assert max_abs_diff(load_model(run, "ema").denoiser.net, model.eval()) < TOLERANCE
    assert max_abs_diff(load_model(run, "model").denoiser.net, model) > 1e-2       # the EMA weights, not the raw
    pipeline = diffusers.DDPMPipeline.from_pretrained(folder)                     # the pipeline layout
    assert isinstance(pipeline.unet, diffusers.UNet2DModel)
    card = (folder / "README.md").read_text()
    assert "library_name: diffusers" in card and "step 7, ema weights" in card and "v_prediction" in card


def test_scheduler_config_reproduces_the_trained_betas(exported):
    run, folder = exported
    precond = load_model(run).denoiser.precond
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["trained_betas"] == precond.schedule.betas.tolist()              # float64, exactly
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.num_train_timesteps == 100
    torch.testing.assert_close(scheduler.betas.double(), precond.schedule.betas, rtol=1e-6, atol=0)
    # diffusers holds them in float32: alpha-bar to float32 rounding (the last one is ~2e-7)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), precond.schedule.alphas_cumprod, rtol=1e-5,
                               atol=1e-10)
    loaded = load_diffusers(folder)
    assert torch.equal(loaded.denoiser.precond.schedule.betas, precond.schedule.betas)
    assert loaded.denoiser.precond.prediction == "v" and loaded.step == 7


@pytest.mark.parametrize("sampler", ["ddim", "ancestral", "heun"])
def test_sampling_the_export_gives_the_run_samples(exported, sampler):
    run, folder = exported
    options = SampleConfig(sampler=sampler, steps=3, seed=5, batch_size=2)
    ours, theirs = sample(load_model(run), 3, options), sample(load_diffusers(folder), 3, options)
    assert ours.std() > 0.1 and (ours - theirs).abs().max().item() < TOLERANCE


def test_sample_command_on_the_export_gives_the_run_images(exported, tmp_path):
    run, folder = exported
    arguments = ["--n", "3", "--sampler", "dpmpp-2m", "--steps", "4", "--seed", "2"]
    assert main(["sample", str(run), *arguments, "--out", str(tmp_path / "run")]) == 0
    assert main(["sample", "--diffusers", str(folder), *arguments, "--out", str(tmp_path / "export")]) == 0
    with np.load(tmp_path / "run" / "samples.npz") as a, np.load(tmp_path / "export" / "samples.npz") as b:
        difference = np.abs(a["images"].astype(int) - b["images"].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01             # uint8 rounding at most
    assert main(["sample", str(run), "--diffusers", str(folder)]) == 2           # one source at a time


def test_class_conditional_export_samples_with_labels_names_and_guidance(tmp_path):
    run = write_run(tmp_path / "run", classes=3)
    folder = export_diffusers(run, tmp_path / "export")
    loaded = load_diffusers(folder)
    assert loaded.spec.condition_fields()["label"].names == ("c0", "c1", "c2")
    options = SampleConfig(sampler="euler", steps=3, seed=0, guidance=1.5)
    labels = Cond(label=torch.tensor([0, 2, 1]))
    ours, theirs = sample(load_model(run), 3, options, labels), sample(loaded, 3, options, labels)
    assert (ours - theirs).abs().max().item() < TOLERANCE
    unlabelled = SampleConfig(sampler="ddim", steps=2, seed=0)                  # no label: the null label's row
    assert (sample(load_model(run), 2, unlabelled) - sample(loaded, 2, unlabelled)).abs().max().item() < TOLERANCE


def test_sample_uses_the_folder_schedule_not_a_rebuilt_one(exported, tmp_path):
    _, folder = exported
    copy = tmp_path / "copy"
    for path in folder.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(folder)).write_bytes(path.read_bytes())
    config_path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["trained_betas"] = torch.linspace(1e-4, 0.05, 100, dtype=torch.float64).tolist()
    config_path.write_text(json.dumps(config))
    edited = torch.tensor(config["trained_betas"], dtype=torch.float64)
    assert torch.equal(load_diffusers(copy).denoiser.precond.schedule.betas, edited)
    # a named schedule (no trained_betas): the betas the diffusers scheduler computes from it
    config_path.write_text(json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": 50,
                                       "beta_schedule": "linear", "prediction_type": "epsilon"}))
    betas = diffusers.DDPMScheduler(num_train_timesteps=50, beta_schedule="linear").betas.double()
    loaded = load_diffusers(copy)
    assert torch.equal(loaded.denoiser.precond.schedule.betas, betas) and loaded.denoiser.precond.prediction == "eps"


# -- what does not map -----------------------------------------------------------------------------------------
REFUSED = {
    "model.unet.embedding_silu is false": dict(unet=tiny(embedding_silu=False)),
    "model.unet.rescale_residual is true": dict(unet=tiny(rescale_residual=True)),
    "model.unet.cross_attention is true": dict(unet=tiny(cross_attention=True, context_dim=8)),
    "model.unet.scale_skips is true": dict(unet=tiny(scale_skips=True)),
    "model.unet.downsample_first is true": dict(unet=tiny(downsample_first=True)),
    "model.unet.channel_mult[0] is 2": dict(unet=tiny(channel_mult=(2, 2))),
    "model.unet.level_res_blocks [1, 2]": dict(unet=tiny(level_res_blocks=(1, 2))),
    "model.unet.groups 8 does not divide the normalised widths [12, 36]": dict(unet=tiny(model_channels=12,
                                                                                        num_head_channels=12)),
    "model.unet.num_heads: attention heads of [8, 16] channels": dict(unet=tiny(num_head_channels=None, num_heads=2,
                                                                                attention_resolutions=(8, 4))),
    "diffusion.precond 'edm'": dict(precond=EDMPrecond()),
    "diffusion.learn_variance is true": dict(unet=tiny(out_channels=6), learned_variance=True),
    "model.kind 'mlp'": dict(network="mlp", options={"dim": 3}),
}


@pytest.mark.parametrize("message", sorted(REFUSED))
def test_configurations_that_do_not_map_are_refused_naming_the_field(message, tmp_path):
    run = write_run(tmp_path / "run", **REFUSED[message])
    with pytest.raises(DifflabError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        export_diffusers(run, tmp_path / "out")
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()        # one line; nothing written


def test_export_command_refuses_in_one_line_with_exit_code_2(tmp_path, capsys):
    run = write_run(tmp_path / "run", unet=tiny(embedding_silu=False))
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error: model.unet.embedding_silu is false")


# -- the embedding switch ---------------------------------------------------------------------------------------
def test_embedding_silu_changes_only_the_projection_input():
    torch.manual_seed(0)
    plain = UNet(tiny(embedding_silu=False))
    torch.manual_seed(0)
    silu = UNet(tiny(embedding_silu=True))
    assert list(plain.state_dict()) == list(silu.state_dict())                    # the same parameters, same init
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), silu.state_dict().values()))
    block = redrawn(ResBlock(4, 8, 12, dropout=0.0, groups=2, embedding_silu=True))
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 12)
    with torch.no_grad():
        h = block.conv1(F.silu(block.norm1(x)))
        scale, shift = block.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)    # ADM: emb_layers(emb)
        expected = block.conv2(F.silu(block.norm2(h) * (1 + scale) + shift)) + block.skip(x)
        torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-6)
        block.embedding_silu = False
        assert not torch.allclose(block(x, emb), expected)
    assert math.isfinite(expected.sum().item())


def test_export_never_overwrites_a_folder_silently(tmp_path):
    run = write_run(tmp_path / "run")
    folder = export_diffusers(run, tmp_path / "export")
    weights = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(DifflabError, match="already holds files"):
        export_diffusers(run, folder)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert export_diffusers(run, folder, overwrite=True) == folder
