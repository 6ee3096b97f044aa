"""AsyncLLM with its engine core in a process of its own: what its iterators give is what the
offline LLM gives, for every output kind (the engine process sends only what is new; cumulative
outputs are summed up again here), with logprobs, prompt logprobs, n > 1, stop strings and two
replicas; what cannot travel to the engine process is refused by name."""

import asyncio
import dataclasses
import os
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.data_parallel import start_method
from pagedllm.sampling_params import RequestOutputKind

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "pagedllm-demo")
PROMPTS = ["def main():", "import os\n", "class A:", "x = [i for i in", "The city"]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, logprobs=2),
    SamplingParams(temperature=0, max_tokens=9, prompt_logprobs=1, stop=["\n\n"]),
    SamplingParams(temperature=0.9, n=2, seed=7, max_tokens=10),
    SamplingParams(temperature=0, max_tokens=16, stop=[")"], include_stop_str_in_output=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=14, logprobs=0),
]


@pytest.fixture(scope="module")
def expected():
    return LLM(DEMO, device="cpu").generate(PROMPTS, PARAMS, use_tqdm=False)


def summary(output):
    """What a caller reads of a final output: the completions' text, tokens, logprobs, reason."""
    completions = [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
                    None if c.logprobs is None else [{t: round(lp.logprob, 4) for t, lp in e.items()}
                                                     for e in c.logprobs]) for c in output.outputs]
    prompt_logprobs = None if output.prompt_logprobs is None else [
        None if e is None else {t: round(lp.logprob, 4) for t, lp in e.items()} for e in output.prompt_logprobs]
    return output.prompt_token_ids, completions, prompt_logprobs


async def collect(engine: AsyncLLM, kind: RequestOutputKind) -> list[list]:
    """Every output of each request, the requests run at once."""
    async def one(i: int) -> list:
        params = dataclasses.replace(PARAMS[i], output_kind=kind)
        return [o async for o in engine.generate(PROMPTS[i], params, request_id=f"r{kind.name}{i}")]

    return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))


def from_deltas(outputs: list) -> tuple:
    """A request's final output put together from its delta outputs."""
    from pagedllm.engine.outputs import add_delta

    total = None
    for output in outputs:
        total = add_delta(total, output)
    return summary(total)


def stream(engine: AsyncLLM, prompt: str, params: SamplingParams, request_id: str, away: float = 0.0) -> list:
    """Every output of one request, its reader away for ``away`` s after the first (the engine goes
    on meanwhile); the engine shut down after."""
    async def read():
        outputs = engine.generate(prompt, params, request_id=request_id)
        got = [await anext(outputs)]
        await asyncio.sleep(away)
        return got + [o async for o in outputs]

    try:
        return asyncio.run(read())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("replicas", [1, 2])
def test_every_output_kind_gives_the_offline_outputs(expected, replicas):
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu", data_parallel_size=replicas, max_num_seqs=4))
    try:
        assert [r.process.pid != os.getpid() for r in engine.engine.replicas] == [True] * replicas
        want = [summary(o) for o in expected]
        cumulative = asyncio.run(collect(engine, RequestOutputKind.CUMULATIVE))
        assert [summary(outputs[-1]) for outputs in cumulative] == want
        for outputs in cumulative:  # each output holds everything so far: text only grows
            texts = [o.outputs[0].text for o in outputs]
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
        assert [from_deltas(outputs) for outputs in asyncio.run(collect(engine, RequestOutputKind.DELTA))] == want
        finals = asyncio.run(collect(engine, RequestOutputKind.FINAL_ONLY))
        assert [len(outputs) for outputs in finals] == [1] * len(PROMPTS)
        assert [summary(outputs[0]) for outputs in finals] == want
        assert engine.num_unfinished_requests == 0
    finally:
        engine.shutdown()


def _keep_all(token_ids, logits):
    return logits


