"""pagedllm run-batch: OpenAI Batch API files run through the server's routes in-process, results in
OpenAI's batch output format, in order, resumable; bad envelopes named before anything loads."""

import copy
import http.server
import json
import threading

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints.cli import main
from pagedllm.testing import build_tiny_checkpoint

api_server = pytest.importorskip("pagedllm.entrypoints.openai.api_server")  # (fastapi: the server's extra)
run_batch_module = pytest.importorskip("pagedllm.entrypoints.openai.run_batch")

PROMPTS = ["def main():", "import os", "class A:", "x = 1", "for i in range(3):"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return build_tiny_checkpoint("llama", str(tmp_path_factory.mktemp("batch")), tokenizer=chat_tokenizer)


def _no_server(*args, **kwargs):
    raise AssertionError("the engine was started")


@pytest.fixture
def nothing_loads(monkeypatch):
    monkeypatch.setattr(api_server, "build_server", _no_server)


TOOL = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"], "additionalProperties": False}}}


def line(custom_id, url, body, method="POST"):
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def completion(custom_id, prompt, **extra):
    return line(custom_id, "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                                              **extra})


def write_lines(path, items):
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))


def run_batch(model, inp, out, *extra):
    return main(["run-batch", "-i", str(inp), "-o", str(out), "--model", model, "--served-model-name", "m",
                 "--device", "cpu", *extra])


def results(path):
    return [json.loads(text) for text in path.read_text().splitlines()]


def test_each_route_answers_as_the_server_in_the_inputs_order(model, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [completion(f"c{i}", p) for i, p in enumerate(PROMPTS)] + [
        line("chat", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                              "max_completion_tokens": 5, "temperature": 0}),
        line("resp", "/v1/responses", {"model": "m", "input": "hello", "max_output_tokens": 4, "temperature": 0}),
        line("bare", "/v1/completions", {"prompt": "x", "max_tokens": 3}),  # no model named: the one run here
        completion("too-long", "x " * 400),  # past max_model_len (256): this request fails alone
        completion("bad-field", "x", max_tokens="many"),
        completion("no-n", "x", n=0),
        line("tool", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                              "tools": [TOOL], "max_tokens": 40, "temperature": 0,
                                              "tool_choice": {"type": "function", "function": {"name": "pick"}}}),
    ])
    assert run_batch(model, inp, out) == 0
    lines = results(out)
    assert [r["custom_id"] for r in lines] == [f"c{i}" for i in range(5)] + ["chat", "resp", "bare", "too-long",
                                                                          "bad-field", "no-n", "tool"]
    expected = LLM(model, device="cpu").generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    for r, e in zip(lines, expected, strict=False):
        assert r["response"]["status_code"] == 200 and r["error"] is None
        assert r["response"]["body"]["choices"][0]["text"] == e.outputs[0].text
        assert r["response"]["request_id"] == r["response"]["body"]["id"] and r["id"].startswith("batch_req_")
    chat, resp = lines[5]["response"]["body"], lines[6]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 5
    assert resp["object"] == "response" and resp["usage"]["output_tokens"] == 4
    assert lines[7]["response"]["body"]["usage"]["completion_tokens"] == 3
    (call,) = lines[11]["response"]["body"]["choices"][0]["message"]["tool_calls"]  # a forced call, as the server's
    assert call["function"]["name"] == "pick" and json.loads(call["function"]["arguments"]) in ({"x": "a"}, {"x": "b"})
    for r, status, param in zip(lines[8:11], (400, 400, 400), ("prompt", "max_tokens", "n"), strict=True):
        assert r["response"]["status_code"] == status == r["error"]["code"]
        assert r["response"]["body"]["error"] == r["error"] and r["error"]["param"] == param


def test_a_request_that_hits_a_bug_fails_alone(model, tmp_path, monkeypatch):
    from pagedllm.entrypoints.openai.serving import OpenAIServing

    completions = OpenAIServing.completions

    async def buggy(self, body, raw):
        if body.prompt == "boom":
            raise RuntimeError("a bug")
        return await completions(self, body, raw)

    monkeypatch.setattr(OpenAIServing, "completions", buggy)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [completion("a", "x"), completion("b", "boom"), completion("c", "y")])
    assert run_batch(model, inp, out) == 0
    lines = results(out)
    assert [r["response"]["status_code"] for r in lines] == [200, 500, 200]
    assert lines[1]["error"]["message"] == "internal error: RuntimeError: a bug"


@pytest.mark.parametrize("bad, said", [
    ("{not json", "line 2: not a JSON object"),
    ("[1, 2]", "line 2: a request is a JSON object, not list"),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "line 2: custom_id must be"),
    (json.dumps(line("a", "/v1/completions", {})), "line 2: custom_id 'a' is an earlier line's too"),
    (json.dumps(line("b", "/v1/embeddings", {})), "line 2: url '/v1/embeddings' is not one of"),
    (json.dumps(line("b", "/v1/completions", {}, method="GET")), "line 2: method must be \"POST\""),
    (json.dumps(line("b", "/v1/completions", "prompt")), "line 2: body must be a JSON object"),
    (json.dumps(completion("b", "x", stream=True)), "line 2: body.stream must be false"),
    (b"\xff\xfe".decode("latin-1"), "line 2: not a JSON object"),
    (json.dumps(completion("b", "x", model="gpt-4o")), "line 2: body.model 'gpt-4o' is not the model run here ('m'"),
])
def test_a_bad_line_is_named_before_the_model_loads(model, tmp_path, capsys, nothing_loads, bad, said):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [completion("a", "x"), bad, completion("c", "y")])
    assert run_batch(model, inp, out) == 2
    assert said in capsys.readouterr().err and not out.exists()


