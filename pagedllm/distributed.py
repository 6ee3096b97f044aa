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
    global _symmetric
    _symmetric = None
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


class SymmetricAllReduce:
    """All-reduce of small messages over NVLink through a buffer that every rank maps (PyTorch's
    symmetric memory, two-shot kernel; no NVLink multicast). A decode step's all-reduces are small
    (tokens x hidden): NCCL's ring takes ~35 µs for each 2 MiB one on two H100s, a quarter of a
    decode step's kernel time; this takes a fraction of that, and is captured in the decode graphs.
    Larger messages (prefill) go to NCCL, which is faster there."""

    MAX_BYTES = {2: 8 << 20, 4: 32 << 20}  # NCCL is as fast beyond these on Hopper
    DTYPES = (torch.bfloat16, torch.float32)  # what the kernel is built for

    def __init__(self, dtype: torch.dtype, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name
        max_bytes = self.MAX_BYTES[dist.get_world_size()]
        self.buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    @classmethod
    def usable(cls, dtype: torch.dtype, device: torch.device) -> bool:
        """The same answer on every rank of one host (the ranks set it up together, or none does)."""
        if device.type != "cuda" or dtype not in cls.DTYPES or dist.get_world_size() not in cls.MAX_BYTES:
            return False
        peers = range(dist.get_world_size())
        return torch.cuda.get_device_capability(device) >= (9, 0) and all(
            torch.cuda.can_device_access_peer(device.index, peer) for peer in peers if peer != device.index)

    def __call__(self, x: torch.Tensor) -> bool:
        """Sum ``x`` over the ranks in place, if it fits; False (nothing done) if not."""
        n = x.numel()
        if x.dtype != self.buffer.dtype or n > self.buffer.numel() or not x.is_contiguous():
            return False
        staged = self.buffer[:n]
        staged.copy_(x.view(-1))
        torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
        x.view(-1).copy_(staged)
        return True


_symmetric: SymmetricAllReduce | None = None


def enable_symmetric_all_reduce(dtype: torch.dtype, device: torch.device) -> None:
    """Every rank calls this at the same point (it is collective); a no-op where it cannot run."""
    global _symmetric
    if dist.is_initialized() and SymmetricAllReduce.usable(dtype, device):
        _symmetric = SymmetricAllReduce(dtype, device)
        logger.info("tensor-parallel all-reduce: symmetric memory up to %d MiB, NCCL beyond",
                    _symmetric.buffer.nbytes >> 20)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks, in place."""
    if _symmetric is None or not _symmetric(x):
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
