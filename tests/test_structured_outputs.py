"""Structured outputs (xgrammar) on the demo model, sampled at temperature 1 so that the model would
not keep to the format by itself: every output matches its schema, regex, choice or grammar."""

import json
import os
import re

import jsonschema
import pytest

from pagedllm import LLM, GuidedDecodingParams, RequestFailedError, SamplingParams, StructuredOutputsParams

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "pagedllm-demo")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "city": {"type": "string", "maxLength": 10}},
                    "required": ["zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
NESTED_101 = {"type": "string"}
for _ in range(50):  # each level of object is two levels of JSON: the schema, and its properties
    NESTED_101 = {"type": "object", "properties": {"a": NESTED_101}}
GRAMMAR = 'root ::= greeting " " name "!"\ngreeting ::= "hello" | "hi"\nname ::= [a-z] [a-z]? [a-z]? [a-z]?'


@pytest.fixture(scope="module")
def llm():
    return LLM(DEMO, device="cpu")


def sampled(spec, count: int, max_tokens: int = 200) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens, structured_outputs=spec)
            for i in range(count)]


def test_json_schema_outputs_parse_and_validate(llm):
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    outputs = llm.generate(["A user record:"] * 50, sampled(spec, 50), use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)
    free = llm.generate(["A user record:"] * 5, [SamplingParams(temperature=1.0, seed=i, max_tokens=60)
                                                  for i in range(5)], use_tqdm=False)
    assert not any(o.outputs[0].text.startswith("{") for o in free)  # the model would not do it alone


def test_masks_span_the_tokenizer_and_the_sampler_bans_the_models_padding_ids():
    import torch
    from transformers import AutoTokenizer

    from pagedllm.engine.structured_output import GrammarCompiler, SampleGrammar, fill_masks
    from pagedllm.layers.sampler import apply_grammar

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    compiler = GrammarCompiler(tokenizer, len(tokenizer) + 100, {tokenizer.eos_token_id})
    assert compiler.vocab_size == len(tokenizer)  # the padding ids are not xgrammar's special tokens
    grammar = SampleGrammar.new(compiler.compile(StructuredOutputsParams(regex="[ab]+")))
    masks = fill_masks([None, grammar, None], pin=False)
    assert masks.rows == [1] and masks.bitmask.shape == (1, (len(tokenizer) + 31) // 32)
    logits = torch.zeros(3, len(tokenizer) + 100)
    logits[:, len(tokenizer):] = 100.0  # the padding ids the model would pick
    apply_grammar(logits, masks)
    allowed = logits[1].isfinite().nonzero().flatten().tolist()
    assert allowed and max(allowed) < len(tokenizer)
    assert all(set(tokenizer.decode([t])) <= {"a", "b"} for t in allowed)
    assert logits[[0, 2]].isfinite().all() and (logits[[0, 2], len(tokenizer):] == 100).all()  # free rows untouched


def test_json_object_regex_choice_and_grammar_outputs_match(llm):
    spec = StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    outputs = [o.outputs[0] for o in llm.generate(["x"] * 10, sampled(spec, 10, 300), use_tqdm=False)]
    assert all(o.text.startswith("{") for o in outputs)  # an object may run past max_tokens: its values are free
    assert all(isinstance(json.loads(o.text), dict) for o in outputs if o.finish_reason == "stop")
    assert any(o.finish_reason == "stop" for o in outputs)
    date = r"\d{4}-\d{2}-\d{2}"
    for o in llm.generate(["Date:"] * 20, sampled(StructuredOutputsParams(regex=date), 20), use_tqdm=False):
        assert re.fullmatch(date, o.outputs[0].text) and o.outputs[0].finish_reason == "stop"
    choices = ["yes", "no", "maybe so"]
    texts = [o.outputs[0].text for o in llm.generate(["?"] * 20, sampled({"choice": choices}, 20), use_tqdm=False)]
    assert set(texts) <= set(choices) and len(set(texts)) > 1
    for o in llm.generate(["Say hi:"] * 20, sampled(StructuredOutputsParams(grammar=GRAMMAR), 20), use_tqdm=False):
        assert re.fullmatch(r"(hello|hi) [a-z]{1,4}!", o.outputs[0].text), o.outputs[0].text


def test_a_mixed_batch_under_preemption_equals_each_request_alone(llm):
    """Constrained and free requests, n=3, a cache small enough to preempt: each output is the one
    the request gives alone (per-request seeds), its samples each with a matcher of its own."""
    prompts = ["A user record:", "Date:", "def f(x):", "?"]
    params = [
        SamplingParams(temperature=1.0, seed=1, n=3, max_tokens=80,
                       structured_outputs=StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
        SamplingParams(temperature=1.0, seed=2, max_tokens=20, structured_outputs={"regex": r"\d{4}-\d{2}-\d{2}"}),
        SamplingParams(temperature=1.0, seed=3, max_tokens=40),
        SamplingParams(temperature=1.0, seed=4, n=2, structured_outputs={"choice": ["yes", "no", "maybe so"]}),
    ]
    tight = LLM(DEMO, device="cpu", num_kv_blocks=14, max_num_batched_tokens=32)
    together = tight.generate(prompts, params, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    alone = [llm.generate([p], q, use_tqdm=False)[0] for p, q in zip(prompts, params, strict=True)]
    for mixed, single in zip(together, alone, strict=True):
        assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in single.outputs]
    for completion in together[0].outputs:
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), SCHEMA)


