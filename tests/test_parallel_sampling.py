"""n > 1: the samples share the prompt's KV blocks, a shared block is copied on first write, and
sample i equals a separate request seeded seed + i."""

import pytest
from conftest import random_prompts
from test_prefix_caching import computed, request_with

from pagedllm import LLM, SamplingParams
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.request import SampleGroup

PROMPT = random_prompts([37], seed=31)[0]  # 37 tokens: blocks of 16, the third one shared half full


def sampled(n: int, seed: int) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, seed=seed)


def test_shared_block_is_copied_on_first_write():
    manager = BlockManager(8, 4)
    parent = request_with(list(range(6)))
    computed(manager, parent, 6)  # [0-3] [4-5 half full]
    parent.group = SampleGroup("r", 2, [parent])
    child = parent.fork(1)
    manager.share(child)
    assert [manager.ref_counts[b] for b in parent.block_table] == [2, 2]
    child.token_ids.append(7)  # its sampled token goes at position 6, inside the shared half-full block
    assert manager.allocate_slots(child, 7)
    assert child.block_table[0] == parent.block_table[0] and child.block_table[1] != parent.block_table[1]
    assert manager.pending_copies == [(parent.block_table[1], child.block_table[1])]
    assert [manager.ref_counts[b] for b in parent.block_table] == [2, 1]
    manager.free(child)
    manager.free(parent)
    assert manager.num_free_blocks == 8


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("llama"), device="cpu", dtype="float32")


def test_n_samples_equal_separate_requests_seeded_seed_plus_i(llm):
    group = llm.generate([PROMPT], sampled(4, seed=100), use_tqdm=False)[0]
    assert [c.index for c in group.outputs] == [0, 1, 2, 3] and group.finished
    separate = llm.generate([PROMPT] * 4, [sampled(1, seed=100 + i) for i in range(4)], use_tqdm=False)
    assert [c.token_ids for c in group.outputs] == [o.outputs[0].token_ids for o in separate]
    assert len({tuple(c.token_ids) for c in group.outputs}) > 1  # they are different samples
    engine = llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def blocks_in_use_after(llm, prompts, params, steps: int) -> int:
    engine = llm.llm_engine
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"b{i}", prompt, p)
    for _ in range(steps):
        engine.step()
    in_use = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    for i in range(len(prompts)):
        engine.abort_request(f"b{i}")
    return in_use


def test_n_samples_use_fewer_blocks_than_separate_requests(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu", enable_prefix_caching=False)
    group = blocks_in_use_after(llm, [PROMPT], [sampled(4, seed=1)], steps=3)
    separate = blocks_in_use_after(llm, [PROMPT] * 4, [sampled(1, seed=1 + i) for i in range(4)], steps=3)
    assert separate == 4 * 3  # 37 + 2 tokens each: three blocks
    assert group == 2 + 4  # the two full prompt blocks shared, one own third block per sample


def test_samples_survive_preemption(tiny_checkpoint, llm):
    # 2 groups x 3 samples of 37 + 20 tokens: 2 shared prompt blocks + 2 own blocks per sample > 8 blocks
    params = SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True, seed=5)
    expected = llm.generate([PROMPT] * 2, params, use_tqdm=False)
    tight = LLM(tiny_checkpoint("llama"), device="cpu", dtype="float32", num_kv_blocks=8)
    got = tight.generate([PROMPT] * 2, params, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]


def test_group_streams_and_aborts_as_one_request(llm):
    outputs = list(llm.generate_stream([PROMPT], sampled(2, seed=3)))
    assert outputs[-1].finished and len(outputs[-1].outputs) == 2
    assert all(o.request_id == outputs[0].request_id for o in outputs)
    stream = llm.generate_stream([PROMPT], SamplingParams(n=3, temperature=1.0, max_tokens=40, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_with_n_above_one_is_an_error():
    with pytest.raises(ValueError, match=r"SamplingParams\.n=2 is invalid: it must be 1 with greedy"):
        SamplingParams(n=2, temperature=0)
