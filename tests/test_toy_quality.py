"""A tiny model trained for a few hundred steps on a 2-D toy set samples close to the data; an untrained
one does not. Closeness: sliced Wasserstein distance to held-out data, against the distance between two
independent draws of the data (the floor)."""

import pytest

from difflab.build import build_data
from difflab.config import load_config
from difflab.metrics import sliced_wasserstein
from difflab.pipelines.ddpm import sample
from difflab.train.diffusion import diffusion_trainer


def ema_denoiser(trainer):
    return trainer.denoiser.with_net(trainer.ema.model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    config = load_config("configs/toy.yaml", [f"train.out_dir={out}",
                                              "train.checkpoint_every=100000"])
    trainer = diffusion_trainer(config, progress=False)
    untrained = sample(ema_denoiser(trainer), 3000, config.sample, spec=trainer.spec)
    trainer.run()
    return config, trainer, untrained


def test_trained_toy_model_samples_close_to_data(trained):
    config, trainer, untrained = trained
    held_out = build_data(config.data, split="test").data[:3000]
    floor = sliced_wasserstein(build_data(config.data).data[:3000], held_out)
    trained_distance = sliced_wasserstein(sample(ema_denoiser(trainer), 3000, config.sample, spec=trainer.spec),
                                          held_out)
    untrained_distance = sliced_wasserstein(untrained, held_out)
    print(f"sliced W1: floor {floor:.4f}, trained {trained_distance:.4f}, untrained {untrained_distance:.4f}")
    assert trained_distance < 0.08
    assert untrained_distance > 0.08
    assert trained_distance < 0.25 * untrained_distance
