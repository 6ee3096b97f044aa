"""The scheduler driven by a fake model whose next token is a function of the sequence so far:
outputs must not depend on batching, chunking or preemption."""

import random

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.request import PENDING_TOKEN, Request
from pagedllm.engine.scheduler import Scheduler, WaitingQueue
from pagedllm.sampling_params import SamplingParams


def fake_next_token(token_ids: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(token_ids)) * 31 + 7) % 1000


def make_request(request_id: str, prompt_len: int, max_tokens: int, stop_token_ids=frozenset()) -> Request:
    rng = random.Random(request_id)
    prompt = [rng.randrange(1000) for _ in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens), max_tokens, frozenset(stop_token_ids))


def expected_output(request: Request) -> list[int]:
    tokens = list(request.prompt_token_ids)
    for _ in range(request.max_tokens):
        tokens.append(fake_next_token(tokens))
        if tokens[-1] in request.stop_token_ids:
            break
    return tokens[request.num_prompt_tokens:]


def check_blocks(scheduler: Scheduler) -> None:
    manager = scheduler.block_manager
    owned = [b for r in scheduler.running for b in r.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert not set(owned) & set(manager.free_block_ids), "a free block is owned"
    assert len(owned) + manager.num_free_blocks == manager.num_blocks, "a block leaked"
    assert all(not r.block_table for r in scheduler.waiting), "a waiting request holds blocks"


def run(scheduler: Scheduler, requests: list[Request], on_step=None) -> dict[str, list[int]]:
    for r in requests:
        scheduler.add_request(r)
    outputs = {}
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        assert out.requests, "nothing scheduled while requests wait"
        assert out.total_num_tokens <= scheduler.max_num_batched_tokens
        assert len(scheduler.running) <= scheduler.max_num_seqs
        if on_step:
            on_step(out)
        sampled = []
        for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True):
            assert len(r.block_table) * scheduler.block_manager.block_size >= r.num_computed_tokens + n
            done = r.num_computed_tokens + n == r.num_tokens
            sampled.append(fake_next_token(r.token_ids) if done else None)
        scheduler.commit_step(out)
        for r in scheduler.update_from_output(out, sampled):
            outputs[r.request_id] = r.output_token_ids
        check_blocks(scheduler)
    return outputs


def run_scheduling_ahead(scheduler: Scheduler, requests: list[Request]) -> dict[str, list[int]]:
    """As the engine runs with async scheduling: step N+1 is scheduled and launched before step N's
    tokens are on the host. The fake device feeds each pending input the token it sampled last."""
    for r in requests:
        scheduler.add_request(r)
    outputs, in_flight, last_sampled = {}, None, {}
    while scheduler.has_unfinished_requests() or in_flight:
        out = scheduler.schedule()
        sampled = []
        for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True):
            tokens = list(r.token_ids)
            if tokens[-1] == PENDING_TOKEN:
                tokens[-1] = last_sampled[r.request_id]
            assert PENDING_TOKEN not in tokens[:-1]
            assert r.num_output_tokens < r.max_tokens, "scheduled again although its last token is pending"
            sampled.append(fake_next_token(tokens) if r.num_computed_tokens + n == r.num_tokens else None)
        last_sampled = {r.request_id: t for r, t in zip(out.requests, sampled, strict=True) if t is not None}
        if in_flight:
            for r in scheduler.update_from_output(*in_flight):
                assert PENDING_TOKEN not in r.token_ids
                outputs[r.request_id] = r.output_token_ids
        scheduler.commit_step(out)
        in_flight = (out, sampled) if out.requests else None
    check_blocks(scheduler)
    return outputs

def test_prefill_and_decode_share_one_step():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    first = make_request("a", 5, 4)
    scheduler.add_request(first)
    sampled = [fake_next_token(first.token_ids)]
    out = scheduler.schedule()
    scheduler.commit_step(out)
    scheduler.update_from_output(out, sampled)
    scheduler.add_request(make_request("b", 9, 4))
    out = scheduler.schedule()
    assert [r.request_id for r in out.requests] == ["a", "b"]
    assert out.num_scheduled_tokens == [1, 9]


def test_long_prompt_is_prefilled_in_chunks_under_the_budget():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    request = make_request("a", 25, 3)
    chunks = []
    outputs = run(scheduler, [request], on_step=lambda out: chunks.append(out.num_scheduled_tokens[0]))
    assert chunks[:3] == [10, 10, 5]
    assert outputs["a"] == expected_output(request)


def test_max_num_seqs_queues_the_rest():
    scheduler = Scheduler(BlockManager(256, 4), max_num_seqs=3, max_num_batched_tokens=1000)
    requests = [make_request(str(i), 4 + i, 5) for i in range(10)]
    outputs = run(scheduler, requests)
    assert outputs == {r.request_id: expected_output(r) for r in requests}


