"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official openai client."""

import argparse
import asyncio
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import random_prompts

import pagedllm
from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints.openai.api_server import DEFAULT_CHAT_TEMPLATE, build_server, uvicorn_server
from pagedllm.entrypoints.openai.serving import OpenAIServing
from pagedllm.entrypoints.server_args import engine_args

MESSAGES = [{"role": "user", "content": "Hello!"}]


def call(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def server_args(model: str, *extra: str) -> argparse.Namespace:
    """The options of a CPU server on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    engine_args(parser)
    return parser.parse_args(["--model", model, "--device", "cpu", "--port", str(port), *extra])


def start_server(model: str, *extra: str):
    args = server_args(model, "--uvicorn-log-level", "warning", *extra)
    server, port = build_server(args), args.port
    uv = uvicorn_server(server, args)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    return server, uv, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    server, uv, url = start_server(tiny_checkpoint("llama"), "--served-model-name", "tiny")
    yield server, url, openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    uv.should_exit = True
    server.engine.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    return LLM(tiny_checkpoint("llama"), device="cpu")


def test_vllms_uvicorn_flags_set_uvicorns_log(live, tiny_checkpoint):
    server, _, _ = live
    default = uvicorn_server(server, server_args(tiny_checkpoint("llama"))).config
    assert default.access_log and default.log_level == "info"
    quiet = uvicorn_server(server, server_args(tiny_checkpoint("llama"), "--disable-uvicorn-access-log",
                                               "--uvicorn-log-level", "error")).config
    assert not quiet.access_log and quiet.log_level == "error"
    with pytest.raises(SystemExit):  # argparse: not one of the levels
        server_args(tiny_checkpoint("llama"), "--uvicorn-log-level", "loud")


@pytest.mark.parametrize("flags, cut_at", [([], None), (["--enable-log-requests"], 2000),
                                            (["--enable-log-requests", "--max-log-len", "100"], 100)])
def test_enable_log_requests_logs_each_request_as_it_starts(flags, cut_at, pagedllm_log):
    class Engine:  # the two calls a request's start makes, and what the server reads of it when made
        config, tokenizer = argparse.Namespace(hf_config=argparse.Namespace(model_type="llama")), None

        def validate(self, token_ids, params):
            pass

        async def generate(self, prompt, params, request_id):
            yield

    log_requests = bool(flags)
    serving = OpenAIServing(Engine(), ["m"], None, None, server_args("m", *flags))
    asyncio.run(serving._start("cmpl-1", [("secret words", [1, 2, 3]), (None, [4])], SamplingParams(max_tokens=5)))
    asyncio.run(serving._start("cmpl-2", [(None, [1])], SamplingParams(stop=["x" * 100_000])))  # a body's worth
    logged = [r.getMessage() for r in pagedllm_log if "cmpl-1" in r.getMessage()]
    line = "request cmpl-1: [3, 1] prompt tokens, " + repr(SamplingParams(max_tokens=5))
    assert logged == ([line if len(line) <= cut_at else line[:cut_at] + "..."] if log_requests else [])
    assert "secret" not in "".join(logged)  # counts, not the prompt's text
    long = [r.getMessage() for r in pagedllm_log if "cmpl-2" in r.getMessage()]
    assert [(len(m), m[-3:]) for m in long] == ([(cut_at + 3, "...")] if log_requests else [])


def test_models_lists_the_served_name(live):
    _, _, client = live
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_streamed_and_not_equals_llm_generate(live, offline):
    _, _, client = live
    prompt = "def main():"
    expected = offline.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == expected.outputs[0].text
    assert done.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(expected.prompt_token_ids), 12)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.completion_tokens == 12


def test_completion_takes_token_ids_lists_n_logprobs_and_echo(live, offline):
    _, _, client = live
    prompts = random_prompts([5, 9], seed=2)
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=4, temperature=0.8, n=2, seed=3,
                                    logprobs=2, extra_body={"top_k": 20})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == 4 and len(c.logprobs.top_logprobs[0]) >= 1 for c in out.choices)
    echoed = client.completions.create(model="tiny", prompt="import os", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("import os")


def test_chat_streamed_and_not_equals_llm_chat_with_the_builtin_template(live, offline):
    _, _, client = live
    expected = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False,
                            chat_template=DEFAULT_CHAT_TEMPLATE)[0].outputs[0].text
    done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    assert done.choices[0].message.content == expected and done.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 10


def test_streamed_samples_add_up_to_the_unstreamed_ones_and_each_finishes_once(live):
    """n=2 samples that stop at different tokens: each sample's chunks add up to its text and its
    logprobs, and a sample that finished first sends no more chunks."""
    _, _, client = live
    kwargs = dict(model="tiny", prompt="def main():", max_tokens=24, temperature=1.0, n=2, seed=5, stop=["e"],
                  logprobs=1)
    done = client.completions.create(**kwargs)
    assert len({len(c.logprobs.tokens) for c in done.choices}) == 2  # they stop at different tokens
    chunks = [c for c in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
              if c.choices]
    for choice in done.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine for t in c.logprobs.tokens] == choice.logprobs.tokens
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
        assert mine[-1].finish_reason == choice.finish_reason


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(live):
    """vLLM's stream_options.continuous_usage_stats: each chunk carries the prompt's tokens and the
    completion's so far (never falling, counting each sample's tokens), ending at the final usage."""
    _, _, client = live
    options = {"include_usage": True, "continuous_usage_stats": True}
    completion = list(client.completions.create(model="tiny", prompt="def main():", max_tokens=9, temperature=1,
                                                n=2, seed=3, stream=True, stream_options=options))
    chat = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=7, temperature=0,
                                               stream=True, stream_options=options))
    for chunks, total in ((completion, 2 * 9), (chat, 7)):
        final = chunks[-1].usage
        assert not chunks[-1].choices and final.completion_tokens == total
        so_far = [c.usage.completion_tokens for c in chunks]
        assert so_far == sorted(so_far) and so_far[-2] == total
        assert {c.usage.prompt_tokens for c in chunks} == {final.prompt_tokens}
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)
    assert chat[0].usage.completion_tokens == 0  # the role chunk, before any token
    plain = list(client.completions.create(model="tiny", prompt="x", max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage.completion_tokens == 3


def test_async_client(live):
    _, url, _ = live

    async def ask():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        answers = await asyncio.gather(*[client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=6, temperature=0) for _ in range(5)])
        await client.close()
        return {a.choices[0].message.content for a in answers}

    assert len(asyncio.run(ask())) == 1  # five concurrent greedy answers agree


@pytest.mark.parametrize("kwargs, status, param", [
    ({"model": "other-model"}, 404, "model"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 7}, 400, "top_p"),
    ({"prompt": "x " * 300}, 400, "prompt"),
    ({"max_tokens": "many"}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors_and_disturb_nothing(live, kwargs, status, param):
    server, _, client = live
    request = {"model": "tiny", "prompt": "hello", "max_tokens": 4} | kwargs
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(**request)
    assert caught.value.status_code == status
    assert caught.value.body["param"] == param and caught.value.body["code"] == status
    assert client.completions.create(model="tiny", prompt="hello", max_tokens=2).choices[0].text is not None


def test_client_that_disconnects_mid_stream_frees_its_request(live):
    server, url, _ = live
    connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")  # streaming has begun
    connection.close()
    assert_all_freed(server)


def assert_all_freed(server) -> None:
    """The engine process reports no request left and no KV block held (its stats come after each
    message it handles)."""
    deadline = time.time() + 10
    while (server.engine.num_unfinished_requests or server.engine.stats.kv_blocks_in_use) and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.num_unfinished_requests == 0 and server.engine.stats.kv_blocks_in_use == 0


def test_a_stream_read_late_gets_the_newest_output_not_a_backlog(live, offline):
    """Outputs are cumulative: a reader that falls behind (a slow client, a busy server) gets one
    output with every token so far, so it costs one chunk, not one per step it missed."""
    server, _, _ = live
    engine = server.engine
    prompt_ids = offline.get_tokenizer().encode("def main():")
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    expected = offline.generate({"prompt_token_ids": prompt_ids}, params, use_tqdm=False)[0].outputs[0]

    async def read_late():
        stream = engine.generate({"prompt_token_ids": prompt_ids}, params, "late-reader")
        first = await anext(stream)
        while engine.num_unfinished_requests:
            await asyncio.sleep(0.01)  # the engine finishes the request meanwhile
        # its stats say so just before its thread hands the last output over (a collection of the
        # whole heap between the two, in a long test run, let this reader in first)
        await asyncio.sleep(0.2)
        return first, [output async for output in stream]

    first, rest = asyncio.run(read_late())
    assert not first.finished and len(first.outputs[0].token_ids) < 48
    assert len(rest) == 1 and rest[0].finished
    assert rest[0].outputs[0].token_ids == expected.token_ids and rest[0].outputs[0].text == expected.text


def test_health_tokenize_detokenize(live, offline):
    _, url, _ = live
    assert call("GET", f"{url}/health")[0] == 200
    tokens = json.loads(call("POST", f"{url}/tokenize", {"prompt": "def main():"})[1])
    assert tokens["tokens"] == offline.get_tokenizer().encode("def main():")
    assert tokens["count"] == len(tokens["tokens"])
    assert json.loads(call("POST", f"{url}/detokenize", {"tokens": tokens["tokens"]})[1])["prompt"] == "def main():"


def test_api_key_is_required_on_v1_routes(tiny_checkpoint):
    server, uv, url = start_server(tiny_checkpoint("gpt2"), "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()
        assert call("GET", f"{url}/v1/models")[0] == 401
        models = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret").models.list()
        assert models.data[0].id == tiny_checkpoint("gpt2")
        assert call("GET", f"{url}/health")[0] == 200  # not a /v1 route
        # vLLM's probes, open as /health is: /ping (GET and POST, SageMaker's) and /version
        assert call("GET", f"{url}/ping")[0] == call("POST", f"{url}/ping")[0] == 200
        status, body = call("GET", f"{url}/version")
        assert status == 200 and json.loads(body) == {"version": pagedllm.__version__}
        assert call("POST", f"{url}/tokenize", {"prompt": "x"})[0] == 401  # the rest need the key
    finally:
        uv.should_exit = True
        server.engine.shutdown()


def test_metrics_are_prometheus_exposition_with_vllms_names(live):
    _, url, client = live
    before = scrape(url)
    client.completions.create(model="tiny", prompt="def main():", max_tokens=5, n=2, seed=1,
                              extra_body={"ignore_eos": True})
    after = scrape(url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[f"pagedllm:{name}"] >= 0
    assert 0 <= after["pagedllm:kv_cache_usage_perc"] <= 1
    grew = {name: after[name] - before.get(name, 0) for name in after}
    assert grew["pagedllm:generation_tokens_total"] == 10
    assert grew["pagedllm:prompt_tokens_total"] == len(client.post("/../tokenize", cast_to=dict,
                                                                   body={"prompt": "def main():"})["tokens"])
    assert grew['pagedllm:request_success_total{finished_reason="length"}'] == 2
    assert grew["pagedllm:time_to_first_token_seconds_count"] == 1
    assert grew["pagedllm:e2e_request_latency_seconds_count"] == 1
    assert grew["pagedllm:request_queue_time_seconds_count"] == 1
    assert grew["pagedllm:request_generation_tokens_sum"] == 10
    assert grew["pagedllm:inter_token_latency_seconds_count"] >= 1
    assert after["pagedllm:prefix_cache_hits_total"] <= after["pagedllm:prefix_cache_queries_total"]


def scrape(url: str) -> dict[str, float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = call("GET", f"{url}/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def test_200_concurrent_requests_some_leaving_mid_stream(live):
    """Half stream, a tenth of those leave after the first chunk (a reader behind may get all that
    is new in one); the rest all complete, and afterwards the server is healthy and holds no KV
    block."""
    server, url, _ = live

    async def one(client, i):
        prompt = random_prompts([3 + i % 17], seed=i)[0]
        if i % 2 == 0:
            return (await client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                                    extra_body={"ignore_eos": True})).usage.completion_tokens
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=8, stream=True,
                                                 extra_body={"ignore_eos": True})
        chunks, finish = 0, None
        async for chunk in stream:
            chunks += 1
            finish = chunk.choices[0].finish_reason or finish
            if i % 10 == 1:
                await stream.close()
                return "left"
        return 8 if finish == "length" else finish

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        results = await asyncio.gather(*[one(client, i) for i in range(200)])
        await client.close()
        return results

    results = asyncio.run(run())
    assert results.count("left") == 20
    assert all(r == 8 for r in results if r != "left")  # every other request completed its 8 tokens
    assert_all_freed(server)
    assert call("GET", f"{url}/health")[0] == 200


def test_async_client_streams_completions_and_chat(live, offline):
    _, url, _ = live
    expected = offline.generate("import os", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]

    async def ask():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
        completion = await client.completions.create(model="tiny", prompt="import os", max_tokens=8, temperature=0,
                                                     stream=True)
        text = "".join([c.choices[0].text async for c in completion])
        chat = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                                    stream=True)
        chat_text = "".join([c.choices[0].delta.content or "" async for c in chat if c.choices])
        plain = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
        await client.close()
        return text, chat_text, plain.choices[0].message.content

    text, chat_text, plain_chat = asyncio.run(ask())
    assert text == expected.outputs[0].text and chat_text == plain_chat


def test_chat_template_file_overrides_the_builtin_one(tiny_checkpoint, tmp_path):
    """The template given, and what a chat request hands it as vLLM does: tools (with tool_choice
    "none"), chat_template_kwargs, and the last message left open (continue_final_message)."""
    template = tmp_path / "template.jinja"
    template.write_text("{% if tools %}tools: {{ tools | map(attribute='function.name') | join(',') }}|{% endif %}"
                        "{% if think %}<think>{% endif %}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
                        "{% if add_generation_prompt %}>{% endif %}")
    server, uv, url = start_server(tiny_checkpoint("opt"), "--chat-template", str(template))
    try:
        tokens = json.loads(call("POST", f"{url}/tokenize", {"messages": MESSAGES})[1])["tokens"]
        assert server.engine.tokenizer.decode(tokens) == "[Hello!]>"
        tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
        for extra, rendered in [({}, "[Hello!]>"),
                                ({"tools": [tool], "tool_choice": "none"}, "tools: search|[Hello!]>"),
                                ({"chat_template_kwargs": {"think": True}}, "<think>[Hello!]>"),
                                # left open: HF cuts the text after the last message's content
                                ({"continue_final_message": True, "add_generation_prompt": False}, "[Hello!")]:
            status, body = call("POST", f"{url}/v1/chat/completions",
                                {"model": server.model_name, "messages": MESSAGES, "max_tokens": 1} | extra)
            assert status == 200, body
            expected = len(server.engine.tokenizer.encode(rendered, add_special_tokens=False))
            assert json.loads(body)["usage"]["prompt_tokens"] == expected, (extra, rendered)
    finally:
        uv.should_exit = True
        server.engine.shutdown()


def test_chat_template_content_format_openai_hands_the_template_text_parts(tiny_checkpoint, tmp_path):
    """vLLM's --chat-template-content-format openai: a template that reads each content's parts
    sees them (as a string, it iterated its characters and found no text in them)."""
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{% for part in m['content'] %}<{{ part['text'] }}>{% endfor %}"
                        "{% endfor %}")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
             {"role": "assistant", "content": "Hi"}]
    for fmt, rendered in (("openai", "<Hel><lo><Hi>"), ("string", "<>" * len("HelloHi"))):
        server, uv, url = start_server(tiny_checkpoint("opt"), "--chat-template", str(template),
                                       "--chat-template-content-format", fmt)
        try:
            tokens = json.loads(call("POST", f"{url}/tokenize", {"messages": parts,
                                                                  "add_generation_prompt": False})[1])["tokens"]
            assert server.engine.tokenizer.decode(tokens) == rendered
        finally:
            uv.should_exit = True
            server.engine.shutdown()


def test_vllm_deployment_flags(tiny_checkpoint, tmp_path):
    """vllm serve's deployment flags: several served names (requests may name any; responses carry
    the first), CORS for the origins given (a browser's preflight answered before the API key is
    asked for), and a proxy's --root-path."""
    origin = "https://ui.example"
    server, uv, url = start_server(tiny_checkpoint("llama"), "--served-model-name", "first", "second",
                                   "--allowed-origins", json.dumps([origin]), "--api-key", "k", "--root-path", "/llm",
                                   "--enable-prompt-tokens-details")
    key = {"Authorization": "Bearer k"}
    try:
        cards = json.loads(call("GET", f"{url}/v1/models", headers=key)[1])["data"]
        assert [(m["id"], m["root"]) for m in cards] == [("first", server.args.model), ("second", server.args.model)]
        for name in ("first", "second"):
            status, body = call("POST", f"{url}/v1/completions", {"model": name, "prompt": "a", "max_tokens": 2}, key)
            assert status == 200 and json.loads(body)["model"] == "first"
        status, body = call("POST", f"{url}/v1/completions", {"model": "third", "prompt": "a"}, key)
        assert status == 404 and "`first` or `second`" in json.loads(body)["error"]["message"]
        chat = [{"role": "user", "content": "a"}]
        for route, body in (("completions", {"prompt": "a", "max_tokens": 2}),
                            ("chat/completions", {"messages": chat, "max_tokens": 2}),
                            ("responses", {"input": "a", "max_output_tokens": 2})):  # no model: vLLM runs the served
            status, answer = call("POST", f"{url}/v1/{route}", body, key)
            assert status == 200 and json.loads(answer)["model"] == "first", answer
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        request = urllib.request.Request(f"{url}/v1/completions", method="OPTIONS", headers=preflight)
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200 and response.headers["access-control-allow-origin"] == origin
        request = urllib.request.Request(f"{url}/v1/models", headers={"Origin": "https://elsewhere.example", **key})
        with urllib.request.urlopen(request, timeout=30) as response:  # served, but no browser may read it
            assert "access-control-allow-origin" not in response.headers
        assert call("GET", f"{url}/v1/models", headers={"Origin": origin})[0] == 401  # the key is still asked for
        assert json.loads(call("GET", f"{url}/openapi.json", headers=key)[1])["servers"] == [{"url": "/llm"}]
    finally:
        uv.should_exit = True
        server.engine.shutdown()
    server, uv, url = start_server(tiny_checkpoint("llama"))  # no CORS unless asked: vLLM allows every origin
    try:
        request = urllib.request.Request(f"{url}/v1/models", headers={"Origin": origin})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert "access-control-allow-origin" not in response.headers
    finally:
        uv.should_exit = True
        server.engine.shutdown()


