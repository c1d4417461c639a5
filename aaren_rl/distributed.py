"""Data-parallel training over processes: ``torch.distributed`` as ``torchrun`` starts it.

    torchrun --standalone --nproc_per_node=2 -m aaren_rl train --dataset ... --device cuda

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; ``init_from_env`` joins the group
(NCCL on CUDA, one GPU per local rank; gloo on the CPU). ``train()`` sees the group
(``current()``) and wraps the model in DDP. Conventions (docs/distributed.md):

* ``TrainConfig.batch_size`` is the global batch: each rank samples ``batch_size / world_size``
  sequences from its own generator (``rank_seed``), and the loss is weighted so that DDP's mean
  of the ranks' gradients is the gradient of the global batch's loss (``rank_loss_weight``).
* rank 0 alone writes checkpoints, TensorBoard and evaluations; the others wait at barriers.

Imports nothing of the package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

# a collective waits this long for a rank busy elsewhere (rank 0 evaluating, saving)
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the group (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer (torchrun sets it)") from None


def launched_by_torchrun() -> bool:
    """True when RANK and WORLD_SIZE say this is one of several processes."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and _env_int("WORLD_SIZE") > 1


def current() -> Ranks:
    """The initialized process group's ranks, else a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Ranks()
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else dist.get_rank()
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def device_for(name: str, local_rank: int, local_world_size: int) -> torch.device:
    """The device of one rank: "auto"/"cuda" take the GPU of the local rank, "cpu" the CPU."""
    if name.startswith("cuda:"):
        raise ValueError(f"device {name!r} under torchrun: each rank takes the GPU of its local rank; "
                         f"give --device cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu or cuda")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < local_world_size:
        raise ValueError(f"device {name!r} with {local_world_size} ranks on this machine needs one GPU per rank, "
                         f"but torch sees {count}; start fewer processes (--nproc_per_node) or use --device cpu")
    return torch.device("cuda", local_rank)


def init_from_env(device_name: str, backend: str | None = None, timeout: timedelta = TIMEOUT) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes; the ranks and this rank's device. ``backend``:
    default NCCL on CUDA, gloo on the CPU; a sweep, whose processes only wait for each other,
    takes gloo with a long ``timeout`` on either."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in os.environ else world
    device = device_for(device_name, local, local_world)
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (docs/distributed.md)
        torch.cuda.set_device(device)
    if (backend or ("nccl" if device.type == "cuda" else "gloo")) == "nccl":
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return Ranks(rank, world, local), device


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current().active:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def rank_seed(seed: int, rank: int, world_size: int, step: int = 0) -> int:
    """The seed of one rank's sampling and dropout: ``seed`` itself for a single process, else a
    stream of its own drawn from (seed, rank, world_size, step) (``step`` > 0: re-derived at a resume
    that cannot restore the saved streams)."""
    if world_size == 1 and step == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, world_size, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rank_loss_weight(padding_mask: torch.Tensor, world_size: int) -> torch.Tensor:
    """Scale of a rank's mean loss (over its real steps) so that the mean over ranks of the scaled
    losses, which DDP's gradient averaging takes, is the global batch's mean over all real steps:
    ``n_rank * world_size / n_all`` (1 when every rank has as many real steps)."""
    n = (~padding_mask).sum().to(torch.float32)
    total = n.clone()
    dist.all_reduce(total)
    return n * world_size / total


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``x`` over the ranks."""
    dist.all_reduce(x)
    x /= dist.get_world_size()
    return x


def gather_to_main(obj):
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