def test_preempts_the_newest_running_request_when_blocks_run_out():
    scheduler = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make_request("old", 8, 6), make_request("new", 8, 6)
    for r in (old, new):
        scheduler.add_request(r)
    out = scheduler.schedule()
    sampled = [fake_next_token(r.token_ids) for r in out.requests]
    scheduler.commit_step(out)
    scheduler.update_from_output(out, sampled)
    assert [len(r.block_table) for r in (old, new)] == [2, 2]
    out = scheduler.schedule()  # old grows to 9 tokens: needs a third block, none free
    assert scheduler.num_preemptions == 1
    assert out.requests == [old]
    assert new.block_table == [] and new.num_computed_tokens == 0
    assert scheduler.waiting.first() is new


def test_preempted_requests_finish_with_the_same_tokens():
    requests = [make_request(str(i), random.Random(i).randrange(1, 40), 12) for i in range(12)]
    scheduler = Scheduler(BlockManager(16, 4), max_num_seqs=6, max_num_batched_tokens=32)
    outputs = run(scheduler, requests)
    assert scheduler.num_preemptions > 0
    assert outputs == {r.request_id: expected_output(r) for r in requests}
    assert scheduler.block_manager.num_free_blocks == 16


def test_abort_frees_blocks_wherever_the_request_is():
    scheduler = Scheduler(BlockManager(8, 4), max_num_seqs=1, max_num_batched_tokens=100)
    running, waiting = make_request("r", 6, 4), make_request("w", 6, 4)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    scheduler.schedule()
    scheduler.finish_requests([running, waiting], "abort")
    assert running.finish_reason == waiting.finish_reason == "abort" and not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == 8


def test_finishing_many_requests_leaves_the_others_in_order():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=100)
    requests = [make_request(str(i), 5, 4) for i in range(12)]
    for request in requests:
        scheduler.add_request(request)
    scheduler.schedule()  # four run, eight wait
    gone = requests[1:3] + requests[5:12:2]
    scheduler.finish_requests(gone, "abort")
    assert [r.request_id for r in scheduler.running] == ["0", "3"]
    assert [r.request_id for r in scheduler.waiting] == ["4", "6", "8", "10"]
    assert all(r.finish_reason == "abort" and not r.block_table for r in gone)
    assert scheduler.block_manager.num_free_blocks == 64 - 4  # the two running hold two blocks each


def test_scheduling_ahead_of_the_results_gives_the_same_tokens():
    """Pending tokens, requests that a stop token ends one step late, the last token by length
    not scheduled again, and preemption of a request whose token is pending."""
    def requests():
        return [make_request(str(i), random.Random(i).randrange(1, 40), 12, range(0, 1000, 23 + i))
                for i in range(12)]

    expected = {r.request_id: expected_output(r) for r in requests()}
    assert any(len(tokens) < 12 for tokens in expected.values()), "no request ends on a stop token"
    scheduler = Scheduler(BlockManager(16, 4), max_num_seqs=6, max_num_batched_tokens=32)
    assert run_scheduling_ahead(scheduler, requests()) == expected
    assert scheduler.num_preemptions > 0
    assert scheduler.block_manager.num_free_blocks == 16


def test_requests_leave_the_waiting_queue_without_a_pass_over_it():
    """A batch job queues all its prompts at once (10^5 and more), and a server's clients abort
    theirs one by one: a request that finishes, or is aborted or stopped wherever it is, must not
    cost a pass over the queue (that was O(waiting) each: ~2 ms at 10^5 waiting, quadratic over a
    job). Order is kept, the preempted back in front."""
    class CountingQueue(WaitingQueue):
        passes = 0

        def __iter__(self):
            CountingQueue.passes += 1
            return super().__iter__()

    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=100)
    scheduler.waiting = CountingQueue()
    requests = [make_request(str(i), 3, 2) for i in range(500)]
    finished = []
    for r in requests:
        scheduler.add_request(r)
    while len(finished) < 40:
        out = scheduler.schedule()
        sampled = [fake_next_token(r.token_ids) for r in out.requests]
        scheduler.commit_step(out)
        finished += scheduler.update_from_output(out, sampled)
    aborted = requests[100:400:3]
    scheduler.finish_requests(aborted + scheduler.running[:1], "abort")
    scheduler.finish_request(requests[450], "stop")
    assert CountingQueue.passes == 0
    assert [r.output_token_ids for r in finished] == [expected_output(r) for r in requests[:len(finished)]]
    left = [r for r in requests[len(finished):] if r not in aborted and r is not requests[450]
            and r not in scheduler.running and not r.is_finished]
    assert list(scheduler.waiting) == left
    held = [scheduler.waiting.popleft(), scheduler.waiting.popleft()]
    scheduler.waiting.extendleft(reversed(held))  # as schedule() puts back the samples it held
    assert list(scheduler.waiting)[:2] == held
