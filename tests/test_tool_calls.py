"""Tool calls: each parser's split of an answer into text and calls (whole and in any chunks alike),
the requests' tools and tool_choice checked, a live server with --tool-call-parser hermes
answering "auto", "required" and a named function, whole and streamed, through the openai client,
and gpt-oss's calls read from its harmony tokens (--tool-call-parser openai)."""

import asyncio
import json

import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_openai_server import start_server

from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.responses import ResponseBuilder, ResponsesRequest, response_events
from pagedllm.inputs import render_chat
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.reasoning import HarmonySplitter
from pagedllm.sampling_params import SamplingParams
from pagedllm.testing import build_tiny_checkpoint
from pagedllm.tool_calls import ToolCall, ToolCallSplitter, tool_use

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc"]}}, "required": ["zone"], "additionalProperties": False}}}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize("mode, text, plain, calls", [
    ("hermes", f"Sure.<tool_call>\n{CALL}\n</tool_call>", "Sure.", [("get_weather", '{"city": "Paris"}')]),
    ("hermes", f"<tool_call>{CALL}</tool_call>\n<tool_call>{{\"name\": \"b\", \"arguments\": {{}}}}</tool_call> ok",
     "\n ok", [("get_weather", '{"city": "Paris"}'), ("b", "{}")]),
    ("hermes", "an answer < with <tool_ but no call", "an answer < with <tool_ but no call", []),
    ("hermes", '<tool_call>{"name": oops}</tool_call>', '<tool_call>{"name": oops}</tool_call>', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", '{"a": 1}')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f", "arguments": [1]}'
     '</tool_call>', []),
    ("hermes", f"<tool_call>{CALL}", None, [("get_weather", '{"city": "Paris"}')]),  # cut before its end tag
    ("hermes", '<tool_call>{"name": "get_weather", "argu', '<tool_call>{"name": "get_weather", "argu', []),
    ("llama3_json", ' {"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}', None,
     [("f", '{"a": 1}'), ("g", "{}")]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {}}', None, [("f", "{}")]),
    ("llama3_json", 'It is {"name": "f", "parameters": {}}', 'It is {"name": "f", "parameters": {}}', []),
    ("llama3_json", "<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("mistral", 'Let me look. [TOOL_CALLS][{"name": "f", "arguments": {"q": "x"}}, {"name": "g", "arguments": {}}]',
     "Let me look. ", [("f", '{"q": "x"}'), ("g", "{}")]),
    ("mistral", "[TOOL_CALLS] not json", "[TOOL_CALLS] not json", []),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]', None,
     [("get_weather", '{"city": "Oslo"}')]),
    ("required", '[{"name": "get_weather", "parameters": {"ci', '[{"name": "get_weather", "parameters": {"ci', []),
    ("named", '{"city": "Oslo"}', None, [("get_weather", '{"city": "Oslo"}')]),
    ("named", '{"city": "Os', None, [("get_weather", '{"city": "Os')]),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_each_parser_splits_an_answer_into_its_text_and_calls(mode, text, plain, calls):
    """A call not written whole (bad JSON, no name, arguments not an object, cut short) stays in the
    text as the model wrote it; a named function's answer is its call whatever it is (vLLM's: cut
    short by max_tokens, finish_reason says so)."""
    got_plain, got_calls = ToolCallSplitter(mode, "get_weather" if mode == "named" else None).feed(text, last=True)
    assert got_plain == plain and got_calls == [ToolCall(*c) for c in calls]


PIECES = ["<tool_call>", "</tool_call>", "<tool_", "[TOOL_CALLS]", "<|python_tag|>", CALL, "{", "}", " ", "\n", "text",
          '{"name": "f", "parameters": {}}', ";", "[", "]"]


@given(mode=st.sampled_from(["hermes", "llama3_json", "mistral", "required", "named"]),
       pieces=st.lists(st.sampled_from(PIECES), max_size=12), most=st.sampled_from([None, 1]), data=st.data())
