"""Prefix caching: shared prefixes are computed once, stay cached after their requests finish,
and are evicted least recently used first when blocks run short."""

import pytest
from conftest import random_prompts
from test_block_manager import make_request

from pagedllm import LLM, SamplingParams
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.request import Request
from pagedllm.sampling_params import SamplingParams as Params


def request_with(tokens: list[int], request_id: str = "r") -> Request:
    return Request(request_id, tokens, Params(), 4, frozenset())


def computed(manager: BlockManager, request: Request, num_tokens: int) -> None:
    """What the scheduler does: blocks for num_tokens, all computed, full ones cached."""
    assert manager.allocate_slots(request, num_tokens)
    request.num_computed_tokens = num_tokens
    manager.cache_full_blocks(request)


def test_longest_cached_prefix_is_shared_and_one_token_is_always_left_to_compute():
    manager = BlockManager(16, 4, enable_prefix_caching=True)
    first = request_with(list(range(10)))
    computed(manager, first, 10)  # blocks [0-3] [4-7] full and cached, [8-9] partial
    second = request_with(list(range(8)) + [99, 98, 97], "b")
    assert manager.take_cached_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert [manager.ref_counts[b] for b in first.block_table] == [2, 2, 1]
    exact = request_with(list(range(8)), "c")  # the whole prompt is cached: its last block is not taken
    assert manager.take_cached_prefix(exact) == 4


def test_a_hash_collision_is_not_a_hit():
    manager = BlockManager(8, 4, enable_prefix_caching=True)
    first = request_with([1, 2, 3, 4, 5])
    computed(manager, first, 5)
    key, _ = manager.block_keys[first.block_table[0]]
    manager.block_keys[first.block_table[0]] = (key, (9, 9, 9, 9))  # same key, other tokens
    assert manager.take_cached_prefix(request_with([1, 2, 3, 4, 5], "b")) == 0


def test_freed_blocks_stay_cached_until_evicted_least_recently_used_first():
    manager = BlockManager(6, 2, enable_prefix_caching=True)
    old, new = request_with([1, 2, 3, 4, 0], "old"), request_with([5, 6, 7, 8, 0], "new")
    computed(manager, old, 5)  # blocks: [1 2] [3 4] cached, [0] partial
    computed(manager, new, 5)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    manager.free(old)  # freed first: evicted first, its tail before its head
    manager.free(new)
    assert list(manager.free_block_ids) == old_blocks[::-1] + new_blocks[::-1]
    assert manager.allocate_slots(make_request("filler"), 6)  # three blocks: exactly old's
    assert manager.take_cached_prefix(request_with([1, 2, 3, 4, 0], "old again")) == 0
    assert manager.take_cached_prefix(request_with([5, 6, 7, 8, 0], "new again")) == 4


@pytest.fixture(scope="module")
def shared_prefix_prompts():
    prefix = random_prompts([100], seed=21)[0]
    return prefix, [prefix + suffix for suffix in random_prompts([5, 9, 2, 7, 3, 11], seed=22)]


def run_with_warm_prefix(path, prefix, prompts, enable: bool):
    llm = LLM(path, device="cpu", enable_prefix_caching=enable)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate([prefix + [3]], params, use_tqdm=False)
    computed_before = engine.scheduler.num_computed_tokens
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params)
    engine.step()  # every request admitted and prefilled in one step
    blocks_in_use = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step()})
    return ([outputs[f"p{i}"] for i in range(len(prompts))], blocks_in_use,
            engine.scheduler.num_computed_tokens - computed_before)


def test_shared_prefix_uses_fewer_blocks_and_computes_fewer_tokens(tiny_checkpoint, shared_prefix_prompts):
    prefix, prompts = shared_prefix_prompts
    path = tiny_checkpoint("qwen3")
    cached, cached_blocks, cached_tokens = run_with_warm_prefix(path, prefix, prompts, enable=True)
    plain, plain_blocks, plain_tokens = run_with_warm_prefix(path, prefix, prompts, enable=False)
    assert [o.outputs[0].token_ids for o in cached] == [o.outputs[0].token_ids for o in plain]
    assert [o.num_cached_tokens for o in cached] == [96] * 6  # six full blocks of 16 of the 100-token prefix
    assert [o.num_cached_tokens for o in plain] == [0] * 6
    assert cached_tokens == plain_tokens - 6 * 96
    # six prompts of 102-111 tokens: 7 blocks each alone; with the cache, 6 shared blocks + 1-2 each
    assert plain_blocks == sum(-(-(len(p) + 1) // 16) for p in prompts)
    assert cached_blocks <= 6 + 2 * 6 < plain_blocks


def test_cached_prefix_is_evicted_under_memory_pressure(tiny_checkpoint, shared_prefix_prompts):
    prefix, _ = shared_prefix_prompts
    llm = LLM(tiny_checkpoint("qwen3"), device="cpu", num_kv_blocks=24)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate([prefix + [3]], params, use_tqdm=False)[0]
    again = llm.generate([prefix + [4]], params, use_tqdm=False)[0]
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 96)
    llm.generate(random_prompts([150, 150, 150], seed=5), params, use_tqdm=False)  # needs every block
    evicted = llm.generate([prefix + [3]], params, use_tqdm=False)[0]
    assert evicted.num_cached_tokens == 0
    assert evicted.outputs[0].token_ids == first.outputs[0].token_ids


def test_a_cache_salt_shares_prefixes_only_within_itself():
    """vLLM's cache_salt: tenants of one server cannot learn each other's prompts from a faster start
    (a prefix-cache hit), since a salted prompt's blocks are keyed under its salt alone; greedy
    outputs do not change. Bad salts are named before any work."""
    llm = LLM("models/pagedllm-demo", device="cpu")
    text = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n" * 3
    params = SamplingParams(temperature=0, max_tokens=4)

    def run(**salt):
        return llm.generate({"prompt": text, **salt}, params, use_tqdm=False)[0]

    first = run(cache_salt="tenant a")
    hits = [run(cache_salt="tenant a").num_cached_tokens, run(cache_salt="tenant b").num_cached_tokens,
            run().num_cached_tokens, run().num_cached_tokens, run(cache_salt="tenant b").num_cached_tokens]
    assert first.num_cached_tokens == 0 and hits[0] > 0
    assert hits[1:3] == [0, 0] and hits[3] == hits[4] == hits[0]  # b and the unsalted each compute their own
    assert run(cache_salt="tenant a").outputs[0].token_ids == first.outputs[0].token_ids
    for bad in ("", 5, "\ud800", "x" * 4097):
        with pytest.raises(ValueError, match="prompt 0: cache_salt=.* is invalid"):
            llm.generate({"prompt": text, "cache_salt": bad}, params, use_tqdm=False)
