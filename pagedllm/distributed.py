"""This process's place in the tensor-parallel group, and the collectives the sharded layers use.

Layers read ``tp_rank()`` and ``tp_world_size()`` when they are built, to size their shards; with
one rank (the default) no process group exists and every collective is the identity.
"""

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class TensorParallelState:
    rank: int = 0
    world_size: int = 1


_state = TensorParallelState()


def tp_rank() -> int:
    return _state.rank


def tp_world_size() -> int:
    return _state.world_size


def init_tensor_parallel(rank: int, world_size: int, device: torch.device, store: dist.Store,
                         timeout_s: float) -> None:
    """Join the group: NCCL between GPUs, gloo between CPU processes."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None)
    _state.rank, _state.world_size = rank, world_size


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _state.rank, _state.world_size = 0, 1


def abort_tensor_parallel() -> None:
    """Make collectives that wait for a dead peer fail instead of hanging (NCCL does not notice
    on its own; gloo does, when the peer's sockets close)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place."""
    if _state.world_size > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` ``[rows, cols]`` along the columns, in rank order."""
    if _state.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int) -> int:
    """The smallest ``value`` any rank holds (each rank profiles its own memory)."""
    if _state.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