def test_what_cannot_reach_the_engine_process_is_refused_by_name():
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu"))
    try:
        with pytest.raises(ValueError, match="SamplingParams.logits_processors=.* must be picklable"):
            engine.validate([1, 2, 3], SamplingParams(max_tokens=2, logits_processors=[lambda ids, logits: logits]))
        engine.validate([1, 2, 3], SamplingParams(max_tokens=2, logits_processors=[_keep_all]))  # a module's function

        async def run():
            return [o async for o in engine.generate("def f():", SamplingParams(max_tokens=3, temperature=0,
                                                                                logits_processors=[_keep_all]),
                                                     request_id="ok")]
        assert asyncio.run(run())[-1].finished
    finally:
        engine.shutdown()


def test_a_busy_reader_gets_the_engine_processs_outputs_merged_and_nothing_lost():
    """The engine process steps on while its reader (the HTTP process under load) does not read:
    what waits meanwhile comes merged per request (more tokens an output), adding up to the
    offline outputs; a reader that held the engine to its pace would get one output per token."""
    from pagedllm.engine.data_parallel import DataParallelEngine
    from pagedllm.engine.outputs import add_delta

    params = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True, logprobs=20,
                            output_kind=RequestOutputKind.DELTA)  # ~3 KB a step's message: the pipe fills soon
    want = LLM(DEMO, device="cpu").generate(PROMPTS[:4], params, use_tqdm=False)
    engine = DataParallelEngine(EngineConfig(model=DEMO, device="cpu"))
    outputs = {i: [] for i in range(4)}
    try:
        for i, prompt in enumerate(PROMPTS[:4]):
            engine.add_request(str(i), engine.tokenizer.encode(prompt), params, prompt=prompt, stream=True)
        engine.step()  # sends them to the engine process
        time.sleep(3)  # the reader is busy (the pipe is full after ~20 steps)
        while engine.has_unfinished_requests():
            for output in engine.step():
                outputs[int(output.request_id)].append(output)
    finally:
        engine.shutdown()
    for i, deltas in outputs.items():
        total = None
        for output in deltas:
            total = add_delta(total, output)
        got, expected = total.outputs[0], want[i].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason) == (expected.text, expected.token_ids,
                                                                expected.finish_reason)
        # 3,200 logprobs a request, from a single-threaded process against this one's threads: values equal up to
        # float noise (rounding them, as summary does, would flip a few at a rounding boundary)
        assert [e.keys() for e in got.logprobs] == [e.keys() for e in expected.logprobs]
        assert [lp.logprob for e in got.logprobs for lp in e.values()] == pytest.approx(
            [lp.logprob for e in expected.logprobs for lp in e.values()], abs=1e-4)
        assert len(deltas) < 160 and max(len(o.outputs[0].token_ids) for o in deltas) > 1


@pytest.mark.skipif(start_method() != "fork", reason="the patch reaches the engine process by fork")
def test_an_output_the_engine_process_cannot_send_fails_its_requests_not_hangs(monkeypatch):
    from pagedllm.engine import engine_process
    from pagedllm.engine.data_parallel import DataParallelEngine

    class UnpicklableReport(tuple):
        def __reduce_ex__(self, protocol):
            raise TypeError(f"cannot pickle the report of {self[0]}")

    class Reports(engine_process.ProgressReport):
        def output(self, request):
            return UnpicklableReport(super().output(request))

    monkeypatch.setattr(engine_process, "ProgressReport", Reports)  # before the fork: the engine process has it
    engine = DataParallelEngine(EngineConfig(model=DEMO, device="cpu"))
    try:
        engine.add_request("r", engine.tokenizer.encode("def f():"), SamplingParams(max_tokens=4), stream=True)
        outputs, deadline = [], time.monotonic() + 60
        while not outputs and time.monotonic() < deadline:
            outputs = engine.step()  # returns when a message comes, or the engine process dies
    finally:
        monkeypatch.undo()
        engine.shutdown()
    assert outputs[0].finished and "cannot pickle the report of r" in outputs[0].error


