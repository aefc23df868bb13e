"""Nothing a user made is lost, and bad input is one clear line: interrupts land between whole steps,
divergence stops training without overwriting the last finite checkpoint, run folders are guarded by a lock
and refuse to be overwritten silently, writes are atomic and clean up after themselves, and config values are
checked against their ranges."""

import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from difflab.checkpoint import load_checkpoint
from difflab.cli import main
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.files import atomic_write, remove_stale
from difflab.train.diffusion import diffusion_trainer
from difflab.train.run_folder import RunLock
from difflab.train.trainer import NonFiniteLoss
from test_checkpoint import assert_identical, parameters, toy_config


def tiny(tmp_path, name="run", steps=12, **extra):
    return toy_config(tmp_path / name, steps=steps, **extra)


def dead_pid() -> int:
    """The PID of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -- interrupts take effect between whole steps --------------------------------------------------------------------
def ctrl_c_inside(trainer, target: str, at_step: int) -> None:
    """Send SIGINT to this process from inside ``target`` (forward | backward | optimizer | ema | observe) while
    the step that ends at ``at_step`` runs."""
    if target == "optimizer":
        real = trainer.optimizer.step

        def optimizer_step(*args, **kwargs):
            if trainer.step + 1 == at_step:
                signal.raise_signal(signal.SIGINT)
            return real(*args, **kwargs)
        trainer.optimizer.step = optimizer_step
    elif target == "ema":
        real_update = trainer.ema.update

        def update(*args, **kwargs):
            out = real_update(*args, **kwargs)
            if trainer.step == at_step:
                signal.raise_signal(signal.SIGINT)
            return out
        trainer.ema.update = update
    else:
        real_loss = trainer.objective.loss

        def loss(batch, forward):
            out = real_loss(batch, forward)
            if trainer.step + 1 == at_step:
                if target == "backward":
                    out.register_hook(lambda g: signal.raise_signal(signal.SIGINT))
                else:
                    signal.raise_signal(signal.SIGINT)
            return out
        trainer.objective.loss = loss


@pytest.mark.parametrize("target, at_step", [("forward", 3), ("backward", 5), ("optimizer", 8), ("ema", 10)])
def test_ctrl_c_anywhere_in_a_step_saves_a_whole_step_and_resumes_bit_exactly(tmp_path, target, at_step):
    full = diffusion_trainer(tiny(tmp_path, "full"), progress=False)
    full.run()
    split = diffusion_trainer(tiny(tmp_path, "split"), progress=False)
    ctrl_c_inside(split, target, at_step)
    with pytest.raises(KeyboardInterrupt):
        split.run()
    assert load_checkpoint(tmp_path / "split").state["step"] == at_step
    resumed = diffusion_trainer(tiny(tmp_path, "split"), resume=True, progress=False)
    resumed.run()
    assert_identical(parameters(full), parameters(resumed))


def test_a_second_ctrl_c_mid_step_keeps_the_last_checkpoint(tmp_path):
    trainer = diffusion_trainer(tiny(tmp_path, steps=20, **{"train.checkpoint_every": 5}), progress=False)
    real = trainer.optimizer.step

    def twice(*args, **kwargs):                   # two presses inside the optimiser step of step 8
        if trainer.step + 1 == 8:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)
    trainer.optimizer.step = twice
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert trainer.mid_step and load_checkpoint(tmp_path / "run").state["step"] == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler      # the handler is restored


# -- divergence --------------------------------------------------------------------------------------------------
def test_nonfinite_loss_stops_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    config = tiny(tmp_path, steps=30, **{"train.checkpoint_every": 2})
    trainer = diffusion_trainer(config, progress=False)
    real = trainer.objective.loss

    def poisoned(batch, forward):                 # the loss turns nan at step 7
        out = real(batch, forward)
        return out * float("nan") if trainer.step + 1 == 7 else out
    trainer.objective.loss = poisoned
    with pytest.raises(NonFiniteLoss, match="step 7"):
        trainer.run()
    saved = load_checkpoint(tmp_path / "run")
    assert saved.state["step"] == 6 and all(torch.isfinite(v).all() for v in saved.tensors.values())
    # from the command line: lr 1e8 diverges, one line and exit 2, the checkpoint stays finite
    code = main(["train", "configs/toy.yaml", "--quiet", "--set", f"train.out_dir={tmp_path / 'cli'}",
                 "--set", "train.lr=1e8", "--set", "train.steps=200", "--set", "train.checkpoint_every=1",
                 "--set", "model.mlp.hidden=16", "--set", "train.warmup_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "diverged at step" in err and "Traceback" not in err
    if (tmp_path / "cli" / "checkpoint.safetensors").exists():
        assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "cli").tensors.values())


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path):
    trainer = diffusion_trainer(tiny(tmp_path, steps=10, **{"train.nonfinite": "skip"}), progress=False)
    real = trainer.objective.loss
    trainer.objective.loss = lambda batch, forward: (real(batch, forward) * float("nan")
                                                     if trainer.step in (3, 4) else real(batch, forward))
    trainer.run()
    state = load_checkpoint(tmp_path / "run").state
    assert state["step"] == 10 and state["nonfinite_skipped"] == 2
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())


# -- run folders ---------------------------------------------------------------------------------------------------
def test_an_occupied_run_folder_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "configs/toy.yaml", "--quiet", "--set", f"train.out_dir={out}", "--set", "train.steps=6",
            "--set", "model.mlp.hidden=16", "--set", "train.sample_every=1000000"]
    assert main(args) == 0
    before = (out / "checkpoint.safetensors").read_bytes()
    assert main(args[:-2] + ["--set", "train.steps=3"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "checkpoint.safetensors").read_bytes() == before                 # untouched
    assert main(args + ["--resume", "--set", "train.steps=8"]) == 0
    assert load_checkpoint(out).state["step"] == 8
    assert main(args + ["--overwrite", "--set", "train.steps=2"]) == 0
    assert load_checkpoint(out).state["step"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1             # the old log was replaced


def test_a_moved_run_folder_and_an_explicit_checkpoint_resume(tmp_path):
    diffusion_trainer(tiny(tmp_path, "a", steps=4), progress=False).run()
    (tmp_path / "a").rename(tmp_path / "b")
    resumed = diffusion_trainer(tiny(tmp_path, "b", steps=6), resume=True, progress=False)
    assert resumed.step == 4
    resumed.run()
    elsewhere = diffusion_trainer(tiny(tmp_path, "c", steps=8), resume=tmp_path / "b" / "checkpoint.safetensors",
                                  progress=False)
    assert elsewhere.step == 6
    elsewhere.run()
    assert load_checkpoint(tmp_path / "c").state["step"] == 8


def test_the_lock_keeps_a_second_training_out_and_stale_locks_are_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getppid()}\n")                # a live process holds it
    with pytest.raises(DifflabError, match="in use by another training"):
        diffusion_trainer(tiny(tmp_path), progress=False).run()
    (out / ".lock").write_text(f"{dead_pid()}\n")                   # its process is gone: stale
    diffusion_trainer(tiny(tmp_path), progress=False).run()
    assert not (out / ".lock").exists()
    lock = RunLock(out).acquire()
    assert (out / ".lock").read_text().strip() == str(os.getpid())
    lock.release()


# -- writes ---------------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    diffusion_trainer(tiny(tmp_path, steps=4), progress=False).run()
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    trainer = diffusion_trainer(tiny(tmp_path, steps=6), resume=True, progress=False)

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("difflab.checkpoint.save_file", full)
    with pytest.raises(DifflabError, match="disk is full"):
        trainer.run()
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    stale, live = tmp_path / f".checkpoint.safetensors.tmp{dead_pid()}", tmp_path / f".x.npz.tmp{os.getppid()}"
    stale.write_bytes(b"old"), live.write_bytes(b"busy")
    assert remove_stale(tmp_path) == [stale] and live.exists()
    with pytest.raises(DifflabError, match="cannot write"):
        atomic_write(tmp_path / "sub" / "file", lambda tmp: (_ for _ in ()).throw(OSError(errno.EACCES, "no")))
    assert not list((tmp_path / "sub").iterdir())


# -- bad values: one line naming the field, exit 2 -----------------------------------------------------------------
BAD_SETTINGS = ["train.batch_size=0", "train.batch_size=-1", "train.checkpoint_every=0", "train.log_every=0",
                "diffusion.timesteps=0", "train.lr=-1", "train.weight_decay=-0.1", "train.adam_betas=[0.9,1.5]",
                "train.steps=0", "train.steps=-5", "train.warmup_steps=-10", "model.mlp.hidden=0",
                "train.label_dropout=2", "train.nonfinite=maybe", "sample.eta=5", "sample.step_size=-1",
                "sample.langevin_steps=0", "sample.snr=-1", "sample.batch_size=0", "data.num_points=0"]


@pytest.mark.parametrize("setting", BAD_SETTINGS)
def test_out_of_range_settings_are_one_line_naming_the_field(setting, tmp_path, capsys):
    code = main(["train", "configs/toy.yaml", "--quiet", "--set", f"train.out_dir={tmp_path / 'run'}",
                 "--set", setting])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("difflab: error:") and len(err.splitlines()) == 1
    assert setting.split("=")[0].split(".")[-1] in err


def test_yaml_numbers_without_a_dot_and_broken_overrides(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("train:\n  lr: 1e-3\n")
    assert load_config(config_file).train.lr == 1e-3
    with pytest.raises(DifflabError, match="not valid YAML"):
        load_config(None, ["train.steps=[1,"])
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(DifflabError, match="empty"):
        load_config(tmp_path / "empty.yaml")


@pytest.mark.parametrize("option", [["--batch-size", "0"], ["--eta", "5"], ["--step-size", "-1"],
                                    ["--device", "tpu"], ["--device", "cuda"] if not torch.cuda.is_available()
                                    else ["--device", "tpu"], ["--class", "3"]])
def test_bad_sampling_options_are_one_line(option, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "configs/toy.yaml", "--quiet", "--set", f"train.out_dir={out}", "--set", "train.steps=2",
                 "--set", "model.mlp.hidden=16"]) == 0
    capsys.readouterr()
    code = main(["sample", str(out), "--n", "4", "--out", str(tmp_path / "s"), *option])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("difflab: error:") and not any("Traceback" in line for line in err)


# -- kill -9 ----------------------------------------------------------------------------------------------------
def test_kill_9_during_training_and_checkpoint_writes_loses_nothing(tmp_path):
    """SIGKILL at random moments of a run that writes a checkpoint every step: the folder always holds a
    loadable checkpoint, the next start removes the killed process's temporary file and stale lock, and
    ``--resume`` finishes the run bit-identically to an uninterrupted one."""
    import random
    import time

    settings = ["model.mlp.hidden=16", "model.mlp.depth=1", "train.batch_size=16", "train.steps=200",
                "train.checkpoint_every=1", "train.log_every=50", "train.sample_every=100000"]

    def command(out, resume=False):
        sets = [a for s in settings + [f"train.out_dir={out}"] for a in ("--set", s)]
        return [sys.executable, "-m", "difflab", "train", "configs/toy.yaml", "--quiet", *sets,
                *(["--resume"] if resume else [])]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command(tmp_path / "full"), check=True, env=env, capture_output=True)
    expected = load_checkpoint(tmp_path / "full").tensors
    rng = random.Random(0)
    for trial in range(2):
        out = tmp_path / f"killed{trial}"
        process = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (out / "checkpoint.safetensors").exists() and process.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = load_checkpoint(out)                                # a whole checkpoint, whatever was torn
        assert 0 < saved.state["step"] <= 200
        assert (out / ".lock").exists()                             # the killed run's lock is left behind
        resumed = subprocess.run(command(out, resume=True), env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        assert not [p for p in out.iterdir() if ".tmp" in p.name or p.name == ".lock"]
        final = load_checkpoint(out).tensors
        assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)


def test_milestones_keep_the_newest_ema_weights_and_sample_like_the_run(tmp_path):
    from difflab.pipelines.ddpm import load_model, sample

    trainer = diffusion_trainer(tiny(tmp_path, steps=10, **{"train.checkpoint_every": 2,
                                                             "train.keep_checkpoints": 2}), progress=False)
    trainer.run()
    milestones = sorted(p.name for p in (tmp_path / "run" / "milestones").iterdir())
    assert milestones == ["step_0000008.safetensors", "step_0000010.safetensors"]
    last = tmp_path / "run" / "milestones" / "step_0000010.safetensors"
    assert last.stat().st_size < (tmp_path / "run" / "checkpoint.safetensors").stat().st_size / 2
    run, milestone = load_model(tmp_path / "run"), load_model(last)
    options = run.config.sample
    assert torch.equal(sample(run, 20, options), sample(milestone, 20, options))
