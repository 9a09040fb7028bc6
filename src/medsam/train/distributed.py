"""Distributed data parallel set-up from torchrun's environment (no launcher of our own).

``torchrun`` (one node or several) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` for every process; when they are present the default process group is
initialised with NCCL on GPUs and gloo on CPUs, and each process uses the GPU ``LOCAL_RANK``.
Without them the run is a single process (world size 1) and nothing is initialised.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rank 0 validates while the other ranks wait at a barrier: give it time on large validation sets.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=3)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable, so one shared default is fine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's variables, pick this process's device and start the process group.

    Args:
        device: ``auto`` (GPU ``LOCAL_RANK`` when CUDA is available, else CPU), ``cpu`` or ``cuda``.
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        use_cuda = torch.cuda.is_available()
    elif device in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is cuda but CUDA is not available")
        use_cuda = True
    elif device == "cpu":
        use_cuda = False
    else:
        raise ValueError(f"train.device must be auto, cpu or cuda; got {device!r}")
    if use_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        extra = {}
        if use_cuda and "device_id" in inspect.signature(dist.init_process_group).parameters:
            extra["device_id"] = dev  # binds NCCL to this GPU at once (torch >= 2.3)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT, **extra)
    return DistInfo(rank, world, local, dev)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over the ranks (the tensor itself when not distributed)."""
    if not info.distributed:
        return values
    out = values.detach().clone().to(info.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
