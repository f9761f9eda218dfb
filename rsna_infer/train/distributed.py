"""Several GPUs through ``torchrun``: process-group set-up from the environment it exports.

``torchrun --nproc_per_node=2 -m rsna_infer.cli train ...`` sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` each process trains a DistributedDataParallel
replica on its own GPU (NCCL) or, without CUDA, on CPU (gloo). Rank 0 alone validates,
writes files and exports; the others wait at barriers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


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


def setup(device: str | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; pick this process's device."""
    info = env_info()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if info.enabled or dev.index is None:
            dev = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d joined the %s process group on %s", info.rank, info.world_size, backend, dev)
    return info, dev


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    """Mean of a scalar over ranks (the training loss shown in the logs)."""
    if not (info.enabled and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
