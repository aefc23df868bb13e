"""Data-parallel training and the step-computation switches: 2 gloo ranks on the CPU take the steps of one
process with the same global batch; a 2-rank checkpoint resumes in 1 process; gradient accumulation,
bf16 autocast, gradient checkpointing and channels_last change nothing beyond float rounding."""

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from difflab.checkpoint import load_checkpoint
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.train import distributed
from difflab.train.distributed import DistributedContext
from difflab.train.diffusion import diffusion_trainer

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = dict(atol=1e-6, rtol=1e-5)


def toy_config(out_dir, steps=10, *extra):
    overrides = [f"train.out_dir={out_dir}", f"train.steps={steps}", "train.batch_size=64", "train.log_every=5",
                 "train.checkpoint_every=1000", "train.sample_every=100000", "train.device=cpu",
                 "data.num_points=2000", "model.mlp.hidden=32", "model.mlp.depth=2", "sample.steps=10"]
    return load_config(ROOT / "configs/toy.yaml", overrides + list(extra))


def parameters(trainer):
    return {**{f"model.{k}": v.detach().clone() for k, v in trainer.net.state_dict().items()},
            **{f"ema.{k}": v.detach().clone() for k, v in trainer.ema.model.state_dict().items()}}


def assert_close(a, b, **tolerance):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **(tolerance or TOLERANCE), msg=lambda m, k=key: f"{k}: {m}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(rank: int, world_size: int, port: int, out_dir: Path, steps: int, *extra: str) -> None:
    """One gloo rank (a spawned process): train, then save this rank's final weights for the parent."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist = distributed.init("cpu", os.environ)
    try:
        trainer = diffusion_trainer(toy_config(out_dir, steps, *extra), progress=False, dist=dist)
        trainer.run()
        torch.save(parameters(trainer), out_dir / f"rank{rank}.pt")
    finally:
        distributed.teardown(dist)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    trainer = diffusion_trainer(toy_config(tmp_path_factory.mktemp("single")), progress=False)
    result = trainer.run()
    return parameters(trainer), result


def test_two_ranks_match_one_process(tmp_path, single_run):
    mp.spawn(rank_worker, args=(2, free_port(), tmp_path, 10), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key          # the ranks never drift apart
    assert_close(rank0, single_run[0])
    assert load_checkpoint(tmp_path).state["step"] == 10
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2    # rank 0 logged, rank 1 did not


def test_two_ranks_take_the_same_rates_when_they_decay_over_a_time_budget(tmp_path):
    """The rate reads the clock; the ranks agree on one reading, so their weights stay identical."""
    extra = ("train.lr_schedule=cosine", "train.max_minutes=0.03", "train.warmup_steps=1")
    mp.spawn(rank_worker, args=(2, free_port(), tmp_path, 100000, *extra), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    state = load_checkpoint(tmp_path).state
    assert 0 < state["step"] < 100000 and state["train_seconds"] >= 0.03 * 60


def test_torchrun_checkpoint_resumes_in_one_process(tmp_path, single_run):
    out = tmp_path / "run"
    overrides = [f"train.out_dir={out}", "train.steps=4", "train.batch_size=64", "train.log_every=5",
                 "train.checkpoint_every=1000", "train.sample_every=100000", "train.device=cpu",
                 "data.num_points=2000", "model.mlp.hidden=32", "model.mlp.depth=2", "sample.steps=10"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "difflab", "train", "configs/toy.yaml", "--quiet"]
    command += [arg for item in overrides for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("trained toy to step 4 on 2 ranks") == 1     # only rank 0 prints
    resumed = diffusion_trainer(toy_config(out, 10), resume=True, progress=False)
    assert resumed.step == 4
    resumed.run()
    assert_close(parameters(resumed), single_run[0])


def test_gradient_accumulation_matches_the_big_batch(tmp_path, single_run):
    trainer = diffusion_trainer(toy_config(tmp_path, 10, "train.grad_accumulation=4"), progress=False)
    result = trainer.run()
    assert_close(parameters(trainer), single_run[0])
    assert math.isclose(result.last_loss, single_run[1].last_loss, rel_tol=1e-5)


def test_bf16_autocast_on_cpu(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):       # no warm-up, so that the weights move away from their init
        config = toy_config(tmp_path / precision, 10, "train.warmup_steps=1", f"train.precision={precision}")
        losses[precision] = diffusion_trainer(config, progress=False).run().last_loss
    assert math.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]     # autocast took effect
    assert math.isclose(losses["bf16"], losses["fp32"], rel_tol=0.01)


# channels_last without dropout: nn.Dropout draws its mask in memory order, so NHWC draws other masks.
@pytest.mark.parametrize("switch, dropout", [("train.gradient_checkpointing=true", 0.1),
                                             ("train.channels_last=true", 0.0)])
def test_checkpointing_and_channels_last_change_only_rounding(tmp_path, image_folder, switch, dropout):
    """One step's gradients from the same partly trained weights, with and without the switch. (Weights
    after several steps would say little: Adam turns the rounding of gradients near zero into weight
    differences of the order of the learning rate.)"""
    def trainer(*extra, resume=False):
        overrides = [f"train.out_dir={tmp_path}", "train.steps=4", "train.batch_size=4", "train.device=cpu",
                     "data.dataset=folder", f"data.path={image_folder}", "data.image_size=8",
                     "model.unet.model_channels=16", "model.unet.channel_mult=[1, 2]", "model.unet.num_res_blocks=1",
                     "model.unet.attention_resolutions=[4]", "model.unet.groups=8", f"model.unet.dropout={dropout}"]
        return diffusion_trainer(load_config(ROOT / "configs/fashion_mnist.yaml", overrides + list(extra)),
                                 resume=resume, progress=False)

    def gradients(*extra):
        resumed = trainer(*extra, resume=True)            # these switches may change when a run is resumed
        resumed.train_step()
        return {k: p.grad.clone() for k, p in resumed.net.named_parameters()}

    first = trainer()
    for _ in range(3):
        first.train_step()
    first.save()
    plain, switched = gradients(), gradients(switch)
    for key in plain:
        torch.testing.assert_close(switched[key], plain[key], atol=1e-6, rtol=1e-4,
                                   msg=lambda m, k=key: f"{switch}, {k}: {m}")


def test_layout_and_precision_errors(tmp_path):
    three_ranks = DistributedContext(rank=0, world_size=3)
    with pytest.raises(DifflabError, match="not divisible by 3 ranks"):
        diffusion_trainer(toy_config(tmp_path), progress=False, dist=three_ranks)
    with pytest.raises(DifflabError, match="grad_accumulation"):
        diffusion_trainer(toy_config(tmp_path, 10, "train.grad_accumulation=5"), progress=False)
    with pytest.raises(DifflabError, match="fp16.*CUDA"):
        diffusion_trainer(toy_config(tmp_path, 10, "train.precision=fp16"), progress=False)
    with pytest.raises(DifflabError, match="needs model.kind 'unet'"):
        diffusion_trainer(toy_config(tmp_path, 10, "train.gradient_checkpointing=true"), progress=False)