def test_fields_a_route_does_not_take_are_ignored_and_said_once(live, pagedllm_log):
    """A typo ("temprature") or another server's field ("store") changes nothing, as in vLLM, which
    logs it: the operator sees it, once per route and field, however many requests send it."""
    server, url, _ = live
    for _ in range(3):
        status, _ = call("POST", f"{url}/v1/chat/completions", {"model": server.model_name, "max_tokens": 1,
                                                                "messages": MESSAGES, "temprature": 0.5, "store": True})
        assert status == 200
    said = [r.getMessage() for r in pagedllm_log if "not one this server takes" in r.getMessage()]
    assert said == ["/v1/chat/completions: the field 'temprature' is not one this server takes: ignored (said once)",
                    "/v1/chat/completions: the field 'store' is not one this server takes: ignored (said once)"]


def test_a_requests_own_chat_template_is_refused_by_name(live):
    """vLLM refuses it too unless told to trust it: a client's template would run on the server."""
    server, url, _ = live
    status, body = call("POST", f"{url}/v1/chat/completions", {"model": server.model_name, "messages": MESSAGES,
                                                               "chat_template": "{{ 'x' * 10 }}"})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "chat_template" and "--chat-template" in error["message"]


def test_responses_api_answers_as_chat_does(live, offline):
    """OpenAI's Responses API (vLLM serves it): instructions and input through the chat template,
    one assistant message out, the same greedy text as chat; max_output_tokens ends it incomplete."""
    _, _, client = live
    expected = offline.chat([{"role": "system", "content": "Be brief."}] + MESSAGES,
                            SamplingParams(temperature=0, max_tokens=8), use_tqdm=False,
                            chat_template=DEFAULT_CHAT_TEMPLATE)[0]
    response = client.responses.create(model="tiny", input="Hello!", instructions="Be brief.", max_output_tokens=8,
                                       temperature=0)
    assert response.output_text == expected.outputs[0].text and response.id.startswith("resp_")
    assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (len(expected.prompt_token_ids), 8)
    as_messages = client.responses.create(model="tiny", max_output_tokens=8, temperature=0, input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hel"}, {"type": "input_text", "text": "lo!"}]}])
    assert as_messages.output_text == expected.outputs[0].text


def test_responses_api_streams_openais_events_and_structured_output(live):
    _, _, client = live
    answer = {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "string", "enum": ["yes", "no"]}}}
    with client.responses.stream(model="tiny", input="Is it?", max_output_tokens=20, temperature=0,
                                 text=answer) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text in ('"yes"', '"no"')
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert [e.type for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done", "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    cut = list(client.responses.create(model="tiny", input="x", max_output_tokens=3, temperature=0, stream=True))
    assert cut[-1].type == "response.incomplete" and cut[-1].response.usage.output_tokens == 3


def test_cache_salt_keeps_each_tenants_prefix_cache_apart(live):
    """vLLM's cache_salt on every route (the usage says how many prompt tokens were cached): a
    salted request finds the prefix only its own salt cached."""
    _, url, client = live
    text = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n" * 3

    def cached(**salt):
        response = client.responses.create(model="tiny", input=text, max_output_tokens=2, temperature=0,
                                           extra_body=salt)
        return response.usage.input_tokens_details.cached_tokens

    assert cached(cache_salt="a") == 0 and cached(cache_salt="a") > 0
    assert cached(cache_salt="b") == 0
    chat = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2, "cache_salt": "c"}
    usages = [json.loads(call("POST", f"{url}/v1/chat/completions", chat)[1])["usage"] for _ in range(2)]
    # OpenAI's usage.prompt_tokens_details.cached_tokens, on chat and completions too
    assert usages[0]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert 0 < usages[1]["prompt_tokens_details"]["cached_tokens"] < usages[1]["prompt_tokens"]
    assert cached(cache_salt="c") > 0  # (the chat's prompt is the responses' input through the same template)
    for bad in ("", 5):
        status, body = call("POST", f"{url}/v1/chat/completions", chat | {"cache_salt": bad})
        assert status == 400 and json.loads(body)["error"]["param"] == "cache_salt"
    status, body = call("POST", f"{url}/v1/completions", {"model": "tiny", "prompt": "x", "cache_salt": "\ud800"})
    assert status == 400 and json.loads(body)["error"]["param"] == "cache_salt"


