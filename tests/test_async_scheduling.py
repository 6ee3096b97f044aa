"""Async scheduling (the next step scheduled and launched before this one's tokens are read back)
gives exactly what reading every step back first gives, whatever the requests ask for."""

import pytest
import torch
from conftest import random_prompts

from pagedllm import LLM, SamplingParams


def completions(outputs) -> list:
    """What must be equal; logprob values only to float error (the batches differ, so do the sums)."""
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              [{t: (pytest.approx(lp.logprob, abs=1e-4), lp.rank) for t, lp in entry.items()} for entry in c.logprobs]
              if c.logprobs else None)
             for c in o.outputs] for o in outputs]


def check_same_as_reading_each_step_back(path: str, params_for, num_kv_blocks: int | None, device: str = "cpu"):
    """``params_for(stop_token, stop_string)``: one SamplingParams per prompt."""
    prompts = random_prompts([5, 17, 30, 9, 41, 3, 26, 12])
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # a stop token and a stop string that greedy decoding reaches after a few tokens: they end a
    # request one step after the next step was launched
    kwargs = dict(device=device, dtype="float32", num_kv_blocks=num_kv_blocks or (None if device == "cpu" else 512))
    with LLM(path, **kwargs) as llm:
        probe = llm.generate(prompts[:2], greedy, use_tqdm=False)
    params = params_for(probe[0].outputs[0].token_ids[4], probe[1].outputs[0].text[6:9])
    # fresh engines, so that neither finds prompts in its prefix cache
    sync = LLM(path, async_scheduling=False, **kwargs)
    fast = LLM(path, **kwargs)
    assert fast.llm_engine.async_scheduling and not sync.llm_engine.async_scheduling
    fed = []
    feed = fast.llm_engine.executor.runner._feed_pending_inputs
    fast.llm_engine.executor.runner._feed_pending_inputs = lambda rows: (fed.append(len(rows or [])), feed(rows))
    expected = completions(sync.generate(prompts, params, use_tqdm=False))
    assert completions(fast.generate(prompts, params, use_tqdm=False)) == expected
    assert sum(fed) > 0, "no step was launched ahead of the one before"
    if num_kv_blocks:
        assert fast.llm_engine.scheduler.num_preemptions > 0
    assert fast.llm_engine.block_manager.num_free_blocks == fast.llm_engine.block_manager.num_blocks
    # tokens computed after a stop token are dropped, not counted
    assert fast.llm_engine.num_generated_tokens == sync.llm_engine.num_generated_tokens


def varied_params(stop_token: int, stop_string: str) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=20, stop=[stop_string], ignore_eos=True),
        SamplingParams(temperature=0.8, seed=3, max_tokens=16, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=5, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=18, min_tokens=10, stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    ]


@pytest.mark.parametrize("num_kv_blocks", [None, 12], ids=["roomy", "preempting"])
def test_same_outputs_as_reading_each_step_back(tiny_checkpoint, num_kv_blocks):
    check_same_as_reading_each_step_back(tiny_checkpoint("llama"), varied_params, num_kv_blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_kv_blocks", [None, 12], ids=["roomy", "preempting"])
def test_same_outputs_on_cuda(tiny_checkpoint, num_kv_blocks):
    """Pinned copies, the step's event, and pending inputs fed inside CUDA-graph decode steps."""
    check_same_as_reading_each_step_back(tiny_checkpoint("llama"), varied_params, num_kv_blocks, "cuda")


def test_penalties_wait_for_their_tokens(tiny_checkpoint):
    """Penalties count the output tokens: such steps are read back before the next is scheduled;
    the others in the batch (parallel samples among them) still go ahead."""
    def params_for(stop_token: int, stop_string: str) -> list[SamplingParams]:
        plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        return [
            SamplingParams(temperature=0.9, top_p=0.9, n=3, seed=5, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=8, presence_penalty=0.5, repetition_penalty=1.3,
                           ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=20, stop=[stop_string], ignore_eos=True),
        ] + [plain] * 5

    check_same_as_reading_each_step_back(tiny_checkpoint("llama"), params_for, 12)


def test_streams_give_the_same_token_sequence(tiny_checkpoint):
    path = tiny_checkpoint("gpt2")
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 11, 3)]
    prompts = random_prompts([8, 4, 15], seed=1)

    def stream(llm):
        seen: dict[str, list[list[int]]] = {}
        for output in llm.generate_stream(prompts, params):
            seen.setdefault(output.request_id, []).append(list(output.outputs[0].token_ids))
        return seen

    assert stream(LLM(path, device="cpu")) == stream(LLM(path, device="cpu", async_scheduling=False))


def test_abort_while_a_step_is_in_flight_frees_everything(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, prompt in enumerate(random_prompts([7, 12, 20])):
        engine.add_request(str(i), prompt, params)
    for _ in range(4):
        engine.step()
    assert engine._in_flight is not None
    for i in range(3):
        engine.abort_request(str(i))
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # the next call runs new work and drops what the aborted step sampled
    again = llm.generate(random_prompts([7]), params, use_tqdm=False)[0]
    alone = LLM(tiny_checkpoint("llama"), device="cpu").generate(random_prompts([7]), params, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids
