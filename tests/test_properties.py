"""Property tests (hypothesis): whatever SamplingParams and the engine accept completes without an
exception, and the block pool's bookkeeping holds under any sequence of adds, aborts, preemptions
and parallel samples."""

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_scheduler import fake_next_token

from pagedllm import LLM, SamplingParams
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.request import Request, SampleGroup
from pagedllm.engine.scheduler import Scheduler
from pagedllm.inputs import parse_prompt

GARBAGE = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=3),
                    st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(-3, 600), max_size=2))


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly values a user would pass, one time in twenty anything at all."""
    return st.integers(0, 19).flatmap(lambda roll: GARBAGE if roll == 0 else valid)


SAMPLING_FIELDS = {
    "n": field(st.integers(1, 3)),
    "temperature": field(st.one_of(st.just(0.0), st.floats(0.05, 2.0))),
    "top_p": field(st.floats(0.01, 1.0)),
    "top_k": field(st.integers(-1, 600)),
    "min_p": field(st.floats(0.0, 1.0)),
    "presence_penalty": field(st.floats(-2, 2)),
    "frequency_penalty": field(st.floats(-2, 2)),
    "repetition_penalty": field(st.floats(0.05, 3)),
    "max_tokens": field(st.one_of(st.none(), st.integers(1, 8))),
    "min_tokens": field(st.integers(0, 8)),  # with stop tokens: banned until then
    "stop": field(st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=2))),
    "stop_token_ids": field(st.lists(st.one_of(st.integers(0, 520), st.sampled_from([2, 511, 512, 513])), max_size=3)),
    "seed": field(st.one_of(st.none(), st.integers(-(2**63), 2**63))),
    "logprobs": field(st.one_of(st.none(), st.integers(0, 25))),
    "prompt_logprobs": field(st.one_of(st.none(), st.integers(0, 25))),
    "ignore_eos": field(st.booleans()),
    "include_stop_str_in_output": field(st.booleans()),
    "skip_special_tokens": field(st.booleans()),
    "allowed_token_ids": field(st.one_of(st.none(), st.lists(st.integers(0, 520), min_size=1, max_size=4))),
    "logit_bias": field(st.one_of(st.none(), st.dictionaries(st.integers(0, 520), st.floats(-100, 100), max_size=3))),
    "bad_words": field(st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=2))),
}
REQUEST = st.tuples(st.fixed_dictionaries({}, optional=SAMPLING_FIELDS),
                    st.one_of(st.lists(st.integers(0, 530), min_size=0, max_size=24), st.text(max_size=40)))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("llama"), device="cpu", max_model_len=64, num_kv_blocks=12, max_num_seqs=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(REQUEST, min_size=1, max_size=4))
def test_what_is_accepted_completes(llm, requests):
    accepted = []
    for fields, prompt in requests:
        try:
            params = SamplingParams(**fields)
            prompt_ids = parse_prompt(prompt, llm.get_tokenizer())[1]
            llm.llm_engine.validate_request(prompt_ids, params)
        except ValueError:
            continue  # refused with a ValueError (never a TypeError or anything else): that is fine
        accepted.append((prompt, params))
    event(f"{len(accepted)} of the requests accepted")
    if not accepted:
        return
    outputs = llm.generate([p for p, _ in accepted], [s for _, s in accepted], use_tqdm=False)
    for output, (_, params) in zip(outputs, accepted, strict=True):
        assert output.finished and output.error is None and len(output.outputs) == params.n
        for completion in output.outputs:
            assert completion.finish_reason in ("stop", "length")
            assert len(completion.token_ids) <= (params.max_tokens or 64)
            if params.allowed_token_ids:
                assert set(completion.token_ids) <= set(params.allowed_token_ids)
            if params.logprobs is not None:
                assert len(completion.logprobs) == len(completion.token_ids)
                assert all(math.isfinite(e[t].logprob) or e[t].logprob == -math.inf
                           for t, e in zip(completion.token_ids, completion.logprobs, strict=True))
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


EXTREME = {  # the ends of what SamplingParams accepts, where float32 overflows
    "temperature": st.sampled_from([0.0, 1e-30, 1e-6, 0.7, 1e30, 3.4e38]),
    "top_p": st.sampled_from([1e-300, 1e-8, 0.5, 1.0]),
    "top_k": st.sampled_from([0, 1, 2]),
    "min_p": st.sampled_from([0.0, 0.5, 1.0]),
    "presence_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "frequency_penalty": st.sampled_from([-2.0, 0.0, 2.0]),
    "repetition_penalty": st.sampled_from([1e-300, 1e-20, 1.0, 1e20, 3.4e307]),
}
CONSTRAINTS = st.sampled_from([{"allowed_token_ids": [5, 6, 7]}, {"structured_outputs": {"regex": "[ab]{3,6}"}},
                               {"structured_outputs": {"choice": ["yes", "no"]}}])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.fixed_dictionaries({}, optional=EXTREME), constraint=CONSTRAINTS, seed=st.integers(0, 2**31))
def test_extreme_sampling_values_keep_to_the_constraint(llm, fields, constraint, seed):
    """A penalty of 3.4e307 once made every token a grammar allowed -inf, and the request failed (a 500
    on the server): at any accepted values a constrained request completes within its constraint."""
    try:
        params = SamplingParams(max_tokens=6, seed=seed, **fields, **constraint)
    except ValueError:
        return  # (greedy with top_p < 1 and the like)
    outputs = llm.generate(["ieee block", [5, 6, 6, 7]], params, use_tqdm=False)
    for output in outputs:
        assert output.error is None
        completion = output.outputs[0]
        if "allowed_token_ids" in constraint:
            assert set(completion.token_ids) <= {5, 6, 7}
        elif "choice" in constraint["structured_outputs"]:
            assert completion.text in ("yes", "no") or completion.finish_reason == "length"
        else:
            assert set(completion.text) <= {"a", "b"}


def check_pool(scheduler: Scheduler) -> None:
    """No block is both free and held; each block's reference count equals its holders."""
    manager = scheduler.block_manager
    holders = [0] * manager.num_blocks
    for request in scheduler.running:
        assert len(set(request.block_table)) == len(request.block_table)
        for block in request.block_table:
            holders[block] += 1
    assert all(not r.block_table for r in scheduler.waiting), "a waiting request holds blocks"
    assert holders == manager.ref_counts
    assert all((holders[b] == 0) == (b in manager.free_block_ids) for b in range(manager.num_blocks))


