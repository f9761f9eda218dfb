"""Several GPUs through ``torchrun``: process-group set-up from the environment it exports.

``torchrun --standalone --nproc_per_node=2 -m rsna_infer.cli train ...`` sets
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` each process trains a
DistributedDataParallel replica on its own GPU (NCCL) or, without CUDA, on CPU (gloo).

One process group serves the whole command (every fold of ``--fold all``): it is created
once (`setup`) and destroyed once at the end (`teardown`), never per fold. The ranks share
the work that used to stall them at barriers: decoding the cache and validation (each rank
validates a shard, rank 0 gathers). Rank 0 alone writes files. Every collective waits at
most ``timeout_s`` (default `DEFAULT_TIMEOUT_S`, ``--dist-timeout``), then fails with a
message instead of hanging.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: How long a collective (barrier, gather) may wait for the slowest rank. Generous, because
#: rank 0 also exports and writes checkpoints while the others wait; NCCL's own default is
#: 10 minutes.
DEFAULT_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """World size and ranks from torchrun's environment (single process when unset)."""
    try:
        return DistInfo(
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as e:
        raise ValueError(f"malformed torchrun environment (WORLD_SIZE/RANK/LOCAL_RANK): {e}") from None


def default_device() -> str:
    """``cuda`` when a GPU is usable, else ``cpu`` (training and out-of-fold keypoints alike)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup(device: str | None = None, timeout_s: float | None = None) -> tuple[DistInfo, torch.device, bool]:
    """Join the process group when launched by torchrun; pick this process's device.

    Returns ``(info, device, created)``: ``created`` is True when this call created the
    group (the caller then owns `teardown`)."""
    info = env_info()
    dev = torch.device(device or default_device())
    if dev.type == "cuda":
        if info.enabled or dev.index is None:
            dev = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    created = False
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend=backend, timeout=timeout)
        created = True
        logger.info("rank %d/%d joined the %s process group on %s (collective timeout %.0f s)", info.rank,
                    info.world_size, backend, dev, timeout.total_seconds())
    return info, dev, created


def _active(info: DistInfo) -> bool:
    return info.enabled and dist.is_initialized()


def barrier(info: DistInfo) -> None:
    if _active(info):
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    """Mean of a scalar over ranks (the training loss shown in the logs)."""
    if not _active(info):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def gather(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
    if not _active(info):
        return [obj]
    out: list[Any] = [None] * info.world_size if info.is_main else []
    dist.gather_object(obj, out if info.is_main else None, dst=0)
    return out if info.is_main else None


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not _active(info):
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(info: DistInfo) -> None:
    if _active(info):
        dist.destroy_process_group()
