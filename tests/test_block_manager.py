from pagedllm.engine.block_manager import BlockManager, HybridBlockManager
from pagedllm.engine.request import Request
from pagedllm.sampling_params import SamplingParams


def make_request(request_id: str = "0", prompt_len: int = 5) -> Request:
    return Request(request_id, list(range(prompt_len)), SamplingParams(), 16, frozenset())


def test_block_table_grows_one_block_at_a_time():
    manager = BlockManager(num_blocks=8, block_size=4)
    request = make_request()
    for num_tokens, blocks in [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)]:
        assert manager.allocate_slots(request, num_tokens)
        assert len(request.block_table) == blocks
    assert manager.num_free_blocks == 5


def test_waste_is_less_than_one_block_per_sequence():
    manager = BlockManager(num_blocks=100, block_size=16)
    for n in range(1, 200):
        request = make_request(str(n))
        assert manager.allocate_slots(request, n)
        assert 0 <= len(request.block_table) * 16 - n < 16
        manager.free(request)


def test_allocation_fails_without_partial_grab_when_blocks_run_out():
    manager = BlockManager(num_blocks=3, block_size=4)
    first, second = make_request("a"), make_request("b")
    assert manager.allocate_slots(first, 8)
    assert not manager.allocate_slots(second, 8)
    assert second.block_table == [] and manager.num_free_blocks == 1


def test_freed_blocks_return_and_are_never_owned_twice():
    manager = BlockManager(num_blocks=6, block_size=2)
    requests = [make_request(str(i)) for i in range(3)]
    for r in requests:
        assert manager.allocate_slots(r, 4)
    owned = [b for r in requests for b in r.block_table]
    assert len(owned) == len(set(owned)) == 6 and manager.num_free_blocks == 0
    manager.free(requests[1])
    assert requests[1].block_table == [] and manager.num_free_blocks == 2
    assert manager.allocate_slots(requests[1], 3)
    owned = [b for r in requests for b in r.block_table]
    assert len(owned) == len(set(owned))
    for r in requests:
        manager.free(r)
    assert sorted(manager.free_block_ids) == list(range(6))
    assert manager.ref_counts == [0] * 6


def test_blocks_that_slide_out_of_every_layers_window_are_released_once():
    manager = BlockManager(num_blocks=10, block_size=4, sliding_window=6)
    request = make_request(prompt_len=30)
    assert manager.allocate_slots(request, 30)  # 8 blocks
    request.num_computed_tokens = 17  # the next position, 17, sees positions 12..17: blocks 0-2 are out
    manager.release_outside_window(request)
    assert request.block_table[:4] == [-1, -1, -1, 3] and manager.num_free_blocks == 5
    manager.release_outside_window(request)  # nothing twice
    assert manager.num_free_blocks == 5 and request.num_released_blocks == 3
    manager.free(request)
    assert manager.num_free_blocks == 10 and request.num_released_blocks == 0


def test_a_released_block_stays_in_the_prefix_cache_and_waits_for_its_key():
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True, sliding_window=4)
    first = make_request("a", prompt_len=20)
    assert manager.allocate_slots(first, 20)
    first.num_computed_tokens = 20
    manager.release_outside_window(first)  # no block is keyed yet: none released
    assert -1 not in first.block_table
    manager.cache_full_blocks(first)
    manager.release_outside_window(first)  # next position 20 sees 17..20: blocks 0-3 are out
    assert first.block_table[:4] == [-1] * 4
    second = make_request("b", prompt_len=20)
    assert manager.take_cached_prefix(second) == 16  # the released blocks still hold the prompt's prefix


def test_two_pools_give_a_request_room_in_both_or_in_neither():
    """Gemma 3's pools: the full layers' keeps every block, the sliding layers' (window 6) releases
    those out of the window; a request that one pool cannot grow gets nothing from the other."""
    full, window = BlockManager(num_blocks=10, block_size=4), BlockManager(num_blocks=4, block_size=4,
                                                                          sliding_window=6)
    manager = HybridBlockManager(full, window)
    request = make_request(prompt_len=30)
    assert manager.allocate_slots(request, 16) and len(request.block_table) == 4
    assert request.window_blocks.block_table == [0, 1, 2, 3] and window.num_free_blocks == 0
    assert not manager.allocate_slots(request, 17)  # the sliding pool is out: the full pool gives nothing
    assert full.num_free_blocks == 6 and len(request.block_table) == 4
    request.num_computed_tokens = 16  # the next position, 16, sees 11..16: blocks 0-1 slide out
    manager.release_outside_window(request)
    assert request.window_blocks.block_table == [-1, -1, 2, 3] and request.block_table == [0, 1, 2, 3]
    assert manager.allocate_slots(request, 24) and len(request.block_table) == 6
    assert manager.num_free_blocks == 4 and window.num_free_blocks == 0
    manager.free(request)
    assert full.num_free_blocks == 10 and window.num_free_blocks == 4 and not request.window_blocks.block_table