@settings(max_examples=300, deadline=None)
def test_any_chunking_of_a_stream_splits_as_the_whole(mode, pieces, most, data):
    text = "".join(pieces)
    whole = ToolCallSplitter(mode, "f", most).feed(text, last=True)
    assert most is None or len(whole[1]) <= most
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=6)))
    splitter, plain, calls = ToolCallSplitter(mode, "f", most), [], []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        p, c = splitter.feed(text[start:end], last=end == len(text))
        plain.append(p or "")
        calls += c
    if mode == "named":  # pieces as they come, which add up to the whole answer's one call
        assert whole == (None, [ToolCall("f", text)] if text else [])
        assert not "".join(plain) and {c.name for c in calls} <= {"f"} and all(c.arguments for c in calls)
        calls = [ToolCall("f", "".join(c.arguments for c in calls))] if calls else []
    assert ("".join(plain) or None, calls) == whole


@pytest.mark.parametrize("tools, choice, parser, field, message", [
    ([WEATHER], "auto", None, "tool_choice", "needs the server started with --enable-auto-tool-choice"),
    ([WEATHER], None, None, "tool_choice", "the default where tools are given"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, None, "tool_choice",
     "names the function 'get_time', which tools do not give (they give get_weather)"),
    ([WEATHER], {"type": "function"}, None, "tool_choice", "tool_choice must be"),
    ([WEATHER], {"function": {"name": "get_weather"}}, None, "tool_choice", "tool_choice must be"),
    ([WEATHER], "sometimes", "hermes", "tool_choice", "tool_choice must be"),
    ([{"type": "function", "name": "f"}], "required", None, "tools", "tools[0] must be"),
    ([WEATHER, "f"], "required", None, "tools", "tools[1] must be"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "required", None, "tools", "tools[0] must be"),
    ([{"type": "function", "function": {"name": ""}}], "required", None, "tools", "name must be a non-empty string"),
    ([{"type": "function", "function": {"name": 5}}], "required", None, "tools", "name must be a non-empty string"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "required", None, "tools",
     "parameters must be a JSON schema"),
    (None, "required", None, "tool_choice", "tool_choice 'required' needs tools"),
    ([], {"type": "function", "function": {"name": "f"}}, "hermes", "tool_choice", "needs tools"),
])
def test_tools_and_tool_choice_are_checked_naming_the_field(tools, choice, parser, field, message):
    with pytest.raises(ValueError) as err:
        tool_use(tools, choice, parser)
    assert message in err.value.args[0] and err.value.args[1] == field


def test_no_tools_or_tool_choice_none_leave_the_answer_as_text():
    assert tool_use(None, "auto", None) is None and tool_use([], "none", None) is None
    assert tool_use([WEATHER, "anything"], "none", None) is None  # the template's to read, as before
    assert tool_use([WEATHER], "required", None).schema["items"]["anyOf"][0]["properties"]["name"] == {
        "const": "get_weather"}
    assert tool_use([WEATHER], "required", None, parallel=False).schema["maxItems"] == 1


def test_parallel_tool_calls_false_keeps_the_first_call():
    two = f"<tool_call>{CALL}</tool_call><tool_call>{CALL.replace('Paris', 'Oslo')}</tool_call>"
    assert tool_use([WEATHER], "auto", "hermes", parallel=False).splitter().feed(two, last=True) == (
        None, [ToolCall("get_weather", '{"city": "Paris"}')])


def test_earlier_calls_reach_the_template_with_their_arguments_parsed(tokenizer):
    """OpenAI sends a call's arguments as JSON text; templates write them with ``tojson`` (Qwen's),
    so they get the object (text that is not a JSON object stays as it came)."""
    template = ("{% for m in messages %}{% for c in m.tool_calls or [] %}[{{ c.function.name }} "
                "{{ c.function.arguments | tojson }}]{% endfor %}{{ m.content or '' }}|{% endfor %}")
    calls = [{"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
             {"id": "2", "type": "function", "function": {"name": "f", "arguments": "not json"}}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "1", "content": "3 C"}]
    text, _ = render_chat(tokenizer, messages, template, add_generation_prompt=False)
    assert text == 'hi|[get_weather {"city": "Oslo"}][f "not json"]|3 C|'


