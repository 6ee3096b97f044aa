"""vLLM's quickstart as its users know it: the server started as a module on a hub id found in
the local HF cache, then a chat from the current openai client and from the legacy 0.x one."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY_OPENAI = os.path.join(ROOT, ".venv", "legacy-openai")
LEGACY_CLIENT = """
import json, sys
import openai
openai.api_key = "EMPTY"
openai.api_base = sys.argv[1]
reply = openai.ChatCompletion.create(model="facebook/opt-1.3b", messages=[{"role": "user", "content": "Hello!"}],
                                     max_tokens=8, temperature=0)
print(json.dumps({"version": openai.version.VERSION, "content": reply["choices"][0]["message"]["content"]}))
"""


@pytest.fixture(scope="module")
def quickstart_server(tiny_checkpoint, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-cache")
    commit = "0" * 40
    repo = cache / "models--facebook--opt-1.3b"
    shutil.copytree(tiny_checkpoint("opt"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PAGEDLLM_LOGGING_LEVEL="WARNING")
    server = subprocess.Popen(
        [sys.executable, "-m", "pagedllm.entrypoints.openai.api_server", "--model", "facebook/opt-1.3b",
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and server.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    if server.poll() is not None:
        pytest.fail(f"the server exited: {server.stdout.read()}")
    yield url
    server.terminate()
    output = server.communicate(timeout=30)[0]
    assert "no chat template" in output  # the one-time warning about the built-in template


def test_current_openai_client_chats(quickstart_server):
    client = openai.OpenAI(base_url=f"{quickstart_server}/v1", api_key="EMPTY")
    reply = client.chat.completions.create(model="facebook/opt-1.3b", messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=8, temperature=0)
    assert reply.model == "facebook/opt-1.3b" and reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 8 and reply.usage.total_tokens > reply.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["facebook/opt-1.3b"]


def test_legacy_openai_client_chats(quickstart_server):
    assert os.path.isfile(os.path.join(LEGACY_OPENAI, "openai", "__init__.py")), "scripts/venv.sh installs it"
    env = dict(os.environ, PYTHONPATH=LEGACY_OPENAI)
    run = subprocess.run([sys.executable, "-c", LEGACY_CLIENT, f"{quickstart_server}/v1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout.strip().splitlines()[-1])
    assert reply["version"].startswith("0.") and reply["content"]
    current = openai.OpenAI(base_url=f"{quickstart_server}/v1", api_key="EMPTY").chat.completions.create(
        model="facebook/opt-1.3b", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
    assert reply["content"] == current.choices[0].message.content


def test_pagedllm_serve_command(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tiny_checkpoint("gpt2")
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "pagedllm"), "serve", path,
                               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, models = time.time() + 120, None
        while models is None and time.time() < deadline and server.poll() is None:
            try:
                models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1))
            except OSError:
                time.sleep(0.2)
        assert models is not None and models["data"][0]["id"] == path
    finally:
        server.terminate()
        server.wait(timeout=30)
