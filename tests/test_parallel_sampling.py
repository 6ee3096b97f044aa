"""n > 1: the samples are requests of one group, sharing the prompt's KV blocks through the prefix
cache; sample i equals a separate request seeded seed + i; more samples than the batch holds wait."""

import pytest
from conftest import random_prompts

from pagedllm import LLM, SamplingParams

PROMPT = random_prompts([37], seed=31)[0]  # 37 tokens: blocks of 16, the third one shared half full


def sampled(n: int, seed: int) -> SamplingParams:
    return SamplingParams(n=n, temperature=1.0, top_p=0.9, max_tokens=12, ignore_eos=True, seed=seed)


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


def test_n_samples_share_the_prompt_blocks(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    separate = blocks_in_use_after(llm, [PROMPT] * 4, [sampled(1, seed=1 + i) for i in range(4)], steps=3)
    llm = LLM(tiny_checkpoint("llama"), device="cpu")  # an empty prefix cache again
    group = blocks_in_use_after(llm, [PROMPT], [sampled(4, seed=1)], steps=3)
    assert separate == 4 * 3  # admitted together, each computes its 37 tokens: three blocks each
    assert group == 2 + 4  # the two full prompt blocks shared, one own third block per sample


def test_more_samples_than_the_batch_holds_wait_their_turn(tiny_checkpoint, llm):
    params = SamplingParams(n=5, temperature=1.0, max_tokens=6, ignore_eos=True, seed=9)
    expected = llm.generate([PROMPT], params, use_tqdm=False)[0]
    small = LLM(tiny_checkpoint("llama"), device="cpu", dtype="float32", max_num_seqs=2)
    got = small.generate([PROMPT, PROMPT[:9]], [params, sampled(3, seed=4)], use_tqdm=False)
    assert [c.token_ids for c in got[0].outputs] == [c.token_ids for c in expected.outputs]
    assert [len(c.token_ids) for c in got[1].outputs] == [12, 12, 12]


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
