"""DDIM inversion and interpolation through the pipeline and ``difflab interpolate``: exact reconstruction
with the exact model of image-shaped Gaussian data, and the command end to end on a tiny trained model."""

import torch
from PIL import Image
from torch import nn

from difflab.cli import main
from difflab.denoiser import Denoiser, VPPrecond
from difflab.pipelines.interpolate import decode, interpolate, invert
from difflab.references import ExactEpsNet, GaussianMixture
from difflab.schedules import NoiseSchedule


class ImageShaped(nn.Module):
    """The exact eps network of a Gaussian on 16 dimensions, seen as 1x4x4 images."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None):
        return self.net(x.flatten(1), t, cond).reshape(x.shape)


def exact_denoiser() -> Denoiser:
    schedule = NoiseSchedule.from_name("cosine", 1000)
    mixture = GaussianMixture(torch.full((1, 16), 0.2), torch.tensor([0.3]))
    return Denoiser(ImageShaped(ExactEpsNet(mixture, schedule)), VPPrecond(schedule, "eps"))


def test_inversion_reconstructs_and_gives_standard_normal_latents():
    denoiser = exact_denoiser()
    g = torch.Generator().manual_seed(0)
    images = (0.2 + 0.3 * torch.randn(256, 1, 4, 4, generator=g, dtype=torch.float64))
    latents = invert(denoiser, images, steps=100)
    assert abs(latents.std().item() - 1) < 0.05 and abs(latents.mean().item()) < 0.05
    error = (decode(denoiser, latents, steps=100) - images).pow(2).mean().sqrt()
    assert error < 0.02, error
    coarse = (decode(denoiser, invert(denoiser, images, steps=5), steps=5) - images)
    assert coarse.pow(2).mean().sqrt() > error                             # fewer steps, larger ODE error


def test_interpolation_rows_start_and_end_at_the_latents():
    z0, z1 = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    rows = interpolate(z0, z1, 5).reshape(3, 5, 1, 4, 4)
    torch.testing.assert_close(rows[:, 0], z0)
    torch.testing.assert_close(rows[:, -1], z1)
    norms = rows.flatten(2).norm(dim=2)                                    # slerp keeps norms near |z|
    assert (norms[:, 2] > 0.8 * torch.minimum(norms[:, 0], norms[:, -1])).all()


def test_interpolate_command(tmp_path, image_folder, capsys):
    run = tmp_path / "run"
    assert main(["train", "configs/fashion_mnist.yaml", "--quiet", "--set", "data.dataset=folder",
                 "--set", f"data.path={image_folder}", "--set", "data.image_size=8", "--set", f"train.out_dir={run}",
                 "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "model.unet.channel_mult=[1, 2]",
                 "--set", "model.unet.attention_resolutions=[4]", "--set", "model.unet.groups=8",
                 "--set", "train.sample_every=1000", "--set", "sample.steps=3"]) == 0
    capsys.readouterr()
    assert main(["interpolate", str(run), "--pairs", "2", "--frames", "3", "--steps", "4", "--test-images",
                 "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "reconstruction RMSE" in captured.err
    picture = Image.open(tmp_path / "out" / "interpolation.png")
    assert picture.size == (2 * (3 * 8 + 4 * 2), 2 * (2 * 8 + 3 * 2))     # 3 columns, 2 rows, padding 2, scale 2
