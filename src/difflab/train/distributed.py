"""Data-parallel training across processes: which process this is, on which device, and the few
collectives the trainer needs.

``torchrun --nproc_per_node=N -m difflab train CONFIG`` starts N processes and tells each its place
through the environment variables RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR / MASTER_PORT, which
``torch.distributed``'s ``env://`` rendezvous reads itself). ``init`` turns them into a
``DistributedContext`` that is passed to the trainer; a plain ``python -m difflab train`` is the
one-process case of the same object, with no process group. The only global state is the process group
that ``torch.distributed`` itself keeps between ``init`` and ``teardown``.

Backends: NCCL on GPUs (one device per process, ``cuda:LOCAL_RANK``), gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from difflab.errors import DifflabError

DEVICES = ("auto", "cpu", "cuda")
# How long a rank waits for the others at a collective: long enough for rank 0 to write a checkpoint
# and sample a preview grid while the other ranks wait at the next gradient all-reduce.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and sample grids; the others only train."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (``value`` itself in a one-process run)."""
        if not self.is_distributed:
            return value
        value = value.detach().clone()
        torch_dist.all_reduce(value)
        return value / self.world_size

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """The ranks' equally shaped ``value`` concatenated in rank order along the first dimension."""
        if not self.is_distributed:
            return value
        parts = [torch.empty_like(value) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, value.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one, so all ranks take the same branch."""
        return bool(self.max(float(flag)))

    def max(self, value: float) -> float:
        """The largest of the ranks' ``value``, on every rank (a clock reading they must agree on)."""
        if not self.is_distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return tensor.item()

    def barrier(self) -> None:
        if self.is_distributed:
            torch_dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device``: "cpu", "cuda" (this process's GPU, ``cuda:LOCAL_RANK``) or "auto" (cuda if any)."""
    if name not in DEVICES:
        raise DifflabError(f"unknown train.device {name!r}; choose one of {DEVICES}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DifflabError("train.device is 'cuda' but torch sees no CUDA device (use 'cpu' or 'auto')")
    if local_rank >= torch.cuda.device_count():
        raise DifflabError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", local_rank)


def launch_ranks(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    if "WORLD_SIZE" not in env:
        return 0, 1, 0
    try:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise DifflabError(f"torchrun environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e})") from None
    if not 0 <= rank < world_size:
        raise DifflabError(f"torchrun environment: RANK {rank} is not in [0, WORLD_SIZE={world_size})")
    return rank, world_size, local_rank


def single_process(device: str = "auto") -> DistributedContext:
    return DistributedContext(device=resolve_device(device))


def init(device: str, env: Mapping[str, str]) -> DistributedContext:
    """This process's context; joins the process group (NCCL on GPU, gloo on CPU) when WORLD_SIZE > 1."""
    rank, world_size, local_rank = launch_ranks(env)
    context = DistributedContext(rank, world_size, local_rank, resolve_device(device, local_rank))
    if context.is_distributed:
        cuda = context.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(context.device)
        torch_dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank,
                                      world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                                      device_id=context.device if cuda else None)
    return context


def teardown(context: DistributedContext) -> None:
    if context.is_distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def data_parallel(net: nn.Module, context: DistributedContext) -> nn.Module:
    """``net`` wrapped in DistributedDataParallel (gradients averaged over ranks in the backward pass),
    or ``net`` itself in a one-process run. DDP also broadcasts rank 0's weights when it is built."""
    if not context.is_distributed:
        return net
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=device_ids)


def no_sync(model: nn.Module, skip: bool):
    """Within it, DDP keeps gradients local (for all but the last micro-batch of gradient accumulation)."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