OPERATION = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 12), st.integers(1, 3), st.integers(0, 2)),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 50)),
    st.tuples(st.just("abort many"), st.lists(st.integers(0, 50), max_size=5)),  # a client leaving with several
)


@settings(max_examples=150, deadline=None)
@given(operations=st.lists(OPERATION, max_size=40), num_blocks=st.integers(6, 16),
       prefix_caching=st.booleans())
def test_block_pool_bookkeeping_holds_under_any_sequence(operations, num_blocks, prefix_caching):
    scheduler = Scheduler(BlockManager(num_blocks, 4, prefix_caching), max_num_seqs=3, max_num_batched_tokens=12)
    groups: list[list[Request]] = []
    prompts = [[7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26][:k] for k in (5, 13, 20)]

    def step() -> None:
        out = scheduler.schedule()
        assert len(scheduler.running) <= scheduler.max_num_seqs
        sampled = [fake_next_token(r.token_ids) if r.num_computed_tokens + n == r.num_tokens else None
                   for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)]
        scheduler.commit_step(out)
        scheduler.update_from_output(out, sampled)

    for operation in operations:
        if operation[0] == "add":
            _, prompt_len, max_tokens, n, shared = operation
            prompt = prompts[shared][:prompt_len] if shared < len(prompts) else list(range(3, 3 + prompt_len))
            if scheduler.block_manager.blocks_for(len(prompt) + max_tokens) > num_blocks:
                continue  # the engine refuses what can never fit
            params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens)
            group = SampleGroup(str(len(groups))) if n > 1 else None
            members = [Request(f"{len(groups)}#{i}", list(prompt), params, max_tokens, frozenset(), group=group,
                               sample_index=i) for i in range(n)]
            if group is not None:
                group.members = members
            for request in members:
                scheduler.add_request(request)
            groups.append(members)
        elif operation[0] == "step" and scheduler.has_unfinished_requests():
            step()
        elif operation[0] == "abort" and groups:
            for request in groups[operation[1] % len(groups)]:
                if not request.is_finished:
                    scheduler.finish_request(request, "abort")
        elif operation[0] == "abort many" and groups:
            chosen = {i % len(groups) for i in operation[1]}
            scheduler.finish_requests([r for i in chosen for r in groups[i] if not r.is_finished], "abort")
        check_pool(scheduler)
    for _ in range(500):
        if not scheduler.has_unfinished_requests():
            break
        step()
        check_pool(scheduler)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == num_blocks
    for members in groups:
        for request in members:
            if request.finish_reason == "length":
                expected = list(request.prompt_token_ids)
                for _ in range(request.max_tokens):
                    expected.append(fake_next_token(expected))
                assert request.token_ids == expected  # preemption and shared prefixes change nothing