def test_responses_api_gives_logprobs_when_included(live):
    """include ["message.output_text.logprobs"] with top_logprobs: each output token's logprob and its
    alternatives, as chat gives them; the same whole and streamed."""
    _, _, client = live
    ask = dict(model="tiny", input="Hello!", max_output_tokens=6, temperature=0, top_logprobs=2,
               include=["message.output_text.logprobs"])
    whole = client.responses.create(**ask).output[0].content[0].logprobs
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [e.token for e in whole] == [e.token for e in chat]
    assert [e.logprob for e in whole] == pytest.approx([e.logprob for e in chat], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in whole)
    events = list(client.responses.create(**ask, stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [lp.token for lp in done.logprobs] == [e.token for e in whole]
    assert [lp.token for lp in streamed] == [e.token for e in whole][:len(streamed)]
    assert client.responses.create(**ask | {"include": []}).output[0].content[0].logprobs == []


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"background": True}, "background"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": "auto"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "no such type"}}}}, "text"),
    ({"input": []}, "input"), ({"input": "\ud800"}, "input"), ({"max_output_tokens": 10**9}, "input"),
    ({"include": ["no.such.thing"]}, "include"), ({"include": "message.output_text.logprobs"}, "include"),
])
def test_responses_api_refuses_what_it_does_not_do_by_name(live, extra, param):
    server, url, _ = live
    status, body = call("POST", f"{url}/v1/responses", {"model": server.model_name, "input": "x"} | extra)
    assert status == 400 and json.loads(body)["error"]["param"] == param
    status, body = call("POST", f"{url}/v1/responses", {"model": server.model_name,
                                                        "input": [{"type": "function_call_output", "output": "1"}]})
    assert status == 400  # only messages of text