def test_a_delta_reader_that_falls_behind_gets_the_waiting_deltas_added_up():
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1,
                            output_kind=RequestOutputKind.DELTA)
    want = LLM(DEMO, device="cpu").generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0]
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu"), engine_process=False)
    outputs = stream(engine, PROMPTS[0], params, "slow", away=3)
    assert len(outputs) < 40 and max(len(o.outputs[0].token_ids) for o in outputs) > 1
    assert "".join(o.outputs[0].text for o in outputs) == want.text
    assert [t for o in outputs for t in o.outputs[0].token_ids] == want.token_ids
    assert [e.keys() for o in outputs for e in o.outputs[0].logprobs] == [e.keys() for e in want.logprobs]


@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
def test_a_reader_behind_the_engine_process_builds_one_output_for_all_that_waited(kind):
    """The engine process's reports wait for the reader merged, and are built into an output when
    it reads (once for all their tokens), not one output a token in the engine thread."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1, output_kind=kind)
    want = LLM(DEMO, device="cpu").generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0]
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu"))
    copies, built = engine.engine.copies, []
    build = copies.output
    copies.output = lambda report: built.append(len(report[2][0][1])) or build(report)
    outputs = stream(engine, PROMPTS[0], params, "slow", away=3)
    assert len(built) == len(outputs) < 40 and max(built) > 1 and sum(built) == 40
    final = outputs[-1].outputs[0] if kind == RequestOutputKind.CUMULATIVE else from_deltas(outputs)[1][0]
    if kind == RequestOutputKind.CUMULATIVE:
        assert (final.text, final.token_ids, [e.keys() for e in final.logprobs]) == (
            want.text, want.token_ids, [e.keys() for e in want.logprobs])
    else:
        assert final[1:3] == (want.text, want.token_ids)


@pytest.mark.parametrize("engine_process", [False, True])
def test_stream_interval_reports_the_first_token_then_every_n(engine_process):
    """``stream_interval=4``: a stream's outputs hold its first token, then four at a time, then
    what is left at its end; together the offline text (the engine process's reports as well)."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    want = LLM(DEMO, device="cpu").generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0]
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu", stream_interval=4), engine_process=engine_process)
    outputs = stream(engine, PROMPTS[0], params, "every-4")
    counts = [len(o.outputs[0].token_ids) for o in outputs]  # [1, 4, 4, 1], or some merged for a reader behind
    assert counts[0] == 1 and sum(counts) == 10 and all(c % 4 == 0 for c in counts[1:-1]) and len(counts) <= 4
    assert "".join(o.outputs[0].text for o in outputs) == want.text


def test_a_delta_stream_builds_each_tokens_logprobs_once():
    """Each delta output takes its tokens and logprobs from where the last one ended: a stream's
    logprobs are built once each, not all of them again at every token (quadratic in its length)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2,
                            output_kind=RequestOutputKind.DELTA)
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu"), engine_process=False)
    builder, built = engine.engine.outputs, []
    build = builder._logprobs
    builder._logprobs = lambda entries, *rest: built.append(len(entries)) or build(entries, *rest)
    kept = []
    finish = engine.engine.scheduler.update_from_output

    def update(*args):  # what the request holds of its built logprobs, as each step ends
        kept.extend(len(r.reported_logprobs) for r in engine.engine.scheduler.running)
        return finish(*args)

    engine.engine.scheduler.update_from_output = update
    outputs = stream(engine, PROMPTS[1], params, "long")
    assert sum(len(o.outputs[0].logprobs) for o in outputs) == 40
    assert sum(built) == 40
    # and keeps none: they would live as long as the stream
    assert kept and not any(kept)


def test_a_cumulative_stream_builds_each_tokens_logprobs_once():
    """LLM.generate_stream's cumulative outputs share the logprobs built for the earlier ones."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    llm = LLM(DEMO, device="cpu")
    want = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    builder, built = llm._engine().outputs, []
    build = builder._logprobs
    builder._logprobs = lambda entries, *rest: built.append(len(entries)) or build(entries, *rest)
    outputs = list(llm.generate_stream(PROMPTS[1], params))
    assert len(outputs) == 40 and [len(o.outputs[0].logprobs) for o in outputs] == list(range(1, 41))
    assert sum(built) == 40
    assert outputs[-1].outputs[0].logprobs == want.logprobs


def test_on_dead_set_after_the_engine_died_is_called_at_once():
    """A server wires ``on_dead`` up once the engine is built; an engine process that dies in between
    must still stop it (a killed supervisor's API server kept serving a dead engine otherwise)."""
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu"))
    try:
        engine.engine.replicas[0].process.kill()
        deadline = time.monotonic() + 30
        while engine.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.error is not None
        called = []
        engine.on_dead = lambda: called.append(True)
        assert called == [True]
    finally:
        engine.shutdown()


def test_an_engine_process_gone_before_its_driver_started_stops_the_driver():
    """An API-server process still starting when its engine process ended (a supervisor killed
    the server right after it answered /health): its first look at the pipe finds it closed, and
    its engine loop must stop (it waited on nothing but its own commands, and the API server
    served on, holding the port, with no engine)."""
    from pagedllm.engine.data_parallel import start_replicas, stop_replicas

    config = EngineConfig(model=DEMO, device="cpu")
    replicas, drivers = start_replicas(config, other_drivers=1)
    stop_replicas(replicas)
    engine = AsyncLLM(config, engine_connections=drivers[0])
    try:
        deadline = time.monotonic() + 10
        while engine.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.error is not None and not engine._thread.is_alive()
    finally:
        engine.shutdown()


def test_a_request_id_used_again_right_after_its_abort_runs():
    """An id that a client takes again at once (its first stream left): its new request is not
    aborted with the old one (aborts reach the engine together, after the commands beside them:
    its stream waited forever), nor does it get the old one's outputs still on their way (a token
    more than it asked for): the engine knows each request by an id never used before."""
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu"), engine_process=False)
    prompt = {"prompt_token_ids": engine.tokenizer.encode(PROMPTS[0])}

    async def run():
        first = engine.generate(prompt, params, "x")
        await anext(first)
        await first.aclose()  # aborts "x"
        again = [o async for o in engine.generate(prompt, dataclasses.replace(params, max_tokens=5), "x")]
        return again[-1]

    try:
        final = asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        engine.shutdown()
    assert final.request_id == "x" and final.finished and len(final.outputs[0].token_ids) == 5


def test_a_request_id_already_running_is_refused_and_the_first_runs_on():
    """Two requests with one id at once: the second is refused, named, before any work (both started
    when the first was still tokenizing its prompt, the second took over its bookkeeping, and one of
    them ended in a bare KeyError), and the first ends whole; the id is free again after it."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu"), engine_process=False)

    async def run(prompt):
        return [o async for o in engine.generate(prompt, params, "same")]

    async def both():
        return await asyncio.gather(run(PROMPTS[0]), run(PROMPTS[1]), return_exceptions=True)

    try:
        first, second = asyncio.run(asyncio.wait_for(both(), 60))
        again = asyncio.run(asyncio.wait_for(run(PROMPTS[2]), 60))
    finally:
        engine.shutdown()
    assert first[-1].finished and len(first[-1].outputs[0].token_ids) == 6
    assert isinstance(second, ValueError) and "request id 'same' is already running" in str(second)
    assert again[-1].finished and again[-1].prompt == PROMPTS[2]


def test_a_shut_down_engine_refuses_requests_at_once():
    """generate after shutdown raises EngineDeadError (it waited forever for a thread that had
    ended); sampling_params that are not SamplingParams are named."""
    from pagedllm.errors import EngineDeadError

    engine = AsyncLLM(EngineConfig(model=DEMO, device="cpu"), engine_process=False)

    async def run(params):
        return [o async for o in engine.generate("x", params, "r")]

    with pytest.raises(ValueError, match="sampling_params must be SamplingParams, not NoneType"):
        asyncio.run(run(None))
    engine.shutdown()
    with pytest.raises(EngineDeadError, match="the engine was shut down"):
        asyncio.run(asyncio.wait_for(run(SamplingParams(max_tokens=2)), 30))