@pytest.fixture(scope="module")
def tool_server(tiny_checkpoint):
    server, uv, url = start_server(tiny_checkpoint("llama"), "--enable-auto-tool-choice",
                                   "--tool-call-parser", "hermes", "--served-model-name", "tiny")
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    uv.should_exit = True
    server.engine.shutdown()


MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
# the tiny random model writes a hermes call when its text is forced so
FORCED_CALL = {"structured_outputs": {
    "regex": r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "c"\}\}</tool_call>'}}


def _streamed(client, **ask) -> tuple[str | None, list[dict], str]:
    """A stream's text, its calls (each delta's parts added up by index, as clients do) and finish reason."""
    text, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **ask):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                seen = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
                seen["name"] += call.function.name or ""
                seen["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return text or None, [calls[i] for i in sorted(calls)], finish


def test_auto_returns_the_models_own_calls_whole_and_streamed(tool_server):
    ask = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=80, extra_body=FORCED_CALL)
    choice = tool_server.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure. "
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    text, calls, finish = _streamed(tool_server, **ask)
    assert (text, finish) == ("Sure. ", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]


def test_auto_without_a_call_is_a_plain_answer(tool_server):
    ask = dict(model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="auto", max_tokens=6, temperature=0)
    choice = tool_server.chat.completions.create(**ask).choices[0]
    plain = tool_server.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert choice.message.content == plain.choices[0].message.content  # (the template here ignores tools)


def test_required_forces_one_or_more_calls_of_the_tools(tool_server, tokenizer):
    """(A random model, greedy, makes the list go on to max_tokens: biased to "]", it ends the list
    where the grammar allows, after a call.)"""
    end = {str(tokenizer.convert_tokens_to_ids("]")): 10}
    ask = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200,
               temperature=0, logit_bias=end)
    choice = tool_server.chat.completions.create(**ask).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    text, calls, finish = _streamed(tool_server, **ask)
    assert text is None and finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments)
                                                           for c in choice.message.tool_calls]


def test_a_named_function_is_called_with_arguments_of_its_schema(tool_server):
    ask = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], n=2, temperature=1, seed=3, max_tokens=100,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    for choice in tool_server.chat.completions.create(**ask).choices:
        (call,) = choice.message.tool_calls
        assert choice.finish_reason == "stop" and call.function.name == "get_weather"  # OpenAI's, for a forced call
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    text, calls, finish = _streamed(tool_server, **ask | {"n": 1})
    assert text is None and finish == "stop" and [c["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_a_named_functions_arguments_stream_as_they_come(tool_server):
    """As vLLM streams them: the call's id, type and name on its first chunk, then pieces of its
    arguments alone (no null id or name), adding up to what the whole answer gives."""
    ask = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], temperature=0, max_tokens=100,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = tool_server.chat.completions.create(**ask).choices[0].message.tool_calls[0].function.arguments
    raw = tool_server.chat.completions.with_raw_response.create(stream=True, **ask).http_response.read().decode()
    deltas = [call for line in raw.splitlines() if line.startswith("data: {")
              for choice in json.loads(line[6:])["choices"] for call in choice["delta"].get("tool_calls") or []]
    assert len(deltas) > 3 and {d["index"] for d in deltas} == {0}
    assert deltas[0]["id"].startswith("chatcmpl-tool-") and deltas[0]["type"] == "function"
    assert deltas[0]["function"]["name"] == "get_weather"
    assert all(d.keys() == {"index", "function"} and d["function"].keys() == {"arguments"} for d in deltas[1:])
    assert "".join(d["function"]["arguments"] for d in deltas) == whole
    two = tool_server.chat.completions.with_raw_response.create(stream=True, **ask | {"n": 2, "temperature": 1,
                                                                                  "seed": 7})
    by_choice = {0: [], 1: []}
    for line in two.http_response.read().decode().splitlines():
        for choice in json.loads(line[6:])["choices"] if line.startswith("data: {") else []:
            by_choice[choice["index"]] += choice["delta"].get("tool_calls") or []
    for pieces in by_choice.values():  # each sample its own call, named on its first chunk alone
        assert [bool(p.get("id")) for p in pieces] == [True] + [False] * (len(pieces) - 1)
        jsonschema.validate(json.loads("".join(p["function"]["arguments"] for p in pieces)),
                            WEATHER["function"]["parameters"])
    cut = tool_server.chat.completions.create(**ask | {"max_tokens": 3}).choices[0]  # cut short: still its call
    assert cut.finish_reason == "length" and cut.message.content is None
    assert whole.startswith(cut.message.tool_calls[0].function.arguments)


@pytest.mark.parametrize("extra, field", [
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no such type"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}], "tool_choice": "auto"},
     "tools"),
])
def test_a_server_with_the_parser_names_what_is_wrong(tool_server, extra, field):
    with pytest.raises(openai.BadRequestError) as err:
        tool_server.chat.completions.create(**{"model": "tiny", "messages": MESSAGES, "tools": [WEATHER]} | extra)
    assert err.value.body["param"] == field


