"""The pool of KV cache blocks: who owns which block, which are free, and which hold a cached prefix."""

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from pagedllm.engine.request import Request, WindowBlocks


@dataclass(frozen=True)
class CacheCapacity:
    """What the KV cache can give one request, checked before the request is accepted. Its pools:
    one; or the full-attention layers' and the sliding layers' (models that mix them, Gemma 3),
    each as (blocks, the window outside which its blocks are released: None, kept)."""

    pools: tuple[tuple[int, int | None], ...]
    block_size: int
    max_num_batched_tokens: int

    def blocks_needed(self, num_tokens: int, sliding_window: int | None) -> int:
        """The most blocks a request of ``num_tokens`` holds at once in a pool: all of them; or,
        where its layers slide, a window's and two steps' chunks' (the last chunk's blocks are
        released only once keyed, a step later), and one partial block at each end."""
        whole = -(-num_tokens // self.block_size)
        if sliding_window is None:
            return whole
        return min(whole, -(-(sliding_window + 2 * self.max_num_batched_tokens) // self.block_size) + 2)

    def shortfall(self, num_tokens: int) -> tuple[int, int] | None:
        """(blocks needed, blocks there) in the first pool too small for a request of ``num_tokens``."""
        for num_blocks, sliding_window in self.pools:
            needed = self.blocks_needed(num_tokens, sliding_window)
            if needed > num_blocks:
                return needed, num_blocks
        return None


def window_pool_blocks(sliding_window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """The most blocks the sliding layers' own pool can hold at once: each running request a
    window's (and a partial block at each end), and two steps' chunks over all of them."""
    return max_num_seqs * (-(-sliding_window // block_size) + 2) + -(-2 * max_num_batched_tokens // block_size)


def block_key(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """A full block's prefix-cache key: SHA-256 of its parent's key (none for the first block) and
    its token ids, so that equal keys mean equal prefixes. Python's ``hash()`` of the same is not
    cryptographic: a client could craft prompts whose keys collide with another's (vLLM's
    CVE-2025-25183), and a later request would be given K/V computed for a different prefix.
    ~1 us a block, once per block."""
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


def salt_key(cache_salt: str | None) -> bytes | None:
    """The parent of a salted request's first block: its chain, and every key after, is its salt's."""
    return None if cache_salt is None else hashlib.sha256(b"cache_salt:" + cache_salt.encode()).digest()


class BlockManager:
    """Hands out fixed-size KV blocks on demand, one at a time as a sequence grows.

    Each block has a reference count (sequences may share blocks); a block returns to the free
    queue when its count drops to zero. A sequence holds ``ceil(tokens / block_size)`` blocks,
    so at most its last block is partly empty.

    Prefix caching: a full block whose K/V are computed is keyed by a hash chain (``block_key``:
    its parent's key and its own token ids, so the key stands for the whole prefix). A new request takes
    the cached blocks of its longest cached prefix instead of computing them. A freed block
    keeps its content and key until it is handed out again: free blocks are taken least
    recently freed first, so cached prefixes are evicted only when memory is needed. Cached
    blocks are full and never written again, so they are shared without copying.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 sliding_window: int | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window  # when every layer sees only the last this many positions
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_keys: list[tuple[bytes, tuple[int, ...]] | None] = [None] * num_blocks  # (key, tokens)
        self.cached_blocks: dict[bytes, int] = {}  # key -> block id
        self.num_cache_hits = self.num_cache_queries = 0  # in blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_tokens: int) -> bool:
        """Grow the request's block table to hold ``num_tokens`` tokens; False if blocks run out.
        Blocks it shares (a cached prefix) are full, so it never writes into them."""
        needed = self.blocks_for(num_tokens) - len(request.block_table)
        if needed > len(self.free_block_ids):
            return False
        for _ in range(needed):
            request.block_table.append(self._take_free_block())
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks (finished or preempted). Its tail blocks go first into the
        free queue, so they are evicted before the prefix blocks that others may share."""
        for block_id in reversed(request.block_table[request.num_released_blocks :]):
            self._release(block_id)
        request.block_table.clear()
        request.block_hashes.clear()
        request.num_released_blocks = 0

    def release_outside_window(self, request: Request) -> None:
        """With every layer sliding over the last ``sliding_window`` positions, release the blocks
        wholly before the window of the next position to compute: no step reads them again (one
        in flight reads them before any later step can write them: the device runs steps in
        order). Their table entries become -1. A released block keeps its prefix-cache key, so
        blocks are released only once keyed."""
        if self.sliding_window is None:
            return
        first_needed = max(request.num_computed_tokens - self.sliding_window + 1, 0)
        end = first_needed // self.block_size
        if self.enable_prefix_caching:
            end = min(end, len(request.block_hashes))
        for i in range(request.num_released_blocks, end):
            self._release(request.block_table[i])
            request.block_table[i] = -1
        request.num_released_blocks = max(request.num_released_blocks, end)

    def take_cached_prefix(self, request: Request) -> int:
        """Give a request with no blocks the cached blocks of its longest cached prefix; returns
        how many tokens they hold (at least one token is always left to compute)."""
        if not self.enable_prefix_caching or request.wants_prompt_logprobs:
            return 0  # prompt logprobs need every prompt token computed
        assert not request.block_table
        parent = salt_key(request.cache_salt)
        for i in range((request.num_tokens - 1) // self.block_size):
            tokens = tuple(request.token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = block_key(parent, tokens)
            block_id = self.cached_block(key, tokens)
            self.num_cache_queries += 1
            if block_id is None:
                break
            self.num_cache_hits += 1
            self.share(block_id)
            request.block_table.append(block_id)
            request.block_hashes.append(key)
            parent = key
        return len(request.block_table) * self.block_size

    def cached_block(self, key: bytes, tokens: tuple[int, ...]) -> int | None:
        """The block that holds the prefix block keyed ``key``, if it is still cached."""
        block_id = self.cached_blocks.get(key)
        return block_id if block_id is not None and self.block_keys[block_id] == (key, tokens) else None

    def share(self, block_id: int) -> None:
        """Take one more reference to a cached block (out of the free queue if it was there)."""
        if self.ref_counts[block_id] == 0:
            del self.free_block_ids[block_id]
        self.ref_counts[block_id] += 1

    def give_back_tail(self, request: Request, num_blocks: int) -> None:
        """Keep only the request's first ``num_blocks`` blocks (of a cached prefix it took)."""
        for block_id in reversed(request.block_table[num_blocks:]):
            self._release(block_id)
        del request.block_table[num_blocks:], request.block_hashes[num_blocks:]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; refused (False) while requests hold blocks."""
        if self.num_free_blocks < self.num_blocks:
            return False
        self.cached_blocks.clear()
        self.block_keys = [None] * self.num_blocks
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Key the request's blocks that are now full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(request.block_hashes), request.num_computed_tokens // bs):
            tokens = tuple(request.token_ids[i * bs : (i + 1) * bs])
            key = block_key(request.block_hashes[-1] if request.block_hashes else salt_key(request.cache_salt), tokens)
            request.block_hashes.append(key)
            block_id = request.block_table[i]
            if key not in self.cached_blocks:
                self.cached_blocks[key] = block_id
                self.block_keys[block_id] = (key, tokens)

    def _release(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_block_ids[block_id] = None

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        key = self.block_keys[block_id]
        if key is not None:  # evict its cached content
            if self.cached_blocks.get(key[0]) == block_id:
                del self.cached_blocks[key[0]]
            self.block_keys[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id


class HybridBlockManager:
    """The two pools of a model whose layers mix one sliding window with full attention (Gemma 3):
    the full layers' blocks, kept for the whole sequence, and the sliding layers' (a request's
    ``window_blocks``), released as they slide out of the window. A request gets room in both or
    in neither; the full pool is the one reported. A cached prefix needs its blocks in the full
    pool and, in the sliding pool, only those of the window its next position sees."""

    def __init__(self, full: BlockManager, window: BlockManager):
        assert window.sliding_window is not None and window.enable_prefix_caching == full.enable_prefix_caching
        self.full, self.window = full, window
        self.enable_prefix_caching = full.enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return self.full.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.full.num_free_blocks

    @property
    def num_cache_hits(self) -> int:
        return self.full.num_cache_hits

    @property
    def num_cache_queries(self) -> int:
        return self.full.num_cache_queries

    def allocate_slots(self, request: Request, num_tokens: int) -> bool:
        window = self._window_blocks(request)
        if (self.full.blocks_for(num_tokens) - len(request.block_table) > self.full.num_free_blocks
                or self.window.blocks_for(num_tokens) - len(window.block_table) > self.window.num_free_blocks):
            return False
        return self.full.allocate_slots(request, num_tokens) and self.window.allocate_slots(window, num_tokens)

    def free(self, request: Request) -> None:
        self.full.free(request)
        if request.window_blocks is not None:
            self.window.free(request.window_blocks)

    def release_outside_window(self, request: Request) -> None:
        self.window.release_outside_window(self._window_blocks(request))

    def take_cached_prefix(self, request: Request) -> int:
        """The longest prefix cached in the full pool whose last window is cached in the sliding
        pool too (the sliding blocks before it need not be: they would be released at once)."""
        self.full.take_cached_prefix(request)
        bs, window = self.full.block_size, self._window_blocks(request)
        taken = len(request.block_table)
        for n in range(taken, 0, -1):  # blocks of the prefix, longest first
            first = max(n * bs - self.window.sliding_window + 1, 0) // bs  # the first the next position sees
            ids = [self.window.cached_block(request.block_hashes[i], tuple(request.token_ids[i * bs:(i + 1) * bs]))
                   for i in range(first, n)]
            if None not in ids:
                break
        else:
            n, first, ids = 0, 0, []
        self.full.num_cache_hits -= taken - n
        self.full.give_back_tail(request, n)
        for block_id in ids:
            self.window.share(block_id)
        window.block_table[:] = [-1] * first + ids
        window.block_hashes[:] = request.block_hashes
        window.num_released_blocks = first
        return n * bs

    def cache_full_blocks(self, request: Request) -> None:
        self.full.cache_full_blocks(request)
        self.window.cache_full_blocks(self._window_blocks(request))

    def reset_prefix_cache(self) -> bool:
        if self.full.num_free_blocks < self.full.num_blocks or self.window.num_free_blocks < self.window.num_blocks:
            return False
        return self.full.reset_prefix_cache() and self.window.reset_prefix_cache()

    @staticmethod
    def _window_blocks(request: Request) -> WindowBlocks:
        if request.window_blocks is None:
            request.window_blocks = WindowBlocks(request)
        return request.window_blocks