def test_responses_api_takes_an_input_string_of_any_length_and_names_the_field_at_fault(live):
    """A long document as the input string is judged by its tokens against max_model_len, as a
    chat message is (the cap on the number of input messages once applied to a string's characters
    too); an error in the format is the text field's, in its message as in its param."""
    server, url, _ = live
    long_input = "hello " * 3000  # 18,000 characters
    status, body = call("POST", f"{url}/v1/responses", {"model": server.model_name, "input": long_input})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "input" and "max_model_len" in error["message"]
    chat = {"model": server.model_name, "messages": [{"role": "user", "content": long_input}]}
    chat_error = json.loads(call("POST", f"{url}/v1/chat/completions", chat)[1])["error"]["message"]
    assert chat_error.removeprefix("prompt 0: ") == error["message"].removeprefix("input: ")
    schema = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "no such type"}}}
    status, body = call("POST", f"{url}/v1/responses", {"model": server.model_name, "input": "x", "text": schema})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "text" and error["message"].startswith("text: ")


def test_return_token_ids_gives_the_exact_tokens_beside_the_text(live, offline):
    """vLLM's return_token_ids (an RL rollout's exact tokens, with no re-tokenizing): the prompt's and
    the output's ids, whole or streamed (the prompt's with the first chunk, then each chunk's own);
    without it, OpenAI's shapes, with no such key."""
    server, url, client = live
    expected = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False,
                            chat_template=DEFAULT_CHAT_TEMPLATE)[0]
    ask = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    whole = json.loads(call("POST", f"{url}/v1/chat/completions", ask | {"return_token_ids": True})[1])
    assert whole["prompt_token_ids"] == expected.prompt_token_ids
    assert whole["choices"][0]["token_ids"] == expected.outputs[0].token_ids
    plain = json.loads(call("POST", f"{url}/v1/chat/completions", ask)[1])
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]
    chunks = list(client.chat.completions.create(**ask, stream=True, extra_body={"return_token_ids": True}))
    assert chunks[0].model_extra["prompt_token_ids"] == expected.prompt_token_ids
    assert sum((c.choices[0].model_extra.get("token_ids") or [] for c in chunks[1:]), []) == \
        expected.outputs[0].token_ids
    ids = offline.generate("def main():", SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    text = {"model": "tiny", "prompt": "def main():", "max_tokens": 5, "temperature": 0, "return_token_ids": True}
    choice = json.loads(call("POST", f"{url}/v1/completions", text)[1])["choices"][0]
    assert (choice["prompt_token_ids"], choice["token_ids"]) == (ids.prompt_token_ids, ids.outputs[0].token_ids)
    streamed = list(client.completions.create(model="tiny", prompt="def main():", max_tokens=5, temperature=0,
                                              stream=True, extra_body={"return_token_ids": True}))
    assert streamed[0].choices[0].model_extra["prompt_token_ids"] == ids.prompt_token_ids
    assert sum((c.choices[0].model_extra["token_ids"] for c in streamed), []) == ids.outputs[0].token_ids


def test_https_with_ssl_keyfile_and_certfile(tiny_checkpoint, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server, uv, url = start_server(tiny_checkpoint("llama"), "--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    try:
        https = url.replace("http://", "https://")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"{https}/health", context=context, timeout=30) as response:
            assert response.status == 200
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):  # no plain HTTP
            urllib.request.urlopen(f"{url}/health", timeout=30)
    finally:
        uv.should_exit = True
        server.engine.shutdown()


def test_lm_eval_loglikelihood_request_scores_every_prompt_token(live, offline):
    """lm-evaluation-harness's local-completions request: echo the prompt with each token's logprob
    (None for the first), then one generated token. Its loglikelihoods come from these numbers."""
    _, url, _ = live
    ids = offline.get_tokenizer().encode("def main():\n    return 1")
    expected = offline.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0,
                                                                          prompt_logprobs=1), use_tqdm=False)[0]
    for max_tokens in (1, 0):
        lm_eval_request = {"model": "tiny", "prompt": [ids], "max_tokens": max_tokens, "logprobs": 1, "echo": True,
                           "temperature": 0, "seed": 1234}
        status, body = call("POST", f"{url}/v1/completions", lm_eval_request)
        assert status == 200
        choice = json.loads(body)["choices"][0]
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert logprobs["token_logprobs"][i] == pytest.approx(expected.prompt_logprobs[i][ids[i]].logprob, abs=1e-5)
            assert 1 <= len(logprobs["top_logprobs"][i]) <= 2
        assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
        assert "".join(logprobs["tokens"][:len(ids)]) == offline.get_tokenizer().decode(ids)
        assert choice["text"].startswith(offline.get_tokenizer().decode(ids))
        if max_tokens == 0:
            assert choice["text"] == offline.get_tokenizer().decode(ids)
            assert json.loads(body)["usage"]["completion_tokens"] == 0


