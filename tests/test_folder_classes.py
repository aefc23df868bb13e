"""Own data: class labels from subfolders (trained and sampled by name), and random horizontal flips drawn
from the step's generator."""

import numpy as np
import torch
from PIL import Image

from difflab.cli import main
from difflab.data import load_image_folder
from difflab.data.augment import random_hflip
from test_checkpoint import assert_identical, parameters


def class_folder(root):
    """Two classes: dark images in 'night/', bright ones in 'day/'."""
    for name, value in (("night", 20), ("day", 230)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((10, 10, 3), value + i, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_subfolders_are_classes(tmp_path):
    data = load_image_folder(class_folder(tmp_path / "images"), image_size=8, channels=3)
    assert data.class_names == ("day", "night") and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (data.data[data.labels == 0].float().mean() > 200) and (data.data[data.labels == 1].float().mean() < 40)


def test_class_conditional_training_on_subfolders_and_sampling_by_name(tmp_path):
    images, out = class_folder(tmp_path / "images"), tmp_path / "run"
    args = ["train", "configs/fashion_mnist.yaml", "--quiet", "--set", "data.dataset=folder",
            "--set", f"data.path={images}", "--set", "data.image_size=8", "--set", "data.channels=3",
            "--set", "data.conditional=true", "--set", "data.hflip=true", "--set", f"train.out_dir={out}",
            "--set", "train.steps=4", "--set", "train.max_minutes=null", "--set", "train.batch_size=4",
            "--set", "model.unet.model_channels=8", "--set", "model.unet.channel_mult=[1]",
            "--set", "model.unet.attention_resolutions=[]", "--set", "model.unet.num_heads=1",
            "--set", "train.sample_every=1000000", "--set", "sample.steps=2", "--set", "train.lr_schedule=constant"]
    assert main(args) == 0
    assert main(["sample", str(out), "--n", "2", "--class", "night", "--out", str(tmp_path / "s")]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as saved:
        assert saved["labels"].tolist() == [1, 1]
    # flips are a function of (seed, step): an interrupted-and-resumed run equals an uninterrupted one
    from difflab.config import load_config
    from difflab.train.diffusion import diffusion_trainer
    overrides = args[4::2]                                                  # the --set values
    full = diffusion_trainer(load_config("configs/fashion_mnist.yaml", overrides + [f"train.out_dir={tmp_path / 'a'}",
                                                                                     "train.steps=6"]), progress=False)
    full.run()
    first = diffusion_trainer(load_config("configs/fashion_mnist.yaml", overrides + [f"train.out_dir={tmp_path / 'b'}",
                                                                                      "train.steps=3"]), progress=False)
    first.run()
    second = diffusion_trainer(load_config("configs/fashion_mnist.yaml", overrides + [f"train.out_dir={tmp_path / 'b'}",
                                                                                       "train.steps=6"]),
                               resume=True, progress=False)
    second.run()
    assert_identical(parameters(full), parameters(second))


def test_random_hflip_mirrors_about_half_of_the_images():
    x = torch.arange(2 * 1 * 1 * 3, dtype=torch.float32).reshape(2, 1, 1, 3).repeat(500, 1, 1, 1)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out != x).any(dim=(1, 2, 3))
    assert 420 < int(flipped.sum()) < 580 and torch.equal(out[flipped], x[flipped].flip(-1))
    assert torch.equal(out, random_hflip(x, torch.Generator().manual_seed(0)))


def test_a_streamed_folder_gives_the_in_memory_batches_and_the_same_training(tmp_path):
    from difflab.config import load_config
    from difflab.data.folder import StreamedImageFolder
    from difflab.train.diffusion import diffusion_trainer

    images = class_folder(tmp_path / "images")
    memory, streamed = load_image_folder(images, 8, 3), StreamedImageFolder(images, 8, 3)
    assert (len(streamed), streamed.sample_shape, streamed.class_names, streamed.num_classes) == \
        (len(memory), memory.sample_shape, memory.class_names, memory.num_classes)
    indices = torch.tensor([5, 0, 7, 2, 2])
    (x_m, y_m), (x_s, y_s) = memory.batch(indices), streamed.batch(indices)
    assert torch.equal(x_m, x_s) and torch.equal(y_m, y_s)
    overrides = ["data.dataset=folder", f"data.path={images}", "data.image_size=8", "data.channels=3",
                 "data.conditional=true", "train.steps=3", "train.max_minutes=null", "train.batch_size=4",
                 "model.unet.model_channels=8", "model.unet.channel_mult=[1]", "model.unet.attention_resolutions=[]",
                 "model.unet.num_heads=1", "train.sample_every=1000000", "train.lr_schedule=constant"]
    runs = []
    for stream in ("false", "true"):
        trainer = diffusion_trainer(load_config("configs/fashion_mnist.yaml", overrides + [
            f"data.stream={stream}", f"train.out_dir={tmp_path / stream}"]), progress=False)
        trainer.run()
        runs.append(parameters(trainer))
    assert_identical(*runs)