# gpt-oss: its calls are harmony messages to functions.NAME, read from the tokens (the openai parser)
GPT_OSS_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
                'to=functions.get_weather <|message|>{"city": "Oslo"}<|call|>')


def test_harmony_reads_gpt_oss_calls_whole_and_token_by_token(harmony_tokenizer):
    ids = harmony_tokenizer.encode(GPT_OSS_CALL, add_special_tokens=False)
    whole = HarmonySplitter(harmony_tokenizer, tool_calls=True)
    assert whole.feed("", ids, last=True) == ("Need the weather.", None)
    assert whole.take_calls() == [ToolCall("get_weather", '{"city": "Oslo"}')] and whole.take_calls() == []
    streamed, calls = HarmonySplitter(harmony_tokenizer, tool_calls=True), []
    for i, token in enumerate(ids):
        streamed.feed("", [token], last=i == len(ids) - 1)
        calls += streamed.take_calls()
    assert calls == [ToolCall("get_weather", '{"city": "Oslo"}')]
    # without the parser, the call's text is the answer's (as before)
    assert HarmonySplitter(harmony_tokenizer).feed("", ids, last=True) == ("Need the weather.", '{"city": "Oslo"}')


@pytest.mark.parametrize("text, answer, calls", [
    ('<|channel|>commentary to=functions.f<|message|>{"a": 1}', None, [("f", '{"a": 1}')]),  # cut before <|call|>
    ('<|channel|>commentary to=functions.f<|message|>{"a": ', '{"a": ', []),  # cut inside its arguments
    ("<|channel|>commentary to=functions.f<|message|>not json<|call|>", "not json", []),
    ('<|channel|>analysis to=functions.f<|message|>{}<|call|><|start|>assistant<|channel|>final<|message|>ok',
     "ok", [("f", "{}")]),
    ('<|channel|>commentary to=browser.search<|message|>{"q": 1}<|call|>', '{"q": 1}', []),  # not a function
])
def test_harmony_calls_not_written_whole_stay_text(text, answer, calls, harmony_tokenizer):
    splitter = HarmonySplitter(harmony_tokenizer, tool_calls=True)
    assert splitter.feed("", harmony_tokenizer.encode(text, add_special_tokens=False), last=True)[1] == answer
    assert splitter.take_calls() == [ToolCall(*c) for c in calls]


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>",
                                        "commentary", " to=functions.f", "analysis", "assistant", '{"a": 1}', "x"]),
                       max_size=16), cuts=st.lists(st.integers(0, 40), max_size=5))
