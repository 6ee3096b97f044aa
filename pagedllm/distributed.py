"""The tensor-parallel group of this process, and the collectives the sharded layers use.

Layers read ``tp_rank()`` and ``tp_world_size()`` while they are built (``build_model`` sets them
with ``sharded_as``) and keep their world size: a one-rank model beside a tensor-parallel one in
the same process never calls a collective. A process joins at most one group at a time.
"""

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("pagedllm")


@dataclass
class TensorParallelState:
    rank: int = 0
    world_size: int = 1


_building = TensorParallelState()  # the shard of the model being built now


def tp_rank() -> int:
    return _building.rank


def tp_world_size() -> int:
    return _building.world_size


@contextmanager
def sharded_as(rank: int, world_size: int) -> Iterator[None]:
    """Layers built inside keep rank ``rank``'s shard of ``world_size``."""
    _building.rank, _building.world_size = rank, world_size
    try:
        yield
    finally:
        _building.rank, _building.world_size = 0, 1


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r runs on GPU r (or on the CPU)."""
    return torch.device("cuda", rank) if device.startswith("cuda") else torch.device("cpu")


def init_tensor_parallel(rank: int, world_size: int, device: torch.device, store: dist.Store,
                         timeout_s: float) -> None:
    """Join the group: NCCL between GPUs, gloo between CPU processes."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None)


def check_no_group() -> None:
    if dist.is_initialized():
        raise ValueError("this process already holds a torch.distributed process group (another LLM with "
                         "tensor_parallel_size > 1?): shut that LLM down first (llm.shutdown())")


def leave_tensor_parallel(timeout_s: float) -> None:
    """Leave the group. NCCL's teardown waits for every rank to leave too: if they do not within
    ``timeout_s`` (one died or hangs), go on without waiting, so that no rank waits forever."""
    if not dist.is_initialized():
        return
    left = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        finally:
            left.set()

    threading.Thread(target=destroy, name="pagedllm-tp-leave", daemon=True).start()
    if not left.wait(timeout_s):  # aborting now would wait on the teardown's locks: leave it to exit
        logger.warning("a rank did not leave the tensor-parallel group within %g s; going on without it "
                       "(this process cannot start another group)", timeout_s)


def abort_tensor_parallel() -> None:
    """Make collectives that wait for a dead peer fail instead of hanging (NCCL does not notice
    on its own; gloo does, when the peer's sockets close)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place."""
    dist.all_reduce(x)
    return x


def broadcast_from_driver(x: torch.Tensor) -> None:
    """Give every rank rank 0's ``x`` (each passes a tensor of its shape), in place."""
    dist.broadcast(x, src=0)


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` ``[rows, cols]`` along the columns, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def min_over_ranks(value: int, world_size: int) -> int:
    """The smallest ``value`` any of ``world_size`` ranks holds (each rank profiles its own memory)."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
