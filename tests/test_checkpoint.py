"""Checkpoints: atomic save/load, bit-exact resume, clear errors for missing, corrupt or mismatched files."""

import pytest
import torch

from difflab.checkpoint import load_checkpoint, save_checkpoint
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.train.diffusion import diffusion_trainer


def toy_config(out_dir, steps=40, **extra):
    overrides = [f"train.out_dir={out_dir}", f"train.steps={steps}", "train.batch_size=64",
                 "train.log_every=10", "train.checkpoint_every=1000", "train.sample_every=100000",
                 "data.num_points=2000", "model.mlp.hidden=32", "model.mlp.depth=2", "sample.steps=10"]
    return load_config("configs/toy.yaml", overrides + [f"{k}={v}" for k, v in extra.items()])


def image_config(out_dir, folder, steps=6):
    overrides = [f"train.out_dir={out_dir}", f"train.steps={steps}", "train.batch_size=4", "train.log_every=2",
                 "train.checkpoint_every=1000", "train.sample_every=100000", "train.num_sample_images=4",
                 "data.dataset=folder", f"data.path={folder}", "data.image_size=8", "data.channels=3",
                 "model.unet.model_channels=16", "model.unet.channel_mult=[1, 2]", "model.unet.num_res_blocks=1",
                 "model.unet.attention_resolutions=[4]", "model.unet.groups=8", "model.unet.dropout=0.1",
                 "sample.steps=5",
                 # the resume tests stop a run early by a smaller train.steps, which a decaying rate follows
                 "train.lr_schedule=constant", "train.max_minutes=null"]
    return load_config("configs/fashion_mnist.yaml", overrides)


def parameters(trainer):
    return {**{f"model.{k}": v for k, v in trainer.net.state_dict().items()},
            **{f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()}}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("kind", ["toy", "image"])
def test_resume_is_bit_exact(tmp_path, image_folder, kind):
    make = (lambda d, s: toy_config(d, s)) if kind == "toy" else (lambda d, s: image_config(d, image_folder, s))
    full = diffusion_trainer(make(tmp_path / "full", 10 if kind == "image" else 40), progress=False)
    full.run()
    first = diffusion_trainer(make(tmp_path / "split", 4 if kind == "image" else 17), progress=False)
    first.run()
    second = diffusion_trainer(make(tmp_path / "split", 10 if kind == "image" else 40), resume=True, progress=False)
    assert second.step == first.step
    second.run()
    assert_identical(parameters(full), parameters(second))
    # the optimiser state matches too
    state_a, state_b = full.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for name in state_a[index]:
            assert torch.equal(state_a[index][name], state_b[index][name]), (index, name)


def test_checkpoint_round_trip(tmp_path):
    trainer = diffusion_trainer(toy_config(tmp_path / "run", steps=5), progress=False)
    trainer.run()
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.state["step"] == 5 and checkpoint.config == trainer.config
    assert checkpoint.has_ema
    assert (tmp_path / "run" / "config.json").exists()
    assert not list((tmp_path / "run").glob(".*tmp*"))        # no temporary files left behind


def test_resume_refuses_missing_checkpoint(tmp_path):
    with pytest.raises(DifflabError, match="does not exist"):
        diffusion_trainer(toy_config(tmp_path / "nothing"), resume=True, progress=False)


def test_resume_refuses_a_different_config(tmp_path):
    diffusion_trainer(toy_config(tmp_path / "run", steps=3), progress=False).run()
    with pytest.raises(DifflabError, match="model.mlp.hidden"):
        diffusion_trainer(toy_config(tmp_path / "run", **{"model.mlp.hidden": 64}), resume=True, progress=False)
    with pytest.raises(DifflabError, match="train.lr"):
        diffusion_trainer(toy_config(tmp_path / "run", **{"train.lr": 0.1}), resume=True, progress=False)
    # more steps is allowed
    diffusion_trainer(toy_config(tmp_path / "run", steps=6), resume=True, progress=False)


def test_corrupt_and_truncated_checkpoints_are_named(tmp_path):
    trainer = diffusion_trainer(toy_config(tmp_path / "run", steps=2), progress=False)
    trainer.run()
    path = tmp_path / "run" / "checkpoint.safetensors"
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DifflabError, match="truncated.safetensors"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(DifflabError, match="garbage.safetensors"):
        load_checkpoint(garbage)


def test_failed_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = diffusion_trainer(toy_config(tmp_path / "run", steps=2), progress=False)
    trainer.run()
    path = tmp_path / "run" / "checkpoint.safetensors"
    good = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("difflab.checkpoint.save_file", crash)
    with pytest.raises(DifflabError, match="cannot write .*disk full"):    # an OS error is one clear line
        save_checkpoint(path, trainer.config, {"step": 99}, trainer.net)
    assert path.read_bytes() == good and load_checkpoint(path).state["step"] == 2
    assert not list((tmp_path / "run").glob(".*tmp*"))


def interrupt_at(trainer, step, monkeypatch):
    """Run ``trainer`` until it has taken ``step`` steps, then press Ctrl-C (KeyboardInterrupt)."""
    real_step = trainer.train_step

    def step_then_interrupt():
        loss = real_step()
        if trainer.step == step:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def test_interrupt_writes_a_checkpoint(tmp_path, monkeypatch):
    interrupt_at(diffusion_trainer(toy_config(tmp_path / "run", steps=50), progress=False), 7, monkeypatch)
    assert load_checkpoint(tmp_path / "run").state["step"] == 7
