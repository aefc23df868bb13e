"""ControlNet (Zhang et al. 2023): the controlled U-Net equals its base at initialisation and at control scale 0,
the base stays frozen in training, the control image survives classifier-free guidance, the hints and the edge
F1 score follow their definitions, and the command line trains, resumes and samples a ControlNet."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.checkpoint import load_checkpoint
from difflab.cli import main
from difflab.conditioning import ClassLabel, Cond, ControlImage
from difflab.config import SampleConfig
from difflab.data.hints import HintOptions, canny_edges, make_hints, silhouettes, sketches
from difflab.denoiser import Denoiser, VPPrecond
from difflab.guidance import ClassifierFreeGuidance
from difflab.metrics.edges import binary_f1
from difflab.nets.controlnet import ControlledUNet, ControlNetConfig
from difflab.nets.unet import UNet, UNetConfig
from difflab.pipelines.control import with_control
from difflab.pipelines.ddpm import load_model, sample
from difflab.schedules import NoiseSchedule
from difflab.typed import to_dict

TINY = UNetConfig(in_channels=1, image_size=16, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_heads=2, num_classes=3, groups=4)


def trained_looking(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (no zero-initialised layer left), as a trained network's would be."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def controlled(config: UNetConfig = TINY, zero_init: bool = True) -> tuple[UNet, ControlledUNet]:
    base = trained_looking(UNet(config)).eval()
    torch.manual_seed(1)
    net = ControlledUNet(ControlNetConfig(base=to_dict(config), zero_init=zero_init))
    net.base.load_state_dict(base.state_dict())
    net.copy_base_into_control()
    return base, net.eval()


def inputs(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 16, 16, generator=g)
    t = torch.rand(batch, generator=g) * 999
    labels = torch.randint(0, 3, (batch,), generator=g)
    hints = (torch.rand(batch, 1, 16, 16, generator=g) > 0.7).float()
    return x, t, labels, hints


@pytest.mark.parametrize("cross_attention", [False, True])
def test_at_initialisation_the_controlled_unet_is_its_base_bit_for_bit(cross_attention):
    base, net = controlled(dataclasses.replace(TINY, cross_attention=cross_attention))
    x, t, labels, hints = inputs()
    with torch.no_grad():
        expected = base(x, t, {"label": labels})
        assert torch.equal(net(x, t, {"label": labels, "control": hints}), expected)
    # the copy really is the base's encoder, and not the whole network
    assert torch.equal(net.control.input_conv.weight, base.input_conv.weight)
    assert not any(name.startswith(("up.", "out_")) for name in net.control.state_dict())


def test_without_zero_convolutions_the_control_changes_the_output_at_once():
    base, net = controlled(zero_init=False)
    x, t, labels, hints = inputs()
    with torch.no_grad():
        assert not torch.allclose(net(x, t, {"label": labels, "control": hints}), base(x, t, {"label": labels}))


def test_control_scale_zero_reproduces_the_base_after_training_changed_the_control():
    base, net = controlled()
    trained_looking(net.control, seed=5)                      # zero convolutions no longer zero
    x, t, labels, hints = inputs()
    with torch.no_grad():
        expected = base(x, t, {"label": labels})
        off = net(x, t, {"label": labels, "control": hints, "control_scale": torch.zeros(4)})
        on = net(x, t, {"label": labels, "control": hints})
        half = net(x, t, {"label": labels, "control": hints, "control_scale": torch.full((4,), 0.5)})
    assert torch.equal(off, expected)
    assert not torch.allclose(on, expected) and not torch.allclose(half, on)


def test_only_the_control_branch_takes_gradients():
    _, net = controlled()
    net.train()
    x, t, labels, hints = inputs()
    net(x, t, {"label": labels, "control": hints}).square().mean().backward()
    assert all(p.grad is None for p in net.base.parameters())
    assert not net.base.training                               # the frozen base stays in eval mode
    joining = [net.control.middle_conv.weight, *(conv.weight for conv in net.control.skip_convs)]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in joining)


def test_guidance_keeps_the_control_image_in_the_unconditional_pass():
    seen = []

    class Recorder(torch.nn.Module):
        consumes = ("label", "control")

        def forward(self, x, t, cond):
            seen.append(dict(cond))
            return torch.zeros_like(x)

    conditions = {"label": ClassLabel("label", 0.5, 3), "control": ControlImage("control")}
    denoiser = Denoiser(Recorder(), VPPrecond(NoiseSchedule.from_name("cosine", 100), "eps"), conditions)
    x, _, labels, hints = inputs(2)
    ClassifierFreeGuidance(denoiser, 2.0)(x, 1.0, Cond(label=labels, control=hints))
    both = seen[-1]
    assert torch.equal(both["label"], torch.tensor([*labels.tolist(), 3, 3]))        # null label in D_u
    assert torch.equal(both["control"], torch.cat([hints, hints]))                   # the control in both


def test_binary_f1_follows_its_definition():
    a = torch.zeros(1, 1, 8, 8)
    a[0, 0, 2, 1:7] = 1                                           # a 6-pixel line
    shifted = torch.roll(a, 1, dims=2)                           # the same line one row down
    assert binary_f1(a, a).item() == 1
    assert binary_f1(a, shifted).item() == 0
    assert binary_f1(a, shifted, tolerance=1).item() == 1
    half = a.clone()
    half[0, 0, 2, 4:7] = 0                                        # 3 of the 6 pixels: precision 1, recall 1/2
    assert binary_f1(a, half).item() == pytest.approx(2 * 0.5 / 1.5)
    empty = torch.zeros_like(a)
    assert binary_f1(empty, empty).item() == 1 and binary_f1(a, empty).item() == 0


def square_image(size: int = 16, low: int = 4, high: int = 12) -> torch.Tensor:
    """A bright square on black, in [-1, 1]."""
    x = -torch.ones(1, 1, size, size)
    x[..., low:high, low:high] = 1
    return x


def test_hints_follow_their_definitions():
    image = square_image()
    edges = canny_edges(image)
    assert edges.shape == (1, 1, 16, 16) and set(edges.unique().tolist()) <= {0.0, 1.0}
    ys, xs = torch.nonzero(edges[0, 0], as_tuple=True)
    assert len(ys) > 0 and ys.min() >= 2 and ys.max() <= 13 and xs.min() >= 2 and xs.max() <= 13
    assert edges[0, 0, 6:10, 6:10].sum() == 0                      # nothing inside the flat square
    ring = image.clone()
    ring[..., 6:10, 6:10] = -1                                     # a hole: the silhouette fills it
    assert torch.equal(silhouettes(ring), (image + 1) / 2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    sketch = sketches(x, 4)
    block = ((x[0, 0, :4, :4] + 1) / 2).mean()
    assert torch.allclose(sketch[0, 0, :4, :4], block.expand(4, 4), atol=1e-6)
    rgb = image.expand(-1, 3, -1, -1)                              # grey from RGB by the BT.601 weights
    assert torch.equal(make_hints(rgb, HintOptions("canny")), edges)


# -- the command line --------------------------------------------------------------------------------------------
@pytest.fixture
def class_folders(tmp_path):
    """Two classes of 16x16 grey shapes: squares and discs at random places and sizes."""
    root = tmp_path / "shapes"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    for kind in ("disc", "square"):
        (root / kind).mkdir(parents=True)
        for i in range(12):
            cy, cx, r = rng.uniform(5, 11, 2).tolist() + [rng.uniform(2, 4)]
            inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if kind == "disc" else \
                (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
            Image.fromarray((220 * inside).astype(np.uint8)).save(root / kind / f"{i:02d}.png")
    return root


def test_train_resume_and_sample_a_controlnet_from_the_command_line(tmp_path, class_folders, capsys):
    data = ["--set", "data.dataset=folder", "--set", f"data.path={class_folders}", "--set", "data.channels=1",
            "--set", "data.image_size=16", "--set", "train.max_minutes=null", "--set", "train.batch_size=8",
            "--set", "train.num_sample_images=4", "--quiet"]
    unet = ["--set", "model.unet.model_channels=8", "--set", "model.unet.channel_mult=[1, 2]",
            "--set", "model.unet.attention_resolutions=[8]", "--set", "model.unet.num_heads=2"]
    base = tmp_path / "base"
    assert main(["train", "fashion_mnist", "--set", f"train.out_dir={base}", "--set", "train.steps=4",
                 "--set", "data.conditional=true", *unet, *data]) == 0
    train = ["train", "fmnist_controlnet", "--set", f"control.base={base}", "--set", "train.lr_schedule=constant",
             "--set", "train.sample_every=3", "--set", "sample.steps=2", *data]
    out = tmp_path / "control"
    assert main([*train, "--set", f"train.out_dir={out}", "--set", "train.steps=6"]) == 0
    checkpoint = load_checkpoint(out)
    before = load_checkpoint(base)
    for name, value in before.section("ema").items():             # the base, frozen, inside the whole model
        assert torch.equal(checkpoint.tensors[f"model.base.{name}"], value), name
        assert torch.equal(checkpoint.tensors[f"ema.base.{name}"], value), name
    assert not torch.equal(checkpoint.tensors["model.control.middle_conv.weight"],
                           torch.zeros_like(checkpoint.tensors["model.control.middle_conv.weight"]))
    logged = [line for line in (out / "metrics.jsonl").read_text().splitlines() if "control_agreement" in line]
    assert logged and (out / "samples" / "final.png").is_file()

    half = tmp_path / "half"                                      # exact resume
    assert main([*train, "--set", f"train.out_dir={half}", "--set", "train.steps=3"]) == 0
    assert main([*train, "--set", f"train.out_dir={half}", "--set", "train.steps=6", "--resume"]) == 0
    resumed = load_checkpoint(half)
    for name, value in checkpoint.tensors.items():
        if name.startswith(("model.", "ema.")):
            assert torch.equal(value, resumed.tensors[name]), name

    # sampling: control scale 0 is the base with the same seeds; every sampler family takes the control
    loaded, base_model = load_model(out), load_model(base)
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).float() for p in
                          sorted((class_folders / "disc").glob("*.png"))[:3]])[:, None] / 127.5 - 1
    from difflab.pipelines.control import hints_from_images
    hints = hints_from_images(loaded.spec, images)
    cond = with_control(Cond(label=torch.zeros(3, dtype=torch.long)), hints)
    options = SampleConfig(sampler="heun", steps=3)
    off = sample(loaded, 3, dataclasses.replace(options, control_scale=0.0), cond)
    assert torch.equal(off, sample(base_model, 3, options, Cond(label=torch.zeros(3, dtype=torch.long))))
    for sampler in ("ddim", "dpmpp-2m", "ancestral"):
        assert sample(loaded, 3, SampleConfig(sampler=sampler, steps=3, guidance=1.0), cond).shape == (3, 1, 16, 16)

    hint_file = tmp_path / "edges.png"
    Image.fromarray((hints[0, 0].numpy() * 255).astype(np.uint8)).save(hint_file)
    samples = tmp_path / "samples"
    assert main(["sample", str(out), "--n", "2", "--steps", "2", "--control", str(hint_file), "--class", "disc",
                 "--out", str(samples)]) == 0
    assert (samples / "samples_pairs.png").is_file()
    assert main(["sample", str(out), "--n", "2", "--steps", "2", "--control-from", str(class_folders / "square"),
                 "--guidance", "1", "--class", "square", "--control-scale", "0.5", "--out", str(samples)]) == 0

    capsys.readouterr()                                           # clear errors, exit 2
    assert main(["sample", str(out), "--n", "2", "--steps", "2"]) == 2
    assert "control images" in capsys.readouterr().err
    assert main(["sample", str(base), "--n", "2", "--steps", "2", "--control-scale", "0.5"]) == 2
    assert "ControlNet" in capsys.readouterr().err
    assert main(["sample", str(out), "--n", "2", "--control", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main([*train, "--set", f"train.out_dir={tmp_path / 'x'}", "--set", "train.steps=1", "--set",
                 f"control.base={tmp_path / 'nothing'}"]) == 2
    assert "nothing" in capsys.readouterr().err


@pytest.mark.parametrize("hint", ["silhouette", "sketch"])
def test_silhouette_and_sketch_controlnets_train_and_sample(tmp_path, class_folders, hint):
    data = ["--set", "data.dataset=folder", "--set", f"data.path={class_folders}", "--set", "data.channels=1",
            "--set", "data.image_size=16", "--set", "train.max_minutes=null", "--set", "train.batch_size=8",
            "--set", "train.num_sample_images=4", "--set", "sample.steps=2", "--quiet"]
    unet = ["--set", "model.unet.model_channels=8", "--set", "model.unet.channel_mult=[1, 2]",
            "--set", "model.unet.attention_resolutions=[]", "--set", "model.unet.num_heads=1"]
    base, out = tmp_path / "base", tmp_path / hint
    assert main(["train", "fashion_mnist", "--set", f"train.out_dir={base}", "--set", "train.steps=2", *unet,
                 *data]) == 0
    assert main(["train", "fmnist_controlnet", "--set", f"control.base={base}", "--set", f"control.hint={hint}",
                 "--set", f"train.out_dir={out}", "--set", "train.steps=2", *data]) == 0
    loaded = load_model(out)
    assert loaded.spec.condition_fields()["control"].hint == hint and "label" not in loaded.spec.condition_fields()
    samples = tmp_path / "samples"
    assert main(["sample", str(out), "--n", "2", "--steps", "2", "--control-from", str(class_folders / "disc"),
                 "--out", str(samples)]) == 0
    assert (samples / "samples_pairs.png").is_file()