@pytest.mark.parametrize("spec, field", [
    ({"json": '{"type": "objec"}'}, "structured_outputs.json"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"regex": "[a-"}, "structured_outputs.regex"),
    ({"grammar": "root ::= "}, "structured_outputs.grammar"),
    ({"json": SCHEMA, "regex": "a"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", 5]}, "structured_outputs.choice"),
    ({"regex": "a", "backend": "outlines"}, "structured_outputs.backend"),
    ({"schema": "a"}, "no field 'schema'"),
    ({"json": '{"a":' * 5000 + "1" + "}" * 5000}, "not JSON"),
    ({"json": NESTED_101}, "nests deeper than 100 levels"),
])
def test_a_spec_that_cannot_run_is_a_value_error_naming_its_field(llm, spec, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate(["x", "y"], [SamplingParams(max_tokens=4), SamplingParams(structured_outputs=spec)],
                     use_tqdm=False)
    assert llm.generate(["x"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids  # still fine


def test_a_huge_repetition_penalty_leaves_the_grammar_a_token(tiny_checkpoint):
    """A penalty past float32's range made a seen token with a negative logit -inf, and where the
    grammar allowed only such tokens the request failed ("no token could follow"). Found by
    schemathesis against the server; the same request here."""
    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    regex = "\x05\u00a8\U000e0fcf\u00aaV\U000dd814\u00c2\x05\x13\u00a2"
    for temperature in (1.0, 1e-30):  # and a temperature that would take the penalized logits past float32's range
        params = SamplingParams(temperature=temperature, seed=0, max_tokens=16, repetition_penalty=3.4e307,
                                structured_outputs={"regex": regex})
        outs = llm.generate(["ieee", "block_size"], params, use_tqdm=False)
        assert all(out.error is None and regex.startswith(out.outputs[0].text) for out in outs)


def test_older_vllm_guided_decoding_is_accepted(llm):
    params = SamplingParams(temperature=1.0, seed=0, guided_decoding=GuidedDecodingParams(choice=["alpha", "beta"]))
    assert params.structured_outputs.choice == ["alpha", "beta"] and params.guided_decoding is None
    assert llm.generate(["?"], params, use_tqdm=False)[0].outputs[0].text in ("alpha", "beta")
    with pytest.raises(ValueError, match="guided_decoding"):
        SamplingParams(structured_outputs={"regex": "a"}, guided_decoding={"regex": "b"})


def test_async_scheduling_keeps_the_overlap_and_the_outputs_of_synchronous_steps(llm):
    """With a step in flight, a constrained step launches its forward pass, then the step in flight
    is read back (its tokens accepted by the matchers), then the masks are filled and it samples."""
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    sync = LLM(DEMO, device="cpu", async_scheduling=False)
    prompts = ["A user record:"] * 4 + ["def f(x):"] * 2
    params = sampled(spec, 4) + [SamplingParams(temperature=1.0, seed=9, max_tokens=30)] * 2
    executor, overlapped = llm.llm_engine.executor, []
    launch = executor.launch
    executor.launch = lambda out, before_sampling=None: (overlapped.append(before_sampling is not None),
                                                          launch(out, before_sampling))[1]
    try:
        fast = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        executor.launch = launch
    assert sum(overlapped) > 0.8 * len(overlapped)
    assert [o.outputs[0].token_ids for o in sync.generate(prompts, params, use_tqdm=False)] == fast


def test_min_tokens_gives_way_to_a_grammar_that_can_only_end(llm):
    """A choice of one short word is done after it, and only a stop token may follow: min_tokens
    banning the stop tokens left no token at all, and the request failed ("no token could follow").
    As vLLM now does, the stop tokens stay allowed there and the request ends; where the grammar
    can go on, min_tokens holds."""
    params = SamplingParams(max_tokens=16, min_tokens=8, structured_outputs={"choice": ["yes"]})
    done = llm.generate(["Answer:"], params, use_tqdm=False)[0]
    assert done.error is None and done.outputs[0].text == "yes" and done.outputs[0].finish_reason == "stop"
    for seed in range(3):
        word = llm.generate(["Answer:"], SamplingParams(temperature=1.0, seed=seed, max_tokens=30, min_tokens=5,
                                                        structured_outputs={"regex": "[a-z]{1,20}"}), use_tqdm=False)[0]
        assert re.fullmatch("[a-z]{1,20}", word.outputs[0].text)
        assert len(word.outputs[0].token_ids) >= 5 or len(word.outputs[0].text) == 20


def test_bad_words_that_ban_all_the_grammar_allows_fail_that_request_naming_them(llm):
    """The grammar allows one token and bad_words bans it (schemathesis sent this to the server,
    which answered 500): that request fails alone, its error naming bad_words and marked as the
    request's own fault (the server answers it 400); its neighbour completes."""
    from pagedllm.errors import ClientFault

    bad = SamplingParams(max_tokens=8, bad_words=["\x11"], structured_outputs={"choice": ["\x11"]})
    engine, prompt = llm.llm_engine, llm.get_tokenizer().encode("Answer:")
    engine.add_request("bad", prompt, bad)
    engine.add_request("good", prompt, SamplingParams(max_tokens=8, structured_outputs={"choice": ["no"]}))
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert isinstance(finals["bad"].error, ClientFault) and "bad_words" in finals["bad"].error
    assert finals["bad"].outputs[0].finish_reason == "error"
    assert finals["good"].error is None and finals["good"].outputs[0].text == "no"
    with pytest.raises(RequestFailedError, match="prompt 1 failed: .*bad_words") as caught:  # and through LLM
        llm.generate(["Answer:", "Answer:"], [SamplingParams(max_tokens=4), bad], use_tqdm=False)
    assert caught.value.status == 400 and caught.value.prompt_index == 1


def test_a_grammar_compiling_holds_up_only_its_own_request(monkeypatch):
    """The engine compiles in a worker thread and queues the request once its grammar is ready: while
    one grammar compiles (held here until released; a regex of 50,000 alternatives took the server 12
    s, and every request waited for it), the free requests run to the end, and one that does not
    compile fails alone, as its own fault; aborting a request that is compiling drops it."""
    import threading

    from pagedllm.engine.structured_output import GrammarCompiler
    from pagedllm.errors import ClientFault

    release, compile_ = threading.Event(), GrammarCompiler.compile

    def held(self, params):
        if params.kind == "regex":
            assert release.wait(60)
        return compile_(self, params)

    monkeypatch.setattr(GrammarCompiler, "compile", held)
    with LLM(DEMO, device="cpu") as llm:  # shut down here, not by a collection in a later test
        engine = llm.llm_engine
        prompt = engine.tokenizer.encode("def main():")
        engine.add_request("held", prompt, SamplingParams(max_tokens=4, structured_outputs={"regex": "[0-9]+"}))
        engine.add_request("dropped", prompt, SamplingParams(max_tokens=4, n=2, structured_outputs={"choice": ["a"]}))
        engine.add_request("broken", prompt, SamplingParams(max_tokens=4, structured_outputs={"grammar": "root ::= ("}))
        engine.add_request("free", prompt, SamplingParams(max_tokens=8, ignore_eos=True))
        assert engine.stats().num_waiting == 5
        engine.abort_request("dropped")
        finals = {}
        while "free" not in finals or "broken" not in finals:
            finals.update({o.request_id: o for o in engine.step() if o.finished})
        assert len(finals["free"].outputs[0].token_ids) == 8 and "held" not in finals
        broken = finals["broken"].error
        assert isinstance(broken, ClientFault) and "structured_outputs.grammar" in broken
        assert engine.has_unfinished_requests() and engine.stats().num_waiting == 1
        release.set()
        while engine.has_unfinished_requests():
            finals.update({o.request_id: o for o in engine.step() if o.finished})
        assert re.fullmatch("[0-9]+", finals["held"].outputs[0].text) and "dropped" not in finals


@pytest.fixture(scope="module")
def server():
    import openai
    from test_openai_server import start_server

    server, uv, url = start_server(DEMO, "--served-model-name", "demo")
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    uv.should_exit = True
    server.engine.shutdown()


def test_server_response_format_and_vllms_fields(server):
    person = {"type": "object", "properties": {"role": {"enum": ["admin", "user"]},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["role", "age"], "additionalProperties": False}
    chat = server.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "A person, as JSON"}], temperature=1.0, seed=0,
        max_tokens=300, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person}})
    assert chat.choices[0].finish_reason == "stop"  # (1 seed in 5 spends its tokens on whitespace)
    jsonschema.validate(json.loads(chat.choices[0].message.content), person)
    compact = server.completions.create(model="demo", prompt="x", temperature=1.0, seed=2, max_tokens=300,
                                        extra_body={"structured_outputs": {"json_object": True,
                                                                           "disable_any_whitespace": True}})
    assert compact.choices[0].text.startswith("{")
    choice = server.completions.create(model="demo", prompt="?", temperature=1.0, seed=3, max_tokens=10,
                                       extra_body={"guided_choice": ["red", "green"]})
    assert choice.choices[0].text in ("red", "green")
    regex = server.completions.create(model="demo", prompt="?", temperature=1.0, seed=4, max_tokens=10,
                                      extra_body={"guided_regex": "[0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", regex.choices[0].text)


def test_a_grammar_that_takes_seconds_to_compile_stalls_no_other_client(server):
    """The server checks a structured output (which compiles its grammar) off its event loop, and
    the engine compiles off its own loop: /health and a free completion answer while a regex of
    20,000 alternatives compiles (seconds: it held both for the whole compile, twice)."""
    import gc
    import threading
    import time
    import urllib.request

    gc.collect()  # the engines earlier tests dropped shut down now (their collection holds the GIL), not below
    base = str(server.base_url).rstrip("/").removesuffix("/v1")
    slow = {}

    def constrained():
        slow["text"] = server.completions.create(
            model="demo", prompt="a", max_tokens=16,
            extra_body={"structured_outputs": {"regex": "|".join(f"x{i:05}" for i in range(20_000))}}).choices[0].text

    thread = threading.Thread(target=constrained)
    thread.start()
    time.sleep(0.3)  # the body is in, the compile has begun
    slowest, free_while_compiling = 0.0, False
    while thread.is_alive():
        start = time.monotonic()
        urllib.request.urlopen(f"{base}/health", timeout=60).read()
        slowest = max(slowest, time.monotonic() - start)
        if not free_while_compiling:
            assert server.completions.create(model="demo", prompt="a", max_tokens=2).choices[0].text
            free_while_compiling = thread.is_alive()
        time.sleep(0.05)
    assert re.fullmatch(r"x\d{5}", slow["text"]) and free_while_compiling and slowest < 1.0


@pytest.mark.parametrize("extra, named, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "structured_outputs.json", "response_format"),
    ({"response_format": {"type": "json_schema"}}, "json_schema", "response_format"),
    ({"guided_regex": "[a-"}, "structured_outputs.regex", "guided_regex"),
    ({"guided_grammar": "root ::= "}, "structured_outputs.grammar", "guided_grammar"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "give one of", None),
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format"),
    ({"structured_outputs": {"json": "{"}}, "not JSON", "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "structured_outputs"),
])
def test_server_answers_a_broken_constraint_with_400_naming_it(server, extra, named, param):
    """Named in the message, and as the error's param the field the request gave it in, on
    completions and chat (a chat's message is not about a numbered prompt)."""
    import openai

    for ask in (lambda: server.completions.create(model="demo", prompt="x", max_tokens=4, extra_body=extra),
                lambda: server.chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                                       max_tokens=4, extra_body=extra)):
        with pytest.raises(openai.BadRequestError) as caught:
            ask()
        assert named in json.dumps(caught.value.body) and caught.value.param == param
        assert "prompt 0" not in caught.value.message or "chat" not in str(caught.value.request.url)
    assert server.completions.create(model="demo", prompt="x", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize("stream", [False, True])
def test_server_answers_constraints_that_leave_no_token_with_400(server, stream):
    """bad_words banning every token the grammar allows is found only while the request runs: the
    request's own fault, answered 400 naming bad_words (it was a 500), as an SSE error when streamed;
    the server goes on serving."""
    import openai

    extra = {"guided_choice": ["\x11"], "bad_words": ["\x11"]}
    with pytest.raises(openai.APIError) as caught:
        answer = server.completions.create(model="demo", prompt="x", max_tokens=4, stream=stream, extra_body=extra)
        list(answer) if stream else None
    assert "bad_words" in str(caught.value) and (stream or caught.value.status_code == 400)
    if stream:
        assert caught.value.body["code"] == 400
    assert server.completions.create(model="demo", prompt="x", max_tokens=2).choices[0].text is not None


def test_generate_command_takes_a_json_schema_and_each_lines_constraint(tmp_path):
    from pagedllm.entrypoints.cli import main

    schema_file, inp, out = tmp_path / "schema.json", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    schema_file.write_text(json.dumps({"enum": ["up", "down", "left"]}))
    lines = [{"id": i, "prompt": "Which way?"} for i in range(4)] + [
        {"id": "openai", "prompt": "A user record:", "response_format": {"type": "json_object"}},
        {"id": "vllm", "prompt": "A user record:", "structured_outputs": {"json": SCHEMA,
                                                                          "disable_any_whitespace": True}},
        {"id": "broken", "prompt": "?", "response_format": {"type": "json_schema", "json_schema": {"schema": {
            "type": "objec"}}}},
        {"id": "both", "prompt": "?", "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
    ]
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["generate", "--model", DEMO, "--input", str(inp), "--output", str(out), "--device", "cpu",
                 "--max-tokens", "200", "--json-schema", str(schema_file), "--skip-bad-lines"]) == 0
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(results) == {0, 1, 2, 3, "openai", "vllm"}  # the broken lines were skipped, named
    assert all(json.loads(results[i]["text"]) in ("up", "down", "left") for i in range(4))
    assert results["openai"]["text"].startswith("{")
    jsonschema.validate(json.loads(results["vllm"]["text"]), SCHEMA)


def test_data_parallel_replicas_keep_to_the_constraint(llm):
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    with LLM(DEMO, device="cpu", data_parallel_size=2, max_num_seqs=4) as two:
        outputs = two.generate(["A user record:"] * 8, sampled(spec, 8), use_tqdm=False)
        with pytest.raises(ValueError, match="structured_outputs.regex"):
            two.generate(["x"], SamplingParams(structured_outputs={"regex": "[a-"}), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [
        o.outputs[0].token_ids for o in llm.generate(["A user record:"] * 8, sampled(spec, 8), use_tqdm=False)]


def test_a_neighbour_failing_in_sampling_after_the_read_back_loses_nothing(llm):
    """The step in flight was read back inside the failed launch: its outputs still come out, the
    failed request alone ends, and the constrained request goes on to the output it gives alone."""
    spec = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    constrained = SamplingParams(temperature=1.0, seed=11, max_tokens=200, structured_outputs=spec)

    def explode(output_ids, logits):
        raise RuntimeError("boom")

    engine = llm.llm_engine
    tokenizer = llm.get_tokenizer()
    engine.add_request("json", tokenizer.encode("A user record:"), constrained)
    finished, overlapped = {}, []
    launch = engine.executor.launch
    engine.executor.launch = lambda out, before_sampling=None: (overlapped.append(before_sampling is not None),
                                                                launch(out, before_sampling))[1]
    try:
        for _ in range(4):
            finished |= {o.request_id: o for o in engine.step() if o.finished}
        # joins a step while the constrained one's step is in flight, and fails in that step's sampling
        engine.add_request("bad", tokenizer.encode("def f(x):"), SamplingParams(max_tokens=20,
                                                                                logits_processors=[explode]))
        while engine.has_unfinished_requests():
            finished |= {o.request_id: o for o in engine.step() if o.finished}
    finally:
        engine.executor.launch = launch
    assert overlapped[4]  # the failing step had read the step in flight back first
    assert finished["bad"].outputs[0].finish_reason == "error" and "boom" in finished["bad"].error
    alone = llm.generate(["A user record:"], constrained, use_tqdm=False)[0].outputs[0]
    assert finished["json"].outputs[0].token_ids == alone.token_ids
    jsonschema.validate(json.loads(alone.text), SCHEMA)
