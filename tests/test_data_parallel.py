"""Data parallelism on the CPU: replicas of the demo model share the requests as they free up,
and the outputs are those of one replica (greedy, and sampled with per-request seeds), in order."""

import json
import os
import signal
import time

import pytest

from pagedllm import LLM, RequestFailedError, SamplingParams
from pagedllm.entrypoints.cli import main as cli_main

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "pagedllm-demo")
PROMPTS = [f"def f{i}(x):" for i in range(24)]
GREEDY = [SamplingParams(temperature=0, max_tokens=6 + i % 9) for i in range(24)]
SEEDED = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=10) for i in range(24)]


@pytest.fixture(scope="module")
def one():
    return LLM(DEMO, device="cpu")


@pytest.fixture(scope="module")
def two():
    llm = LLM(DEMO, device="cpu", data_parallel_size=2, max_num_seqs=4)
    yield llm
    llm.shutdown()


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_replicas_give_one_replicas_outputs_in_order(one, two):
    for params in (GREEDY, SEEDED):
        assert token_ids(two.generate(PROMPTS, params, use_tqdm=False)) == token_ids(
            one.generate(PROMPTS, params, use_tqdm=False))
    streamed = {}
    for output in two.generate_stream(PROMPTS[:6], GREEDY[:6]):
        streamed[output.request_id] = output
    assert sorted(len(o.outputs[0].token_ids) for o in streamed.values()) == sorted(p.max_tokens for p in GREEDY[:6])


def test_both_replicas_take_requests_as_they_free_up(two):
    before = [r.generated for r in two.llm_engine.replicas]
    two.generate(PROMPTS, GREEDY, use_tqdm=False)
    grew = [r.generated - b for r, b in zip(two.llm_engine.replicas, before, strict=True)]
    assert all(g > 0 for g in grew)  # neither replica idles while the other works through a fixed half
    metrics = {m.name: m.value for m in two.get_metrics()}
    assert metrics["pagedllm:generation_tokens"] >= sum(grew)
    assert two.reset_prefix_cache() is True


def test_fewer_requests_than_a_replica_holds_are_still_shared(two):
    """6 requests, room for 8 in each replica: three each, not all six on the first (seen on 2 H100s,
    where 256 requests all went to one replica and two GPUs ran as fast as one)."""
    before = [r.generated for r in two.llm_engine.replicas]
    two.generate(PROMPTS[:6], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [r.generated - b for r, b in zip(two.llm_engine.replicas, before, strict=True)] == [15, 15]


@pytest.mark.parametrize("engine", ["one", "two"])
def test_many_requests_aborted_at_once_leave_the_others_as_they_were(engine, request, one):
    """One call aborts 16 of 24 requests (a client that left, Ctrl-C): running on either replica,
    waiting in one, or not yet given to one; the other 8 finish as they would have alone, and
    nothing is left behind. (One pass over the queues for all: one a request, a client leaving
    with 100,000 prompts held the server for minutes.)"""
    engine = request.getfixturevalue(engine).llm_engine
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    for i, (prompt, params) in enumerate(zip(prompts, GREEDY, strict=True)):
        engine.add_request(f"a{i}", prompt, params)
    finals = {}
    for _ in range(2):  # (a replica runs on meanwhile: what finished here counts too)
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    kept = list(range(0, 24, 3))
    engine.abort_request(f"a{i}" for i in range(24) if i not in kept)
    finals = {request_id: o for request_id, o in finals.items() if int(request_id[1:]) in kept}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(finals) == sorted(f"a{i}" for i in kept)
    alone = one.generate([{"prompt_token_ids": prompts[i]} for i in kept], [GREEDY[i] for i in kept], use_tqdm=False)
    assert [finals[f"a{i}"].outputs[0].token_ids for i in kept] == token_ids(alone)
    for replica in getattr(engine, "replicas", []):
        assert replica.load == 0


def test_stats_after_an_abort_of_everything_show_nothing_running(two):
    """No step follows (Ctrl-C in LLM.generate aborts what is out): the replicas' stats after the
    abort are read all the same."""
    engine = two.llm_engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"s{i}", engine.tokenizer.encode(prompt), SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    engine.abort_request(f"s{i}" for i in range(len(PROMPTS)))
    deadline = time.monotonic() + 30
    while (stats := engine.stats()).num_running + stats.num_waiting and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats.num_running == stats.num_waiting == stats.kv_blocks_in_use == 0


def test_a_replica_that_dies_fails_its_requests_clearly(tmp_path):
    llm = LLM(DEMO, device="cpu", data_parallel_size=2, max_num_seqs=2)
    try:
        victim = llm.llm_engine.replicas[0].process
        stream = llm.generate_stream(PROMPTS[:8], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        next(stream)
        os.kill(victim.pid, signal.SIGKILL)
        start = time.perf_counter()
        with pytest.raises(RequestFailedError, match=r"data-parallel replica 0 died with exit code -9"):
            for _ in stream:
                pass
        assert time.perf_counter() - start < 30
        # the other replica goes on serving
        assert len(llm.generate(PROMPTS[:3], SamplingParams(max_tokens=4), use_tqdm=False)) == 3
    finally:
        llm.shutdown()


def test_generate_command_takes_data_parallel_size_and_resumes(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:10])))

    def run(out, *extra):
        assert cli_main(["generate", "--model", DEMO, "--input", str(inp), "--output", str(out), "--device", "cpu",
                         "--temperature", "0", "--max-tokens", "8", *extra]) == 0
        return {json.loads(line)["id"]: json.loads(line)["text"] for line in out.read_text().splitlines()}

    single = run(tmp_path / "one.jsonl")
    out = tmp_path / "two.jsonl"
    lines = run(out, "--data-parallel-size", "2")
    assert lines == single
    kept = out.read_text().splitlines()[:4]
    out.write_text("\n".join(kept) + "\n")  # as if stopped after four results
    assert run(out, "--data-parallel-size", "2") == single
    assert len(out.read_text().splitlines()) == 10


def test_too_many_gpus_is_refused():
    with pytest.raises(ValueError, match="data_parallel_size=0 is invalid"):
        LLM(DEMO, device="cpu", data_parallel_size=0)


def test_a_request_id_already_waiting_or_placed_is_refused(two):
    """Two requests under one id would share the driver's bookkeeping (one replaced the other's)."""
    engine = two.llm_engine
    params = SamplingParams(temperature=0, max_tokens=4)
    engine.add_request("dup", [5, 6, 7], params)
    with pytest.raises(ValueError, match="request id 'dup' is already running"):
        engine.add_request("dup", [8, 9], params)
    finished = []
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        finished += [o for o in engine.step() if o.finished]
    assert [(o.request_id, o.prompt_token_ids) for o in finished] == [("dup", [5, 6, 7])]