def test_prompt_logprobs_field_as_in_vllm(live, offline):
    _, url, _ = live
    ids = offline.get_tokenizer().encode("import os")
    status, body = call("POST", f"{url}/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 2,
                                                          "prompt_logprobs": 2})
    entries = json.loads(body)["choices"][0]["prompt_logprobs"]
    assert status == 200 and entries[0] is None and len(entries) == len(ids)
    assert all(str(token) in entry for token, entry in zip(ids[1:], entries[1:], strict=True))


def test_streamed_completion_carries_logprobs(live, offline):
    _, _, client = live
    expected = offline.generate("def main():", SamplingParams(temperature=0, max_tokens=8, logprobs=2),
                                use_tqdm=False)[0].outputs[0]
    chunks = list(client.completions.create(model="tiny", prompt="def main():", max_tokens=8, temperature=0,
                                            logprobs=2, stream=True))
    token_logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs
                      for lp in c.choices[0].logprobs.token_logprobs]
    assert token_logprobs == pytest.approx([e[t].logprob for t, e in zip(expected.token_ids, expected.logprobs,
                                                                          strict=True)], abs=1e-5)


@pytest.mark.parametrize("max_tokens", [4, 0])
def test_streamed_echo_with_logprobs_adds_up_to_the_unstreamed_response(live, max_tokens):
    """The prompt's chunk first (its tokens scored), then the generated ones: joined, the same text,
    tokens, logprobs and offsets as without streaming; max_tokens=0 streams the prompt alone."""
    _, url, _ = live
    request = {"model": "tiny", "prompt": "def main():", "max_tokens": max_tokens, "logprobs": 1, "echo": True,
               "temperature": 0}
    status, body = call("POST", f"{url}/v1/completions", request)
    assert status == 200
    whole = json.loads(body)
    status, body = call("POST", f"{url}/v1/completions", request | {"stream": True,
                                                                    "stream_options": {"include_usage": True}})
    assert status == 200
    events = [json.loads(line[len("data: "):]) for line in body.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [e["choices"][0] for e in events if e["choices"]]
    want = whole["choices"][0]
    assert "".join(c["text"] for c in choices) == want["text"]
    for field in ("tokens", "token_logprobs", "text_offset"):
        assert [x for c in choices if c["logprobs"] for x in c["logprobs"][field]] == want["logprobs"][field]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == [want["finish_reason"]]
    assert events[-1]["usage"] == whole["usage"]


def test_chat_logprobs_as_openai_returns_them(live, offline):
    _, _, client = live
    tokenizer = offline.get_tokenizer()
    expected = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False,
                            chat_template=DEFAULT_CHAT_TEMPLATE)[0].outputs[0]
    done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = done.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in expected.token_ids]
    for entry, token, logprobs in zip(content, expected.token_ids, expected.logprobs, strict=True):
        assert entry.logprob == pytest.approx(logprobs[token].logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.bytes == list(entry.token.encode())
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=1, stream=True)
    tokens = [c.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for c in chunk.choices[0].logprobs.content]
    assert tokens == [c.token for c in content]
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


