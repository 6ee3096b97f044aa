"""``--api-server-count N``: N HTTP processes on one port, each with its own pipe to the engine
process, watched by the process that started them (the server as a user runs it: a subprocess)."""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pagedllm import LLM, SamplingParams

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pagedllm-demo")
PROMPTS = [f"def f{i}(x):" for i in range(8)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = _parent(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _any_left(pids: set[int]) -> list[int]:
    """Those still running after a few seconds (spawn's resource tracker leaves when it sees its
    parent gone, a moment after)."""
    deadline = time.monotonic() + 10
    while (left := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _exit_status(process: subprocess.Popen, children: set[int], timeout: float = 60) -> int:
    """The server's exit status; if it has not exited within ``timeout``, the test fails saying what
    still ran and what the server wrote (every process is killed first: they hold its stderr open)."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        running = {}
        for pid in {process.pid} | children | _descendants(process.pid):
            try:
                with open(f"/proc/{pid}/cmdline") as f:
                    running[pid] = f.read().replace("\0", " ")[:120]
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        process.wait()
        pytest.fail(f"the server did not exit within {timeout:g} s; running then: {running}; "
                    f"its log: {process.stderr.read()[-4000:]}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def server(request):
    """The server in a subprocess: ``--api-server-count 2``, or the count given as the fixture's param."""
    port, param = _free_port(), getattr(request, "param", 2)
    count, sigint_ignored = (param, False) if isinstance(param, int) else param
    # (sigint_ignored: started as `cmd &` from a script starts it, with SIGINT ignored)
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    process = subprocess.Popen([sys.executable, "-m", "pagedllm", "serve", DEMO, "--device", "cpu", "--port", str(port),
                                "--api-server-count", str(count), "--max-model-len", "512"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start: {process.stderr.read()[-3000:]}")
            time.sleep(0.1)
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()


def _post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read()


def test_two_api_server_processes_serve_one_engine_and_stop_together_at_once(server):
    """Then, after ~1,200 more steps, SIGTERM stops every process within seconds. Every engine step
    sends its stats to every driver, the watching process too (which has no requests): it must keep
    reading them, or after a few hundred steps its full pipe holds the engine's stop up (the engine
    would be killed 30 s later)."""
    process, url = server
    children = _descendants(process.pid)
    assert len(children) >= 3  # the engine process and the two API servers (and spawn's resource tracker)

    def complete(i: int) -> str:
        body = {"model": DEMO, "prompt": PROMPTS[i], "max_tokens": 12, "temperature": 0}
        if i % 2:  # streamed
            events = _post(url, body | {"stream": True}).decode().split("\n\n")
            assert events[-2] == "data: [DONE]"
            return "".join(json.loads(e[len("data: "):])["choices"][0]["text"] for e in events[:-2])
        return json.loads(_post(url, body))["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(complete, range(8)))
    with LLM(DEMO, device="cpu", max_model_len=512) as llm:
        expected = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12),
                                                            use_tqdm=False)]
    assert texts == expected
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:  # both processes' requests, summed
        metrics = response.read().decode()
    assert 'pagedllm:request_success_total{finished_reason="length"} 8.0' in metrics
    for reason in ("stop", "abort", "error"):  # made at start, so that no process makes its file as another reads
        assert f'pagedllm:request_success_total{{finished_reason="{reason}"}} 0.0' in metrics
    assert "pagedllm:generation_tokens_total 96.0" in metrics  # the engine's own count, as each process has it

    for _ in range(3):  # ~1,200 steps
        _post(url, {"model": DEMO, "prompt": "x", "max_tokens": 400, "ignore_eos": True})
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert time.monotonic() - start < 15
    assert not _any_left(children)


@pytest.mark.parametrize("killed", ["api server", "engine"])
def test_a_killed_process_stops_the_others_and_the_server_exits_1(server, killed):
    process, url = server
    children = _descendants(process.pid)
    cmdlines = {pid: open(f"/proc/{pid}/cmdline", "rb").read() for pid in children}
    own_cmdline = open(f"/proc/{process.pid}/cmdline", "rb").read()
    api_servers = [pid for pid, c in cmdlines.items()  # (not their body-validating workers, spawned too)
                   if b"spawn_main" in c and b"resource_tracker" not in c and _parent(pid) == process.pid]
    engines = [pid for pid, c in cmdlines.items() if c == own_cmdline]  # forked from the server's process
    assert len(api_servers) == 2 and len(engines) == 1
    os.kill((api_servers if killed == "api server" else engines)[0], signal.SIGKILL)
    assert process.wait(timeout=60) == 1
    gone = "pagedllm-api[01]" if killed == "api server" else "engine process 0"
    assert re.search(f"ERROR .*pagedllm: {gone} exited: stopping the server, status 1", process.stderr.read())
    assert not _any_left(children)


def test_a_client_that_hangs_up_mid_stream_frees_its_request_in_the_engine(server):
    process, url = server
    request = urllib.request.Request(url + "/v1/completions", json.dumps(
        {"model": DEMO, "prompt": "def f(", "max_tokens": 200, "stream": True, "ignore_eos": True}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.readline()  # the first event: then hang up
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as metrics:
            text = metrics.read().decode()
        if "pagedllm:num_requests_running 0.0" in text and 'finished_reason="abort"} 1.0' in text:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.1)
    assert json.loads(_post(url, {"model": DEMO, "prompt": "x", "max_tokens": 3}))["choices"][0]["text"]


def test_a_killed_watching_process_leaves_no_process_behind(server):
    """SIGKILL for the process a supervisor started: its engine process sees its first driver's pipe
    close and ends; the API servers (in a process group of their own) then see the engine's pipes
    close and stop."""
    process, url = server
    children = _descendants(process.pid)
    process.kill()
    process.wait()
    deadline = time.monotonic() + 60
    while (left := [pid for pid in children if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left


@pytest.mark.parametrize("server, stop", [(1, signal.SIGINT), (1, signal.SIGTERM), (2, signal.SIGINT),
                                          ((2, True), signal.SIGINT), ((1, True), signal.SIGINT)],
                         indirect=["server"], ids=["one process, Ctrl-C", "one process, SIGTERM", "two, Ctrl-C",
                                                   "two, started in the background, SIGINT",
                                                   "one process, started in the background, SIGINT"])
def test_a_server_stopped_after_serving_exits_0_without_a_traceback(server, stop):
    """Ctrl-C is how a server is stopped: after it has served (a stream, here), it ends with status 0
    and the engine process with it, and says nothing of a KeyboardInterrupt. Started in the
    background by a script (SIGINT ignored, as `&` leaves it), a SIGINT stops it too: the watching
    process of two API servers ignored it (the test suite run with `&` hung here)."""
    process, url = server
    children = _descendants(process.pid)
    events = _post(url, {"model": DEMO, "prompt": PROMPTS[0], "max_tokens": 8, "stream": True}).decode()
    assert events.endswith("data: [DONE]\n\n")
    process.send_signal(stop)
    assert _exit_status(process, children) == 0
    err = process.stderr.read()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert not _any_left(children)


def test_a_stop_before_uvicorn_took_over_still_stops_the_server():
    """SIGTERM after the server's own handlers are set but before uvicorn has set its (an API server
    still starting when a two-process server is stopped): the server starts and stops at once,
    status 0, where the stop was lost and the server served on (its watcher killed it 30 s later)."""
    script = (
        "import os, signal, sys, uvicorn\n"
        "from pagedllm.entrypoints.openai import api_server\n"
        "run = uvicorn.Server.run\n"
        "def late_run(self, *args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return run(self, *args, **kwargs)\n"
        "uvicorn.Server.run = late_run\n"
        "api_server.main(sys.argv[1:])\n")
    process = subprocess.Popen([sys.executable, "-c", script, "--model", DEMO, "--device", "cpu", "--port",
                                str(_free_port()), "--max-model-len", "512"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert _exit_status(process, set()) == 0
    assert "Traceback" not in process.stderr.read()


def test_a_server_killed_while_starting_leaves_no_semaphore_behind():
    """SIGTERM while an API server still starts (a two-process server stopped right after it
    answered /health) ends it by the default handler, before its own are set: nothing it made
    may be left for the resource tracker to clean up, which warned of "leaked semaphore objects"
    (its body-validating pool was started before the handlers were set)."""
    script = (
        "import os, signal, sys\n"
        "from pagedllm.entrypoints.openai import api_server\n"
        "make = api_server.uvicorn_server\n"
        "def killed_first(*args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return make(*args)\n"
        "api_server.uvicorn_server = killed_first\n"
        "api_server.main(sys.argv[1:])\n")
    process = subprocess.run([sys.executable, "-c", script, "--model", DEMO, "--device", "cpu", "--port",
                              str(_free_port()), "--max-model-len", "512"], capture_output=True, text=True, timeout=120)
    assert process.returncode == -signal.SIGTERM
    assert "leaked" not in process.stderr  # (read to its end: the tracker, which outlives it, writes there too)


@pytest.mark.parametrize("server", [1], indirect=True)
def test_a_server_stopped_while_serving_tells_each_client_why_and_exits_0(server):
    """Requests that cannot finish within the 10 s a stop allows (256 prompts of 500 tokens in one
    request, and a stream) end with OpenAI's error JSON, 503 (the stream with an error event, then
    [DONE]): uvicorn would cancel them, a plain-text 500 and a stream cut off, with a traceback."""
    process, url = server
    long = {"model": DEMO, "max_tokens": 500, "ignore_eos": True}
    answers = {}

    def ask(name: str, body: dict) -> None:
        try:
            answers[name] = (200, _post(url, body))
        except urllib.error.HTTPError as err:
            answers[name] = (err.code, err.read())

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        pool.submit(ask, "batch", long | {"prompt": ["x"] * 256})
        pool.submit(ask, "stream", long | {"prompt": "x", "stream": True})
        time.sleep(3)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    assert time.monotonic() - start < 25
    status, body = answers["batch"]
    assert status == 503 and json.loads(body)["error"]["message"] == "the server is shutting down"
    status, body = answers["stream"]
    events = body.decode().split("\n\n")
    assert status == 200 and events[-2:] == ["data: [DONE]", ""]
    assert json.loads(events[-3][len("data: "):])["error"]["code"] == 503
    assert "Traceback" not in process.stderr.read()


@pytest.mark.parametrize("server", [1], indirect=True)
def test_a_killed_server_leaves_no_body_validating_process_behind(server):
    """A body over 16 KB is validated in a worker process (started with the server): SIGKILL for
    the server ends it too, and the engine process."""
    process, url = server
    with pytest.raises(urllib.error.HTTPError) as err:  # 3,000 prompts of 40 tokens: too long for max_model_len
        _post(url, {"model": DEMO, "prompt": [list(range(40)) for _ in range(3000)], "max_tokens": 500})
    assert err.value.code == 400
    children = _descendants(process.pid)
    cmdlines = [open(f"/proc/{pid}/cmdline", "rb").read() for pid in children]
    assert any(b"spawn_main" in c for c in cmdlines)  # the worker
    process.kill()
    process.wait()
    assert not _any_left(children)


def test_a_body_worker_still_starting_does_not_hold_its_servers_exit_up():
    """A server stopped right after it started ends at once: its body-validating worker, still
    importing torch, is killed, where shutting its pool down waited for it (2.3 s on an idle 2-core
    machine; on a busy one over a minute: a two-process server's Ctrl-C timed out in the suite)."""
    import multiprocessing

    from pagedllm.entrypoints.openai.bodies import BodyReader

    before = set(multiprocessing.active_children())
    reader = BodyReader()
    reader.start()
    workers = set(multiprocessing.active_children()) - before
    assert workers
    start = time.monotonic()
    reader.shutdown()
    assert time.monotonic() - start < 1.0
    assert not any(worker.is_alive() for worker in workers)