def test_the_budget_is_split_between_the_pools_by_what_the_sliding_one_can_use():
    import torch

    from pagedllm.worker.kv_cache import CacheGeometry, KVPools, split_between_pools

    pools = KVPools([], CacheGeometry(1, 16, 2, 64, torch.float16), [], CacheGeometry(5, 16, 2, 64, torch.float16),
                    512)
    main, sliding = pools.geometry.bytes_per_block, pools.window_geometry.bytes_per_block
    assert split_between_pools(1000 * main + 100 * sliding, pools, 1 << 62, 100) == (1000, 100)
    assert split_between_pools(1000 * main + 100 * sliding, pools, 600, 100) == (600, 100)  # no more than useful
    assert split_between_pools(50 * (main + sliding), pools, 1 << 62, 100) == (50, 50)  # too small: even


def test_a_cached_prefix_needs_only_its_last_window_in_the_sliding_pool():
    """Gemma 3's pools with prefix caching: a second request with the same 20-token prompt takes
    the full pool's 4 prefix blocks and, of the sliding pool (window 6), only the blocks the next
    position sees (positions 11..16 for position 16: blocks 2-3); once those are evicted from the
    sliding pool, nothing is cached."""
    full = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    window = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True, sliding_window=6)
    manager = HybridBlockManager(full, window)
    first = make_request("a", prompt_len=20)
    assert manager.allocate_slots(first, 20)
    first.num_computed_tokens = 20
    manager.cache_full_blocks(first)
    manager.release_outside_window(first)  # position 20 sees 15..20: blocks 0-2 of the sliding pool go
    assert first.window_blocks.block_table[:3] == [-1, -1, -1]
    shared = first.block_table[:4]
    manager.free(first)
    second = make_request("b", prompt_len=20)
    assert manager.take_cached_prefix(second) == 16  # 4 blocks (one token is always left to compute)
    assert second.block_table == shared and manager.num_cache_hits == 4
    assert second.window_blocks.block_table[:2] == [-1, -1] and -1 not in second.window_blocks.block_table[2:]
    assert second.window_blocks.num_released_blocks == 2 and len(second.window_blocks.block_hashes) == 4
    manager.free(second)
    other = make_request("c", prompt_len=30)  # fills the sliding pool: its cached blocks are evicted
    assert manager.allocate_slots(other, 30)
    manager.free(other)
    third = make_request("d", prompt_len=20)
    assert manager.take_cached_prefix(third) == 0 and not third.block_table
    assert full.num_free_blocks == 16 and window.num_free_blocks == 8


def test_a_blocks_key_is_a_sha256_chain_over_its_whole_prefix():
    """Python's hash() of (parent, tokens) is not cryptographic: a client could craft a prompt whose
    key collides with another's (vLLM's CVE-2025-25183) and poison what later requests are given.
    The key is SHA-256 over the parent's key and the block's token ids, so equal keys mean equal
    prefixes; a block shares only behind the same whole prefix."""
    import hashlib
    from array import array

    from pagedllm.engine.block_manager import block_key

    manager = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = Request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(), 16, frozenset())
    assert manager.allocate_slots(first, 9)
    first.num_computed_tokens = 9
    manager.cache_full_blocks(first)
    root = hashlib.sha256(array("q", [1, 2, 3, 4]).tobytes()).digest()
    assert first.block_hashes == [root, hashlib.sha256(root + array("q", [5, 6, 7, 8]).tobytes()).digest()]
    assert first.block_hashes == [block_key(None, (1, 2, 3, 4)), block_key(root, (5, 6, 7, 8))]
    other = Request("b", [9, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams(), 16, frozenset())  # its second block alike
    assert manager.take_cached_prefix(other) == 0
    same = Request("c", [1, 2, 3, 4, 5, 6, 7, 8, 0], SamplingParams(), 16, frozenset())
    assert manager.take_cached_prefix(same) == 8 and same.block_table == first.block_table[:2]
