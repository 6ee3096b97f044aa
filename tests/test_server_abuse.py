"""Hostile requests against the live server: each gets its status and OpenAI's error JSON, and a
healthy request right after still gets the right text. Every row once broke the engine for good,
hung, or answered with something other than OpenAI's error JSON."""

import gc
import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest
from test_openai_server import server_args, start_server

from pagedllm import LLM, SamplingParams

GOOD = {"model": "tiny", "prompt": "def main():", "max_tokens": 6, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def send(url: str, method: str, path: str, body: bytes | dict | list | str | None = None,
         headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """One raw HTTP/1.1 request (any bytes as the body); returns status, headers and body."""
    host, port = url.removeprefix("http://").split(":")
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(data)}", "Connection: close",
            "Content-Type: application/json"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    if fields.get("transfer-encoding") == "chunked":
        payload = dechunk(payload)
    return int(lines[0].split()[1]), fields, payload


def dechunk(payload: bytes) -> bytes:
    out = b""
    while payload:
        size, _, rest = payload.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, payload = out + rest[:n], rest[n + 2:]
    return out


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv, uv, url = start_server(tiny_checkpoint("llama"), "--served-model-name", "tiny", "--max-request-bytes",
                                "3000000", "--read-timeout", "1.5")
    yield srv, url
    uv.should_exit = True
    srv.shutdown()


@pytest.fixture(scope="module")
def good_text(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    return llm.generate("def main():", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text


def assert_openai_error(status: int, headers: dict, body: bytes, expected: int, param: str | None = None):
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == expected and error["message"]
    if param is not None:
        assert error["param"] == param


def assert_still_serving(url: str, good_text: str):
    status, _, body = send(url, "POST", "/v1/completions", GOOD)
    assert status == 200 and json.loads(body)["choices"][0]["text"] == good_text
    assert send(url, "GET", "/health")[0] == 200


TOOL = {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}
ABUSE = [
    # values that passed validation and then killed the engine loop
    ("logprobs beyond the vocabulary", "/v1/completions", GOOD | {"logprobs": 5000}, 400, "logprobs"),
    ("prompt_logprobs beyond the vocabulary", "/v1/completions", GOOD | {"prompt_logprobs": 5000}, 400,
     "prompt_logprobs"),
    ("logprobs beyond max_logprobs", "/v1/completions", GOOD | {"logprobs": 21}, 400, "logprobs"),
    ("stop token outside the vocabulary with min_tokens", "/v1/completions",
     GOOD | {"stop_token_ids": [512], "min_tokens": 1}, 400, "stop_token_ids"),
    ("top_k beyond int64", "/v1/completions", GOOD | {"top_k": 2**63}, 400, "top_k"),
    ("seed beyond int64", "/v1/completions", GOOD | {"seed": 2**64}, 400, "seed"),
    ("seed + n beyond int64", "/v1/completions", GOOD | {"seed": 2**63 - 1, "n": 2, "temperature": 1}, 400, "seed"),
    ("chat logprobs beyond max_logprobs", "/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 50},
     400, "logprobs"),
    # types
    ("temperature as a string", "/v1/completions", GOOD | {"temperature": "0.5"}, 400, "temperature"),
    ("stop_token_ids as an int", "/v1/completions", GOOD | {"stop_token_ids": 5}, 400, "stop_token_ids"),
    ("temperature Infinity", "/v1/completions", json.dumps(GOOD).replace('"temperature": 0', '"temperature": Infinity')
     .encode(), 400, "temperature"),
    ("temperature NaN", "/v1/completions", json.dumps(GOOD).replace('"temperature": 0', '"temperature": NaN')
     .encode(), 400, "temperature"),
    ("boolean token ids", "/v1/completions", GOOD | {"prompt": [True, 5]}, 400, "prompt"),
    ("token id outside the vocabulary", "/v1/completions", GOOD | {"prompt": [5, 600]}, 400, "prompt"),
    ("negative token id", "/v1/completions", GOOD | {"prompt": [[5, -1]]}, 400, "prompt"),
    ("n as a bool", "/v1/completions", GOOD | {"n": True}, 400, "n"),
    ("16,385 prompts (700,000 in one body took the server's memory)", "/v1/completions",
     GOOD | {"prompt": ["a"] * 16_385}, 400, "prompt"),
    ("20,000 chat messages", "/v1/chat/completions", CHAT | {"messages": CHAT["messages"] * 20_000}, 400, "messages"),
    ("17 prompts x n=1,000", "/v1/completions", GOOD | {"prompt": ["a"] * 17, "n": 1000, "temperature": 1}, 400,
     "prompt"),
    ("n of 3.8e9 (each sample made at once took the process's memory)", "/v1/completions",
     GOOD | {"n": 3_783_894_413}, 400, "n"),
    ("chat n beyond max_num_samples", "/v1/chat/completions", CHAT | {"n": 5000}, 400, "n"),
    ("max_tokens 0 without echo", "/v1/completions", GOOD | {"max_tokens": 0}, 400, "max_tokens"),
    ("max_completion_tokens 0", "/v1/chat/completions", CHAT | {"max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("top_logprobs without logprobs", "/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400, "top_logprobs"),
    ("empty prompt", "/v1/completions", GOOD | {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", "/v1/completions", GOOD | {"prompt": []}, 400, "prompt"),
    ("prompt longer than max_model_len", "/v1/completions", GOOD | {"prompt": "x " * 300}, 400, "prompt"),
    ("lone surrogate in a prompt", "/v1/completions", GOOD | {"prompt": "a\ud800b"}, 400, "prompt"),
    ("lone surrogate in a chat message", "/v1/chat/completions",
     CHAT | {"messages": [{"role": "user", "content": "a\udc00"}]}, 400, "messages"),
    ("chat content part with text 5", "/v1/chat/completions",
     CHAT | {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages"),
    ("chat content part with text null", "/v1/chat/completions",
     CHAT | {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, 400, "messages"),
    ("chat image part", "/v1/chat/completions",
     CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    ("no messages", "/v1/chat/completions", CHAT | {"messages": []}, 400, "messages"),
    ("a message without a role", "/v1/chat/completions", CHAT | {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("unknown model", "/v1/completions", GOOD | {"model": "gpt-4"}, 404, "model"),
    # OpenAI fields pagedllm does not serve: refused by name, never answered as if absent
    ("suffix (insertion)", "/v1/completions", GOOD | {"suffix": "}"}, 400, "suffix"),
    ("tools with tool_choice auto", "/v1/chat/completions",
     CHAT | {"tools": [TOOL], "tool_choice": "auto"}, 400, "tool_choice"),
    ("tools with no tool_choice (OpenAI's auto)", "/v1/chat/completions", CHAT | {"tools": [TOOL]}, 400,
     "tool_choice"),
    ("tools with a function they do not give", "/v1/chat/completions",
     CHAT | {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "find"}}}, 400,
     "tool_choice"),
    ("tool_choice a function without its name", "/v1/chat/completions",
     CHAT | {"tools": [TOOL], "tool_choice": {"type": "function", "function": {}}}, 400, "tool_choice"),
    ("tools that are not functions", "/v1/chat/completions",
     CHAT | {"tools": [{"type": "code_interpreter"}], "tool_choice": "required"}, 400, "tools"),
    ("a tool's parameters of no JSON schema", "/v1/chat/completions",
     CHAT | {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
             "tool_choice": "required"}, 400, "tools"),
    ("tool_choice required beside a response_format", "/v1/chat/completions",
     CHAT | {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, 400,
     "tool_choice"),
    ("tool_choice of another word", "/v1/chat/completions", CHAT | {"tools": [TOOL], "tool_choice": "any"}, 400,
     "tool_choice"),
    ("legacy functions", "/v1/chat/completions", CHAT | {"functions": [TOOL["function"]]}, 400, "functions"),
    ("beam search", "/v1/completions", GOOD | {"use_beam_search": True}, 400, "use_beam_search"),
    ("priority", "/v1/chat/completions", CHAT | {"priority": -1}, 400, "priority"),
    ("chat_template_kwargs naming the template's own arguments", "/v1/chat/completions",
     CHAT | {"chat_template_kwargs": {"tokenize": True}}, 400, "messages"),
    ("chat_template_kwargs as a list", "/v1/chat/completions", CHAT | {"chat_template_kwargs": [1]}, 400,
     "chat_template_kwargs"),
    ("continue_final_message with add_generation_prompt", "/v1/chat/completions",
     CHAT | {"continue_final_message": True}, 400, "messages"),
    ("include_reasoning as a string", "/v1/chat/completions", CHAT | {"include_reasoning": "no"}, 400,
     "include_reasoning"),
    ("include_reasoning null", "/v1/chat/completions", CHAT | {"include_reasoning": None}, 400, "include_reasoning"),
    # bodies that are not what a route takes
    ("a body that is not UTF-8", "/v1/completions", b"\xff\xfe\x00{", 400, None),
    ("a body that is not JSON", "/v1/completions", b"{", 400, None),
    ("a JSON list as the body", "/v1/completions", [1, 2], 400, None),
    ("no body", "/v1/chat/completions", b"", 400, None),
    ("user as a number", "/v1/completions", GOOD | {"user": 5}, 400, "user"),
    ("a message's name as a number", "/v1/chat/completions",
     CHAT | {"messages": [{"role": "user", "content": "hi", "name": 5}]}, 400, "messages"),
    # /tokenize and /detokenize
    ("tokenize with neither prompt nor messages", "/tokenize", {"model": "tiny"}, 400, "prompt"),
    ("tokenize a lone surrogate", "/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
    ("detokenize -1", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("detokenize a string", "/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("detokenize null", "/detokenize", {"tokens": None}, 400, "tokens"),
    ("detokenize 5", "/detokenize", {"tokens": 5}, 400, "tokens"),
    ("detokenize 2**70", "/detokenize", {"tokens": [2**70]}, 400, "tokens"),
    ("detokenize outside the vocabulary", "/detokenize", {"tokens": [99999]}, 400, "tokens"),
    ("detokenize booleans", "/detokenize", {"tokens": [True]}, 400, "tokens"),
]


@pytest.mark.parametrize("path, body, status, param", [row[1:] for row in ABUSE], ids=[row[0] for row in ABUSE])
def test_hostile_request_gets_an_openai_error_and_hurts_nobody(server, good_text, path, body, status, param):
    _, url = server
    assert_openai_error(*send(url, "POST", path, body), status, param)
    assert_still_serving(url, good_text)


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/no/such/route", 404), ("GET", "/v1/completions", 405), ("DELETE", "/health", 405),
])
def test_routes_and_methods_that_do_not_exist_get_openai_errors(server, method, path, status):
    _, url = server
    assert_openai_error(*send(url, method, path), status)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/rerank", "/v1/audio/transcriptions"])
def test_routes_for_other_kinds_of_model_say_so(server, path):
    """vLLM serves these for embedding, scoring and speech models: a client that calls one here is
    told it is not served and why, in OpenAI's error JSON."""
    _, url = server
    status, headers, body = send(url, "POST", path, {"model": "tiny", "input": "hi"})
    assert_openai_error(status, headers, body, 404)
    assert "is not served" in json.loads(body)["error"]["message"]


def test_health_answers_with_a_json_body(server):
    _, url = server
    status, headers, body = send(url, "GET", "/health")
    assert status == 200 and headers["content-type"] == "application/json" and json.loads(body) == {"status": "ok"}


def test_tokenize_takes_a_chat_body(server):
    _, url = server
    status, _, body = send(url, "POST", "/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and json.loads(body)["count"] > 0


def test_more_samples_than_the_batch_holds_wait_their_turn(server):
    """n larger than max_num_seqs (256 here): the samples beyond the batch wait, as in vLLM."""
    _, url = server
    status, _, body = send(url, "POST", "/v1/completions", GOOD | {"n": 257, "temperature": 1, "max_tokens": 2,
                                                                    "ignore_eos": True})
    assert status == 200
    choices = json.loads(body)["choices"]
    assert sorted(c["index"] for c in choices) == list(range(257)) and all(c["finish_reason"] for c in choices)


def raw_exchange(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    return raw


def test_bodies_over_the_limit_get_413(server, good_text):
    """A declared Content-Length over --max-request-bytes is refused before the body is read; a
    chunked body is cut off as soon as it grows past it."""
    _, url = server
    declared = raw_exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3000001\r\n\r\n")
    assert declared.startswith(b"HTTP/1.1 413") and b'"RequestTooLargeError"' in declared
    chunk = b"x" * 1_000_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    streamed = raw_exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                 b"Content-Type: application/json\r\n\r\n" + chunked)
    assert streamed.startswith(b"HTTP/1.1 413") and b'"RequestTooLargeError"' in streamed
    assert_still_serving(url, good_text)


def test_half_sent_body_times_out_with_408(server, good_text):
    _, url = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"model\": \"ti")
        start = time.monotonic()
        assert_still_serving(url, good_text)  # others are served meanwhile
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 408") and b'"RequestTimeoutError"' in raw
    assert time.monotonic() - start < 5


def test_connection_that_never_sends_a_request_is_closed(server):
    _, url = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/comp")  # a head that never ends
        start = time.monotonic()
        assert sock.recv(100) == b""  # closed by the server
    assert 1 <= time.monotonic() - start < 5


@pytest.mark.parametrize("head", [b"X-Big: " + b"a" * (4 << 20), b"".join(b"X-%d: y\r\n" % i for i in range(400_000))])
def test_an_endless_request_head_is_refused_not_kept(server, head):
    """One header growing without end, or headers without end: 400 and a closed connection once the
    head passes its cap, not the server's memory filling up; the others are served meanwhile."""
    _, url = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        try:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + head)
        except OSError:  # the server closed the connection while it was still being sent
            pass
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 400
    status, _, _ = send(url, "GET", "/health")
    assert status == 200


def test_a_large_body_that_arrives_at_once_is_not_taken_for_a_long_head(server, good_text):
    """A request whose head and 100 KB body come in one read is served (the head cap counted the
    whole read when the request ended inside it, and refused it as a head past 64 KiB)."""
    _, url = server
    body = json.dumps(GOOD).encode()[:-1] + b" " * 100_000 + b"}"
    reply = raw_exchange(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"] == good_text


@pytest.mark.parametrize("request_bytes", [b"NOT HTTP AT ALL\r\n\r\n", b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n"])
def test_a_request_that_is_not_http_gets_openai_error_json(server, request_bytes):
    _, url = server
    head, body = raw_exchange(url, request_bytes).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == 400
    assert send(url, "GET", "/health")[0] == 200


def slowest_health_during(url: str, action) -> tuple[object, float]:
    """``action()``'s result, and the longest /health took while it ran (asked every 10 ms)."""
    done, slowest = threading.Event(), [0.0]

    def poll():
        while not done.is_set():
            start = time.monotonic()
            assert send(url, "GET", "/health")[0] == 200
            slowest[0] = max(slowest[0], time.monotonic() - start)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        result = action()
        time.sleep(0.3)
    finally:
        done.set()
        poller.join()
    return result, slowest[0]


HUGE_BODIES = {
    "a 2.5 MB prompt (tokenized)": GOOD | {"prompt": "def f(x): return x\n" * 130_000},
    "500,000 one-token prompts (the body validated)": GOOD | {"prompt": [[5]] * 500_000},
    "a logit_bias of 220,000 tokens (its values checked)": GOOD | {"logit_bias": {str(i): 1 for i in range(220_000)}},
}


@pytest.mark.parametrize("body", HUGE_BODIES.values(), ids=HUGE_BODIES.keys())
def test_huge_body_does_not_stall_other_clients(server, body):
    """What a large body costs runs off the event loop (its validation in a process of its own: the
    GIL is held throughout), so /health answers meanwhile; each is then refused (too long, too many
    prompts, token ids outside the vocabulary)."""
    _, url = server
    data = json.dumps(body).encode()  # (here: this process's GIL is the in-process server's too)
    status, slowest = slowest_health_during(url, lambda: send(url, "POST", "/v1/completions", data)[0])
    assert status == 400
    assert slowest < 0.25


@pytest.mark.parametrize("path, body", [("/v1/completions", GOOD | {"n": 3, "temperature": 1, "logprobs": 5}),
                                        ("/v1/chat/completions", CHAT | {"n": 3, "logprobs": True, "top_logprobs": 5})],
                         ids=["completions", "chat"])
def test_a_whole_response_is_built_off_the_event_loop(server, path, body, monkeypatch):
    """A non-streamed response is built and dumped in a worker thread: 64 samples of 400 tokens with
    20 logprobs each are ~0.3 s of Python and JSON, during which the event loop served no one (the
    demo model's server: /health 0.47-0.53 s, now 0.16-0.18)."""
    import asyncio

    from pagedllm.entrypoints.openai import serving

    on_the_loop = []

    def watched(build):
        def run(*args, **kwargs):
            on_the_loop.append(asyncio._get_running_loop() is not None)
            return build(*args, **kwargs)
        return run

    monkeypatch.setattr(serving.OpenAIServing, "_completion_choice", watched(serving.OpenAIServing._completion_choice))
    monkeypatch.setattr(serving, "chat_logprobs", watched(serving.chat_logprobs))
    status, _, response = send(server[1], "POST", path, body)
    assert status == 200, response
    assert len(json.loads(response)["choices"]) == 3
    assert on_the_loop == [False] * 3


def test_thousands_of_prompts_and_their_client_leaving_stall_nobody(server, good_text):
    """A request of 16,384 prompts starts them a few at a time, checked off the event loop; its
    client then leaves, and its requests are aborted in one pass over the queues (one pass each
    took the engine's thread ~O(n^2): 100,000 held every other client for minutes, and a stop
    hung behind them). /health answers throughout and the next request is served."""
    gc.collect()  # the engines earlier tests dropped shut down now (their collection holds the GIL), not below
    _, url = server
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(GOOD | {"prompt": ["a"] * 16_384, "max_tokens": 50}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n" \
           "Content-Type: application/json\r\n\r\n"
    slowest, deadline = 0.0, time.monotonic() + 4
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + data)
        while time.monotonic() < deadline:
            start = time.monotonic()
            assert send(url, "GET", "/health")[0] == 200
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.05)
    deadline = time.monotonic() + 2  # and as its requests are aborted
    while time.monotonic() < deadline:
        start = time.monotonic()
        assert send(url, "GET", "/health")[0] == 200
        slowest = max(slowest, time.monotonic() - start)
    assert slowest < 2.0  # the stall it guards against held /health for minutes; 0.4-1.02 s here on 2 busy cores
    assert_still_serving(url, good_text)


def test_a_request_that_fails_in_the_engine_fails_alone(tiny_checkpoint, good_text, monkeypatch):
    """An error pinned on one request (here its text breaks: in the engine process, which decodes
    what stop strings need, or in this one, which decodes the rest) ends it with OpenAI's error
    JSON, a 500 or a stream's error event, and frees its blocks; the requests beside it, and the
    next ones, are served."""
    from pagedllm.engine import progress
    from pagedllm.engine.data_parallel import start_method
    from pagedllm.engine.llm_engine import LLMEngine

    if start_method() != "fork":
        pytest.skip("the engine process is spawned here (CUDA is initialised): it would not inherit the fault")
    extend_text = LLMEngine._extend_text

    def broken(self, request):
        if request.prompt == "poison":
            raise RuntimeError("this request's text broke")
        return extend_text(self, request)

    monkeypatch.setattr(LLMEngine, "_extend_text", broken)  # the engine process forked from here keeps it
    srv, uv, url = start_server(tiny_checkpoint("llama"), "--served-model-name", "tiny")
    monkeypatch.undo()
    extend = progress._extend

    def broken_here(copy, tokens):
        if copy.prompt == "poison here":
            raise RuntimeError("this request's text broke here")
        extend(copy, tokens)

    monkeypatch.setattr(progress, "_extend", broken_here)  # the driver's copies: this process
    poison = {"prompt": "poison", "stop": ["never in the text"]}  # stop strings: decoded in the engine process
    results = {}

    def healthy(i):
        results[i] = send(url, "POST", "/v1/completions", GOOD)

    try:
        neighbours = [threading.Thread(target=healthy, args=(i,)) for i in range(4)]
        for thread in neighbours:
            thread.start()
        status, headers, body = send(url, "POST", "/v1/completions", GOOD | poison)
        assert_openai_error(status, headers, body, 500)
        assert "this request's text broke" in json.loads(body)["error"]["message"]
        status, headers, body = send(url, "POST", "/v1/completions", GOOD | {"prompt": "poison here", "stream": True})
        assert status == 200 and "this request's text broke here" in body.decode()
        status, headers, body = send(url, "POST", "/v1/completions", GOOD | {"prompt": "poison here"})
        assert_openai_error(status, headers, body, 500)
        assert "this request's text broke here" in json.loads(body)["error"]["message"]
        status, _, body = send(url, "POST", "/v1/completions", GOOD | poison | {"prompt": ["fine", "poison"],
                                                                              "stream": True})
        events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"].startswith("the request failed in the engine: prompt 1")
        for thread in neighbours:
            thread.join()
        assert all(r[0] == 200 and json.loads(r[2])["choices"][0]["text"] == good_text for r in results.values())
        assert_still_serving(url, good_text)
        deadline = time.time() + 10
        while (srv.engine.num_unfinished_requests or srv.engine.stats.kv_blocks_in_use) and time.time() < deadline:
            time.sleep(0.05)
        assert srv.engine.stats.kv_blocks_in_use == 0
    finally:
        uv.should_exit = True
        srv.engine.shutdown()


def serve_in_a_thread(model: str, monkeypatch) -> tuple:
    """``api_server.serve`` as ``pagedllm serve`` runs it, in a thread: the server it built, the
    thread, where its exit code goes, and its URL, once /health answers."""
    from pagedllm.entrypoints.openai import api_server

    args = server_args(model, "--served-model-name", "tiny")
    built = {}
    build_server = api_server.build_server
    monkeypatch.setattr(api_server, "build_server", lambda *a: built.setdefault("server", build_server(*a)))
    exit_code = {}
    thread = threading.Thread(target=lambda: exit_code.setdefault("code", api_server.serve(args)))
    thread.start()
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if send(url, "GET", "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.1)
    return built["server"], thread, exit_code, url


def test_a_killed_engine_process_ends_the_streams_and_the_server_exits_1(tiny_checkpoint, monkeypatch):
    """The engine process killed mid-stream (the OOM killer, a crashed driver): the stream ends
    with an error event naming it, /health says 503, and serve() returns 1."""
    assert gc.get_freeze_count() == 0
    server, thread, exit_code, url = serve_in_a_thread(tiny_checkpoint("llama"), monkeypatch)
    assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's full passes while it serves
    process = server.engine.engine.replicas[0].process
    assert process.pid != os.getpid() and process.is_alive()  # the engine core runs in a process of its own
    try:
        connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        connection.request("POST", "/v1/completions", json.dumps(GOOD | {"max_tokens": 200, "ignore_eos": True,
                                                                         "stream": True}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.readline().startswith(b"data: ")  # streaming has begun
        os.kill(process.pid, signal.SIGKILL)
        events = [line.strip().removeprefix(b"data: ").decode() for line in response.read().split(b"\n\n")
                  if line.strip()]
        assert events[-1] == "[DONE]"
        assert "the engine process died with exit code -9" in json.loads(events[-2])["error"]["message"]
        thread.join(timeout=30)
        assert not thread.is_alive() and exit_code["code"] == 1
        assert gc.get_freeze_count() == 0  # and back in them once it is done: this process goes on
    finally:
        server.engine.on_dead()
        thread.join(timeout=30)


def test_a_dead_engine_answers_what_it_can_and_the_server_exits_1(tiny_checkpoint, monkeypatch):
    """An error the engine cannot survive: running streams end with an error event, /health says
    503 while the server stops, and serve() returns 1 so a supervisor restarts it."""
    from pagedllm.engine.data_parallel import start_method
    from pagedllm.engine.llm_engine import LLMEngine

    if start_method() != "fork":
        pytest.skip("the engine process is spawned here (CUDA is initialised): it would not inherit the fault")

    step = LLMEngine.step
    calls = {"n": 0}

    def dies_on_the_fifth_step(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("CUDA error: device lost (simulated)")
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", dies_on_the_fifth_step)  # the engine process forked from here keeps it
    server, thread, exit_code, url = serve_in_a_thread(tiny_checkpoint("llama"), monkeypatch)
    health = {}
    stop = server.engine.on_dead

    def stop_after_a_look():
        health["during"] = send(url, "GET", "/health")
        stop()

    server.engine.on_dead = stop_after_a_look
    try:
        status, _, body = send(url, "POST", "/v1/completions", GOOD | {"max_tokens": 50, "ignore_eos": True,
                                                                        "stream": True})
        events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
        assert status == 200 and events[-1] == "[DONE]"
        assert "device lost" in json.loads(events[-2])["error"]["message"]
        thread.join(timeout=30)
        assert not thread.is_alive() and exit_code["code"] == 1
        assert_openai_error(*health["during"], 503)
    finally:
        stop()
        thread.join(timeout=30)
