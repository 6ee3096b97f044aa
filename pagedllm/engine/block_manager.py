"""The pool of KV cache blocks: who owns which block, and which are free."""

from collections import deque

from pagedllm.engine.request import Request


class BlockManager:
    """Hands out fixed-size KV blocks on demand, one at a time as a sequence grows.

    Each block has a reference count (sequences may share blocks); a block returns to the
    free list when its count drops to zero. A sequence holds ``ceil(tokens / block_size)``
    blocks, so at most its last block is partly empty.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_tokens: int) -> bool:
        """Grow the request's block table to hold ``num_tokens`` tokens; False if blocks run out."""
        needed = self.blocks_for(num_tokens) - len(request.block_table)
        if needed > len(self.free_block_ids):
            return False
        for _ in range(needed):
            block_id = self.free_block_ids.popleft()
            self.ref_counts[block_id] = 1
            request.block_table.append(block_id)
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks (finished or preempted)."""
        for block_id in reversed(request.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        request.block_table.clear()