@settings(max_examples=200, deadline=None)
@given(request_id=st.text(), model=st.text(), text=st.text(), index=st.integers(0, 2**40),
       finish_reason=st.sampled_from([None, "stop", "length"]), stop_reason=st.one_of(st.none(), st.text()))
def test_a_streamed_chunk_is_the_whole_chunk_models_json(request_id, model, text, index, finish_reason, stop_reason):
    """ChunkFrame serializes a stream's envelope once and each chunk's choices into it: the same JSON
    as the whole chunk model, for any text (quotes, escapes, "choices":[] itself) and names."""
    import json

    from pagedllm.entrypoints.openai.protocol import (
        ChatChunkChoice,
        ChatCompletionChunk,
        ChatDelta,
        ChunkFrame,
        CompletionChoice,
        CompletionResponse,
        Usage,
    )

    chat = [ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=finish_reason)]
    frame = ChunkFrame(ChatCompletionChunk(id=request_id, model=model, choices=[]))
    whole = ChatCompletionChunk(id=request_id, model=model, created=frame.created, choices=chat)
    assert json.loads(frame(chat)) == json.loads(whole.model_dump_json())
    # a plain text chunk written out is the models' JSON to the byte, with and without the usage
    usage = Usage(prompt_tokens=index % 1000, completion_tokens=7, total_tokens=index % 1000 + 7)
    for content in (text or None, None):
        models = [ChatChunkChoice(index=index, delta=ChatDelta(content=content), finish_reason=finish_reason)]
        assert frame.chat_text(index, content, finish_reason) == frame(models)
        assert frame.chat_text(index, content, finish_reason, usage) == frame(models, usage)
    completion = [CompletionChoice(index=index, text=text, finish_reason=finish_reason, stop_reason=stop_reason)] * 2
    frame = ChunkFrame(CompletionResponse(id=request_id, model=model, choices=[]))
    whole = CompletionResponse(id=request_id, model=model, created=frame.created, choices=completion)
    assert json.loads(frame(completion)) == json.loads(whole.model_dump_json())
    for stop in (stop_reason, index):  # a stop string, a stop token id, none
        models = [CompletionChoice(index=index, text=text, finish_reason=finish_reason, stop_reason=stop)]
        assert frame.completion_text(index, text, finish_reason, stop) == frame(models)
        assert frame.completion_text(index, text, finish_reason, stop, usage) == frame(models, usage)