def test_vllm_sampling_fields_reach_the_engine(live, offline):
    _, _, client = live
    tokenizer = offline.get_tokenizer()
    favourite = tokenizer.encode(" return", add_special_tokens=False)[0]
    biased = client.completions.create(model="tiny", prompt="x = 1", max_tokens=6, seed=1,
                                       logit_bias={str(favourite): 100})
    assert tokenizer.encode(biased.choices[0].text, add_special_tokens=False) == [favourite] * 6
    allowed = tokenizer.encode(" a b", add_special_tokens=False)
    only = client.completions.create(model="tiny", prompt="x = 1", max_tokens=6, seed=2,
                                     extra_body={"allowed_token_ids": allowed, "truncate_prompt_tokens": 2})
    assert set(tokenizer.encode(only.choices[0].text, add_special_tokens=False)) <= set(allowed)
    assert only.usage.prompt_tokens == 2
    best = client.completions.create(model="tiny", prompt="def main():", max_tokens=5, n=2, best_of=4, seed=3)
    assert sorted(c.index for c in best.choices) == [0, 1]
    with pytest.raises(openai.BadRequestError, match="best_of cannot be streamed"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, n=1, best_of=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias={"abc": 1})


def test_omitted_sampling_fields_take_the_models_generation_config(tiny_checkpoint, tmp_path):
    import shutil

    model = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "m")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(config | {"temperature": 0.0}))
    server, uv, url = start_server(str(model), "--served-model-name", "tiny")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        greedy = {client.completions.create(model="tiny", prompt="def main():", max_tokens=8).choices[0].text
                  for _ in range(3)}
        assert len(greedy) == 1  # temperature 0 from generation_config.json: the same text every time
        sampled = {client.completions.create(model="tiny", prompt="def main():", max_tokens=8,
                                             temperature=1.0).choices[0].text for _ in range(4)}
        assert len(sampled) > 1  # the request's own temperature wins
    finally:
        uv.should_exit = True
        server.engine.shutdown()


def test_completions_add_special_tokens_as_asked(tiny_checkpoint, tmp_path):
    """vLLM's add_special_tokens: a tokenizer that puts BOS before a text prompt does so by default,
    and not with add_special_tokens false (a prompt that already carries its own template)."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    path = tmp_path / "bos"
    shutil.copytree(tiny_checkpoint("llama"), path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save_pretrained(path)
    server, uv, url = start_server(str(path))
    try:
        counts = {}
        for add in (True, False):
            status, body = call("POST", f"{url}/v1/completions", {"model": server.model_name, "prompt": "def main():",
                                                                  "max_tokens": 1, "add_special_tokens": add})
            assert status == 200, body
            counts[add] = json.loads(body)["usage"]["prompt_tokens"]
        assert counts[True] == counts[False] + 1
    finally:
        uv.should_exit = True
        server.engine.shutdown()
