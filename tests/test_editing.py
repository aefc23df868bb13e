"""Image editing on a trained model: SDEdit (strength 0 is the input, strength 1 is plain sampling with the
same seeds) and RePaint inpainting (the known pixels are kept exactly), from Python and the command line."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.pipelines.ddpm import load_model, sample
from difflab.pipelines.editing import image_to_image, inpaint


@pytest.fixture
def image_run(image_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "configs/fashion_mnist.yaml", "--quiet", "--set", "data.dataset=folder",
                 "--set", f"data.path={image_folder}", "--set", "data.image_size=8", "--set", "data.channels=3",
                 "--set", f"train.out_dir={out}", "--set", "train.steps=3", "--set", "train.max_minutes=null",
                 "--set", "train.batch_size=4", "--set", "model.unet.model_channels=8",
                 "--set", "model.unet.channel_mult=[1]", "--set", "model.unet.attention_resolutions=[]",
                 "--set", "model.unet.num_heads=1", "--set", "train.sample_every=1000000",
                 "--set", "sample.steps=4", "--set", "sample.batch_size=3"]) == 0
    return out


def images(n=5):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_sdedit_strength_zero_is_the_input_and_one_is_plain_sampling(image_run):
    loaded = load_model(image_run)
    options = loaded.config.sample
    x = images()
    assert torch.equal(image_to_image(loaded, x, 0.0, options), x)
    assert torch.equal(image_to_image(loaded, x, 1.0, options), sample(loaded, 5, options))
    half = image_to_image(loaded, x, 0.5, options)
    assert half.shape == x.shape and torch.isfinite(half).all() and not torch.equal(half, x)
    # per-sample seeds: the same image whatever the batch size
    again = image_to_image(loaded, x, 0.5, dataclasses.replace(options, batch_size=1))
    torch.testing.assert_close(again, half, rtol=0, atol=1e-6)


def test_repaint_keeps_the_known_pixels_exactly(image_run):
    loaded = load_model(image_run)
    x = images(4)
    mask = torch.zeros(4, 1, 8, 8)
    mask[:, :, :, :4] = 1                                                 # the left half is known
    out = inpaint(loaded, x, mask, loaded.config.sample, resample=3)
    known = mask.expand_as(x).bool()
    assert torch.equal(out[known], x[known])
    assert not torch.equal(out[~known], x[~known]) and torch.isfinite(out).all()


def test_editing_from_the_command_line(image_run, tmp_path, capsys):
    picture = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(picture)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[8:] = 255                                                        # white: generate the bottom half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "edits"
    assert main(["sample", str(image_run), "--n", "2", "--init-image", str(picture), "--strength", "0.5",
                 "--out", str(out), "--name", "sdedit"]) == 0
    assert main(["sample", str(image_run), "--n", "2", "--init-image", str(picture), "--mask",
                 str(tmp_path / "mask.png"), "--out", str(out), "--name", "repaint"]) == 0
    with np.load(out / "repaint.npz") as saved:
        painted = saved["images"]                                         # (N, H, W, C) uint8
    assert (painted[:, :4] == 200).all()                                  # kept rows (of the 8x8 model image)
    capsys.readouterr()
    assert main(["sample", str(image_run), "--init-image", str(picture), "--strength", "1.5",
                 "--out", str(out)]) == 2
    assert main(["sample", str(image_run), "--mask", str(tmp_path / "mask.png"), "--out", str(out)]) == 2
    assert main(["sample", str(image_run), "--init-image", str(tmp_path / "none.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--strength 1.5" in err and "--mask needs" in err and "none.png" in err
