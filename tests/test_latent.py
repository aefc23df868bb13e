"""Latent diffusion: the autoencoder's training and latent scale, diffusion on its posterior samples, decoding,
no clipping in latent space, and models saved as a whole (the autoencoder inside the diffusion checkpoint)."""

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.checkpoint import load_checkpoint
from difflab.cli import main
from difflab.config import SampleConfig
from difflab.data import InMemoryData
from difflab.latent import LatentSpace, encode_dataset, load_latent_space, measure_latent_scale
from difflab.nets.autoencoder import Autoencoder, AutoencoderConfig
from difflab.pipelines.ddpm import load_model, sample
from difflab.train.autoencoder import AutoencoderObjective

TINY_AE = ["--set", "model.autoencoder.channels=8", "--set", "model.autoencoder.channel_mult=[1, 2]",
           "--set", "model.autoencoder.groups=4"]


def tiny_autoencoder(seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    return Autoencoder(AutoencoderConfig(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), groups=4))


def random_images(n: int = 64, size: int = 8, seed: int = 0) -> InMemoryData:
    g = torch.Generator().manual_seed(seed)
    return InMemoryData(torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8), name="random")


@pytest.fixture
def grey_folder(tmp_path):
    """Sixteen 16x16 grey images of blobs (a structure an autoencoder can learn)."""
    folder = tmp_path / "grey"
    folder.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    for i in range(16):
        cy, cx, r = rng.uniform(4, 12), rng.uniform(4, 12), rng.uniform(2, 5)
        image = (255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img{i:02d}.png")
    return folder


def test_the_latent_scale_gives_unit_variance_latents_and_is_measured_not_fixed():
    data = random_images(1000)
    scales = []
    for gain in (1.0, 3.0):                    # a wider encoder output: other latents, another scale
        autoencoder = tiny_autoencoder().eval()
        with torch.no_grad():
            autoencoder.encoder[-1][-1].weight.mul_(gain)
        scale = measure_latent_scale(autoencoder, data, seed=0)
        latents = encode_dataset(LatentSpace(autoencoder, scale), data)
        mean, std = latents.mean.double(), latents.std.double()
        mixture_variance = (mean ** 2 + std ** 2).mean() - mean.mean() ** 2      # of the scaled posteriors
        assert mixture_variance.item() == pytest.approx(1.0, abs=0.01)
        z, _ = latents.batch(torch.arange(len(latents)), torch.Generator().manual_seed(5))   # other noise
        assert z.double().std().item() == pytest.approx(1.0, abs=0.02)
        assert z.shape[1:] == (4, 4, 4)
        scales.append(scale)
    assert scales[1] < 0.8 * scales[0]


def test_the_objective_is_reconstruction_plus_weighted_kl_per_pixel():
    autoencoder = tiny_autoencoder()
    x, _ = random_images(4).batch(torch.arange(4))
    objective = AutoencoderObjective(autoencoder)
    batch = objective.draw(x, None, torch.Generator().manual_seed(0))
    losses, extras = objective.loss(batch, autoencoder)
    reconstruction, mean, logvar = autoencoder(x, batch.noise)
    l1 = (reconstruction - x).abs().flatten(1).sum(1)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    torch.testing.assert_close(losses, (l1 + 1e-6 * kl) / 64)
    assert extras["kl"] == pytest.approx(kl.mean().item(), rel=1e-5)


def test_latent_data_draw_posterior_samples_not_the_mode():
    data = random_images(8)
    space = LatentSpace(tiny_autoencoder().eval(), 1.0)
    latents = encode_dataset(space, data)
    a, _ = latents.batch(torch.arange(8), torch.Generator().manual_seed(0))
    b, _ = latents.batch(torch.arange(8), torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    torch.testing.assert_close((a - latents.mean) / latents.std, torch.randn(a.shape, generator=torch.Generator()
                                                                             .manual_seed(0)), atol=1e-4, rtol=1e-4)


def test_train_autoencoder_then_latent_diffusion_from_the_command_line(tmp_path, grey_folder, capsys):
    ae = tmp_path / "ae"
    common = ["--set", f"data.path={grey_folder}", "--set", "data.dataset=folder", "--set", "data.channels=1",
              "--set", "data.image_size=16", "--set", "train.max_minutes=null", "--quiet"]
    assert main(["train", "configs/fmnist_autoencoder.yaml", "--set", f"train.out_dir={ae}", "--set",
                 "train.steps=30", "--set", "train.batch_size=8", *TINY_AE, *common]) == 0
    record = load_checkpoint(ae).metadata["autoencoder"]
    assert record["scale"] > 0 and record["test_reconstruction"]["mse"] > 0
    assert (ae / "reconstructions.png").is_file()
    space = load_latent_space(ae)
    assert space.latent_shape == (4, 8, 8)

    out = tmp_path / "latent"
    unet = ["--set", "model.unet.model_channels=8", "--set", "model.unet.channel_mult=[1, 2]",
            "--set", "model.unet.attention_resolutions=[]", "--set", "model.unet.num_heads=1"]
    train = ["train", "configs/fmnist_latent.yaml", "--set", f"data.autoencoder={ae}", "--set",
             "train.batch_size=8", "--set", "train.num_sample_images=4", "--set", "train.lr_schedule=constant", *unet,
             *common]
    assert main([*train, "--set", f"train.out_dir={out}", "--set", "train.steps=6"]) == 0
    assert len(list((ae / "latents").glob("train-*.safetensors"))) == 1          # the data set's latents, cached
    checkpoint = load_checkpoint(out)
    assert any(k.startswith("frozen.autoencoder.") for k in checkpoint.tensors)
    assert checkpoint.metadata["model"]["data_range"] is None

    # exact resume: the posterior samples are drawn from the step's generator
    half = tmp_path / "half"
    assert main([*train, "--set", f"train.out_dir={half}", "--set", "train.steps=3"]) == 0
    assert main([*train, "--set", f"train.out_dir={half}", "--set", "train.steps=6", "--resume"]) == 0
    resumed = load_checkpoint(half)
    for name, value in checkpoint.tensors.items():
        if name.startswith(("model.", "ema.")):
            assert torch.equal(value, resumed.tensors[name]), name

    # the model is whole: the autoencoder's own folder is not needed to sample it
    for path in (ae / "checkpoint.safetensors", *(ae / "latents").iterdir()):
        path.unlink()
    loaded = load_model(out)
    images = sample(loaded, 3, SampleConfig(sampler="heun", steps=3))
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1
    assert main(["sample", str(out), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    # progressive distillation of the latent model: the students keep its autoencoder
    distilled = tmp_path / "pd"
    assert main(["train", "configs/fmnist_progressive.yaml", "--set", f"distill.teacher={out}", "--set",
                 "distill.start_steps=2", "--set", "distill.minutes_per_round=null", "--set", "train.steps=2",
                 "--set", "train.batch_size=8", "--set", "train.precision=fp32", "--set",
                 f"train.out_dir={distilled}", *common]) == 0
    student = load_model(distilled / "steps_0001")
    assert student.latent is not None and student.latent.scale == loaded.latent.scale
    assert sample(student, 2, SampleConfig(sampler="ddim", steps=1, spacing="trailing")).shape == (2, 1, 16, 16)

    capsys.readouterr()
    assert main([*train, "--set", f"train.out_dir={tmp_path / 'x'}", "--set", "train.steps=1"]) == 2
    assert "data.autoencoder" in capsys.readouterr().err


def test_latent_sampling_never_clips(tmp_path, grey_folder, monkeypatch):
    """An eps-model whose network outputs zero has D(x) = x: unclipped, the ODE keeps the prior's noise
    (|z| up to ~80 sigma_max); static or dynamic thresholding of D would pull it into [-1, 1]."""
    ae = tmp_path / "ae"
    common = ["--set", f"data.path={grey_folder}", "--set", "data.dataset=folder", "--set", "data.channels=1",
              "--set", "data.image_size=16", "--set", "train.max_minutes=null", "--quiet"]
    assert main(["train", "configs/fmnist_autoencoder.yaml", "--set", f"train.out_dir={ae}", "--set",
                 "train.steps=2", "--set", "train.batch_size=8", *TINY_AE, *common]) == 0
    out = tmp_path / "latent"
    assert main(["train", "configs/fmnist_latent.yaml", "--set", f"data.autoencoder={ae}", "--set",
                 f"train.out_dir={out}", "--set", "train.steps=1", "--set", "train.lr=1e-12", "--set",
                 "diffusion.prediction=eps", "--set", "model.unet.model_channels=8", "--set",
                 "model.unet.channel_mult=[1, 2]", "--set", "model.unet.attention_resolutions=[]", "--set",
                 "model.unet.num_heads=1", "--set", "train.batch_size=8", *common]) == 0
    loaded = load_model(out)
    decoded = []
    monkeypatch.setattr(loaded.latent, "decode", lambda z: decoded.append(z) or z[:, :1].repeat_interleave(2, -1)
                        .repeat_interleave(2, -2))
    for options in (SampleConfig(sampler="heun", steps=4, clip_x0=True),
                    SampleConfig(sampler="dpmpp-2m", steps=4, dynamic_threshold=0.9),
                    SampleConfig(sampler="ddim", steps=4, clip_x0=True)):
        decoded.clear()
        sample(loaded, 2, options)
        assert decoded[0].abs().max() > 10, options.sampler


def test_the_adversarial_term_trains_the_discriminator_only_on_its_own_loss():
    """adversarial_weight > 0: the autoencoder gets the hinge term -D(x_rec) through a detached discriminator;
    the discriminator's gradient is that of relu(1 - D(x)) + relu(1 + D(x_rec)) alone; before
    adversarial_start the term is off."""
    torch.manual_seed(0)
    config = AutoencoderConfig(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2), groups=4,
                               adversarial_weight=0.5, adversarial_start=3, discriminator_channels=8)
    autoencoder = Autoencoder(config)
    assert Autoencoder(AutoencoderConfig(in_channels=1, image_size=8, channels=8, channel_mult=(1, 2),
                                         groups=4)).discriminator is None                # off by default
    x, _ = random_images(4).batch(torch.arange(4))
    objective = AutoencoderObjective(autoencoder)
    early = objective.draw(x, None, torch.Generator().manual_seed(0), step=2)
    batch = objective.draw(x, None, torch.Generator().manual_seed(0), step=3)
    assert early.adversarial.sum() == 0 and batch.adversarial.sum() == 4
    losses, extras = objective.loss(batch, autoencoder)
    losses.mean().backward()
    got = [p.grad.clone() for p in autoencoder.discriminator.parameters()]
    autoencoder.zero_grad()
    reconstruction, _, _ = autoencoder(x, batch.noise)
    d = autoencoder.discriminator
    own = (torch.relu(1 - d(x)).flatten(1).mean(1) + torch.relu(1 + d(reconstruction.detach())).flatten(1).mean(1))
    own.mean().backward()
    for a, b in zip(got, (p.grad for p in d.parameters())):
        torch.testing.assert_close(a, b)
    assert "generator" in extras and "discriminator" in extras
    early_losses, _ = objective.loss(early, autoencoder)                 # before adversarial_start: L1 + KL
    reconstruction, mean, logvar = autoencoder(x, early.noise)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    torch.testing.assert_close(early_losses, ((reconstruction - x).abs().flatten(1).sum(1) + 1e-6 * kl) / 64)
