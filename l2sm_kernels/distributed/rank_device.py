"""The rank's CUDA device under NCCL (issue 23; docs/class_parallel.md, "NCCL"): NCCL runs a rank's
collectives on the current CUDA device, so a shard or features on another GPU (or every rank on
cuda:0 because torch.cuda.set_device(local_rank) was never called) make the collectives fail or hang.
The module's constructor and every call of the loss refuse them with a ValueError saying what to do."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

_SET_DEVICE = ("call torch.cuda.set_device(local_rank) before building the head (local_rank = "
               "int(os.environ['LOCAL_RANK']) under torchrun), or init_process_group('nccl', "
               "device_id=torch.device('cuda', local_rank))")


def device_problem(device: torch.device, dist_backend: str, current: int, local_rank: int | None,
                   device_count: int) -> str | None:
    """Why `device` cannot hold this rank's shard under `dist_backend` (None: it can). current: the
    current CUDA device's index; local_rank: LOCAL_RANK (None when not set). A pure function of its
    arguments (the module passes torch's and the environment's values)."""
    if device.type != "cuda" or "nccl" not in dist_backend:
        return None
    index = current if device.index is None else device.index
    if index != current:
        return (f"device cuda:{index} is not the current CUDA device (cuda:{current}); NCCL runs this rank's "
                f"collectives on the current device: {_SET_DEVICE}")
    if local_rank is not None and device_count > 1 and index != local_rank % device_count:
        return (f"this rank (LOCAL_RANK={local_rank}) would hold its shard on cuda:{index}, the current device, "
                f"which belongs to local rank {index}: every rank would work on the same GPU; {_SET_DEVICE}")
    return None


def _check_rank_device(device, group, what: str) -> None:
    """Raise ValueError(device_problem(...)) for a CUDA device under NCCL (cheap: no sync)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    backend = str(dist.get_backend(group))
    lr = os.environ.get("LOCAL_RANK")
    problem = device_problem(device, backend, torch.cuda.current_device(), int(lr) if lr and lr.isdigit() else None,
                             torch.cuda.device_count())
    if problem:
        raise ValueError(f"{what}: {problem}")