def test_vllms_metrics_flags_serve_the_servers_metrics_while_it_runs(model, tmp_path, monkeypatch):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = []
    post = run_batch_module.post

    async def post_and_look(app, path, body):
        if not seen:  # (the metrics' own thread answers, whatever this loop does)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                seen.append(response.read().decode())
        return await post(app, path, body)

    monkeypatch.setattr(run_batch_module, "post", post_and_look)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [completion("a", "x")])
    assert run_batch(model, inp, out, "--enable-metrics", "--url", "127.0.0.1", "--port", str(port),
                     "--response-role", "assistant", "--enable-force-include-usage") == 0
    assert "pagedllm:num_requests_running" in seen[0]


@pytest.mark.parametrize("files, said", [
    (("missing.jsonl", "out.jsonl"), "--input-file: no file"),
    (("in.jsonl", "in.jsonl"), "--output-file: the same file as --input-file"),
    (("in.jsonl", "no/such/folder/out.jsonl"), "--output-file: no folder"),
    (("in.jsonl", "."), "is a directory"),
    (("in.jsonl", "out.jsonl", "--response-role", "user"), "--response-role: chat answers here are the assistant's"),
])
def test_files_that_cannot_be_read_or_written_are_named_first(model, tmp_path, capsys, nothing_loads, files, said):
    write_lines(tmp_path / "in.jsonl", [completion("a", "x")])
    with pytest.raises(SystemExit) as stopped:
        run_batch(model, *(tmp_path / name for name in files[:2]), *files[2:])
    assert stopped.value.code == 2 and said in capsys.readouterr().err


def test_an_empty_input_and_an_output_of_other_requests_are_refused(model, tmp_path, capsys, nothing_loads):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, ["", "  "])
    assert run_batch(model, inp, out) == 2 and "no requests in it" in capsys.readouterr().err
    write_lines(inp, [completion("a", "x"), completion("b", "y")])
    write_lines(out, [{"custom_id": "zz", "response": {}}])
    assert run_batch(model, inp, out) == 2 and "holds results of other requests" in capsys.readouterr().err
    write_lines(out, ["not a result"])
    assert run_batch(model, inp, out) == 2 and "line 1 is not a result line" in capsys.readouterr().err


def test_a_rerun_goes_on_after_the_results_written_and_a_torn_last_line(model, tmp_path, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [completion(f"c{i}", p) for i, p in enumerate(PROMPTS)])
    assert run_batch(model, inp, out) == 0
    whole = out.read_text().splitlines(keepends=True)
    out.write_text("".join(whole[:2]) + whole[2][:30])  # a crash while writing the third
    assert run_batch(model, inp, out) == 0
    again = out.read_text().splitlines(keepends=True)
    assert again[:2] == whole[:2] and [json.loads(t)["custom_id"] for t in again] == [f"c{i}" for i in range(5)]
    assert [json.loads(t)["response"]["body"]["choices"] for t in again] == \
        [json.loads(t)["response"]["body"]["choices"] for t in whole]
    monkeypatch.setattr(api_server, "build_server", _no_server)
    assert run_batch(model, inp, out) == 0  # all done already: nothing loads


@pytest.fixture
def http_files():
    """A local HTTP server: GET serves ``files[path]``, PUT stores the body there (as a presigned URL
    to object storage would)."""
    files = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in files:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])

        def do_PUT(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if files.get("refuse uploads"):
                self.send_error(503)
                return
            files[self.path] = body
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield files, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_input_and_output_urls_as_vllms_run_batch(model, tmp_path, http_files, capsys):
    files, url = http_files
    files["/in.jsonl"] = "".join(json.dumps(completion(f"c{i}", p)) + "\n" for i, p in enumerate(PROMPTS)).encode()
    assert run_batch(model, f"{url}/in.jsonl", f"{url}/out.jsonl", "--output-tmp-dir", str(tmp_path)) == 0
    uploaded = [json.loads(text) for text in files["/out.jsonl"].decode().splitlines()]
    assert [r["custom_id"] for r in uploaded] == [f"c{i}" for i in range(5)]
    assert all(r["response"]["status_code"] == 200 for r in uploaded)
    assert list(tmp_path.iterdir()) == []  # the local copy is gone once uploaded
    assert run_batch(model, f"{url}/missing.jsonl", f"{url}/out.jsonl") == 2
    assert "--input-file: cannot download" in capsys.readouterr().err


def test_a_failed_upload_keeps_the_results_for_the_next_run_to_upload(model, tmp_path, http_files, capsys,
                                                                       monkeypatch):
    files, url = http_files
    monkeypatch.setattr(run_batch_module, "_UPLOAD_WAIT_S", 0)
    files["refuse uploads"] = True
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [completion(f"c{i}", p) for i, p in enumerate(PROMPTS)])
    kept = tmp_path / "kept"
    kept.mkdir()
    assert run_batch(model, inp, f"{url}/out.jsonl", "--output-tmp-dir", str(kept)) == 1
    assert "cannot upload the results" in capsys.readouterr().err and "/out.jsonl" not in files
    [local] = kept.iterdir()
    results = local.read_text()
    assert len(results.splitlines()) == 5
    files["refuse uploads"] = False
    monkeypatch.setattr(api_server, "build_server", _no_server)  # the results are there: nothing runs again
    assert run_batch(model, inp, f"{url}/out.jsonl", "--output-tmp-dir", str(kept)) == 0
    assert files["/out.jsonl"].decode() == results and list(kept.iterdir()) == []
