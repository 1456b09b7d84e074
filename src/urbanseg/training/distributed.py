"""Several processes (`torchrun --nproc_per_node=N [--nnodes=M ...] -m urbanseg train`):
process-group set-up from torchrun's environment, and the few collectives training needs.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) every helper is a
cheap no-op, so the training loop has one code path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global rank, number of processes, rank on its node,
    number of processes on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs and draws the progress bar."""
        return self.rank == 0


def from_env() -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (defaults: one process)."""
    env = os.environ
    return DistInfo(
        int(env.get("RANK", 0)),
        int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", 1)),
    )


def setup(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo on the CPU."""
    if info.enabled and not dist.is_initialized():
        # Before init_process_group, not after: torch.distributed.nn.functional binds
        # `group.WORLD` as the default argument of its collectives when first imported, and
        # DistributedDataParallel's constructor imports it. Imported after the group exists it
        # keeps it alive for good, so destroy_process_group cannot free it: gloo's worker
        # threads then outlive `cleanup` into interpreter shutdown, and one still releasing the
        # tensors of the last collective there (rank 1's gather in the final save) takes the
        # GIL during finalization, which ends the thread inside a C++ destructor: the process
        # aborts with "terminate called without an active exception" (about 1 run in 15).
        # Imported now, the defaults are None (the default group, looked up at each call).
        import torch.distributed.nn  # noqa: F401

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)


def cleanup() -> None:
    """Leave the process group. Once nothing else holds it (the DDP wrapper is gone with its
    Trainer), this frees it and joins its backend's threads before the interpreter shuts
    down (see `setup`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj: Any) -> list[Any] | None:
    """Collect one picklable object per process on rank 0 (list by rank); None elsewhere."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