def test_any_gpt_oss_token_stream_gives_the_same_calls_in_chunks_as_whole(pieces, cuts, harmony_tokenizer):
    ids = harmony_tokenizer.encode("".join(pieces), add_special_tokens=False)
    bounds = sorted({min(c, len(ids)) for c in cuts})
    whole = HarmonySplitter(harmony_tokenizer, tool_calls=True)
    expected = (*whole.feed("", ids, last=True), whole.take_calls())
    streamed, parts, calls = HarmonySplitter(harmony_tokenizer, tool_calls=True), [], []
    for a, b in zip([0, *bounds], [*bounds, len(ids)], strict=True):
        parts.append(streamed.feed("", ids[a:b], last=b == len(ids)))
        calls += streamed.take_calls()
    assert (*(("".join(p[k] or "" for p in parts) or None) for k in (0, 1)), calls) == expected


def test_a_gpt_oss_server_with_the_openai_parser_returns_its_calls(harmony_tokenizer, tmp_path):
    """The server's whole-answer and streamed paths over a gpt-oss answer's tokens that call a
    function (fed to them: a random model seldom writes a call), and a live request with tools."""
    path = build_tiny_checkpoint("gpt-oss", str(tmp_path), tokenizer=harmony_tokenizer)
    server, uv, url = start_server(path, "--enable-auto-tool-choice", "--tool-call-parser", "openai",
                                   "--served-model-name", "x")
    try:
        serving, tools = server.serving, tool_use([WEATHER], "auto", "openai")
        body = ChatCompletionRequest(messages=MESSAGES, tools=[WEATHER])
        ids = harmony_tokenizer.encode(GPT_OSS_CALL, add_special_tokens=False)
        message = serving._message(body, None, CompletionOutput(0, "", ids, "stop"), tools)
        assert (message.reasoning, message.content) == ("Need the weather.", None)
        assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
            ("get_weather", '{"city": "Oslo"}')]
        splitters, tool_splitters = {0: serving._splitter(None, tools)}, {0: tools.splitter()}
        deltas = [serving._delta(body, splitters, tool_splitters,
                                 CompletionOutput(0, "", [t], "stop" if i == len(ids) - 1 else None))
                  for i, t in enumerate(ids)]
        assert [(c.function.name, c.function.arguments, c.index) for d in deltas for c in d.tool_calls or []] == [
            ("get_weather", '{"city": "Oslo"}', 0)]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        asked = dict(model="x", messages=MESSAGES, tools=[WEATHER], max_tokens=30, temperature=1.0, seed=3)
        done = client.chat.completions.create(**asked, extra_body={"return_token_ids": True}).choices[0]
        splitter = HarmonySplitter(harmony_tokenizer, tool_calls=True)
        assert done.message.content == splitter.feed("", done.model_dump()["token_ids"], last=True)[1]
        assert [c.function.name for c in done.message.tool_calls or []] == [c.name for c in splitter.take_calls()]
    finally:
        uv.should_exit = True
        server.engine.shutdown()


# The Responses API: function tools flat ({"type": "function", "name", "parameters"}), calls as items
FLAT_WEATHER = {"type": "function", **WEATHER["function"]}


def test_responses_input_function_calls_and_outputs_become_the_chats_turns():
    body = ResponsesRequest(input=[
        {"role": "user", "content": "Weather in Oslo and Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "3 C"},
        {"type": "function_call_output", "call_id": "c2", "output": "9 C"}], tools=[FLAT_WEATHER],
        tool_choice={"type": "function", "name": "get_weather"})
    turns = [m.model_dump(exclude_none=True) for m in body.messages()]
    assert [t["role"] for t in turns] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in turns[1]["tool_calls"]] == ["c1", "c2"] and turns[2]["tool_call_id"] == "c1"
    assert body.chat_tools() == [WEATHER] and body.chat_tool_choice() == {"type": "function",
                                                                          "function": {"name": "get_weather"}}


def test_responses_stream_sends_each_call_as_an_item_and_ends_as_the_whole(tokenizer):
    """An answer with text, then a hermes call: the message item, then the call's item (added,
    its arguments, done), and the final response lists them in that order."""
    body = ResponsesRequest(input="weather?", tools=[FLAT_WEATHER])
    builder = ResponseBuilder(body, "tiny", SamplingParams())
    chunks = ["Let me ", "look.<tool_", f"call>{CALL}</tool", "_call>"]

    async def outputs():
        for i, text in enumerate(chunks):
            yield RequestOutput("r", "", [1, 2], [CompletionOutput(0, text, [7], "stop" if i == 3 else None)], i == 3)

    async def collect():
        return [line async for line in response_events(builder, outputs(), None, ToolCallSplitter("hermes"))]

    events = [json.loads(line.split("data: ", 1)[1]) for line in asyncio.run(collect())]
    kinds = [e["type"] for e in events]
    assert kinds.index("response.output_text.delta") < kinds.index("response.function_call_arguments.done")
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert json.loads(done["arguments"]) == {"city": "Paris"} and done["output_index"] == 1
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [(item["type"], item.get("name")) for item in final["output"]] == [("message", None),
                                                                           ("function_call", "get_weather")]
    assert final["output"][0]["content"][0]["text"] == "Let me look."
    assert final["output"][1]["id"] == done["item_id"] and final["output"][1]["call_id"].startswith("call_")


def test_responses_api_forces_a_named_function_whole_and_streamed(tool_server):
    ask = dict(model="tiny", input="What is the weather in Paris?", tools=[FLAT_WEATHER, {"type": "function",
               **TIME["function"]}], tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=100)
    response = tool_server.responses.create(**ask)
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather" and response.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    events = list(tool_server.responses.create(**ask, stream=True))
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 3 and "".join(pieces) == done.arguments  # as the model writes them
    final = events[-1].response
    assert [item.type for item in final.output] == ["function_call"] and final.output[0].arguments == done.arguments


@pytest.mark.parametrize("tools, choice, field, said", [
    ([FLAT_WEATHER], {"type": "function", "name": "nope"}, "tool_choice", "names the function 'nope'"),
    ([FLAT_WEATHER], {"type": "function"}, "tool_choice", 'or {"type": "function", "name": NAME}, not'),
    ([{"type": "function", "parameters": {}}], "required", "tools", "tools[0].name must be a non-empty string"),
    ([{"type": "web_search"}], "auto", "tools", 'tools[0] must be {"type": "function", "name", "parameters"}'),
])
def test_responses_api_names_a_bad_tool_as_it_writes_tools(tool_server, tools, choice, field, said):
    with pytest.raises(openai.BadRequestError) as err:
        tool_server.responses.create(model="tiny", input="x", tools=tools, tool_choice=choice)
    assert err.value.body["param"] == field and said in err.value.body["message"]


def test_calls_are_read_from_the_answer_after_the_thinking():
    """With a reasoning parser, the thinking is split off first: a call written while thinking is
    thinking, one in the answer is a call (whole, and streamed chunk by chunk)."""
    from types import SimpleNamespace

    from pagedllm.entrypoints.openai.serving import OpenAIServing
    from pagedllm.reasoning import ReasoningSplitter

    serving = SimpleNamespace(reasoning_parser="deepseek_r1",
                              _splitter=lambda prompt, tools=None: ReasoningSplitter(False))
    text = f"<think>maybe <tool_call>{CALL}</tool_call>?</think>Sure.<tool_call>{CALL}</tool_call>"
    body, tools = ChatCompletionRequest(messages=MESSAGES, tools=[WEATHER]), tool_use([WEATHER], "auto", "hermes")
    message = OpenAIServing._message(serving, body, None, CompletionOutput(0, text, [1], "stop"), tools)
    assert message.reasoning == f"maybe <tool_call>{CALL}</tool_call>?" and message.content == "Sure."
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]
    splitters, tool_splitters = {0: ReasoningSplitter(False)}, {0: tools.splitter()}
    deltas = [OpenAIServing._delta(serving, body, splitters, tool_splitters,
                                   CompletionOutput(0, text[i:i + 5], [1], "stop" if i + 5 >= len(text) else None))
              for i in range(0, len(text), 5)]
    assert "".join(d.content or "" for d in deltas) == "Sure."
    assert [c.function.name for d in deltas for c in d.tool_calls or []] == ["get_weather"]
