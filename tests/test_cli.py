"""The pagedllm command line: generate (resumable dataset generation), help."""

import copy
import importlib.util
import json
import subprocess
import sys

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.entrypoints.cli import main
from pagedllm.testing import build_tiny_checkpoint

PROMPTS = ["def main():", "import os", "class A:", "x = 1", "for i in range(3):", "while True:"]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    return build_tiny_checkpoint("llama", str(tmp_path_factory.mktemp("cli")), tokenizer=chat_tokenizer)


def write_lines(path, items):
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def generate(model, inp, out, *extra):
    return main(["generate", "--model", model, "--input", str(inp), "--output", str(out), "--device", "cpu",
                 "--temperature", "0", "--max-tokens", "6", *extra])


def test_results_equal_llm_generate_and_take_chat_messages(model, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)]
                + [{"id": "chat", "messages": [{"role": "user", "content": "def main():"}]}])
    assert generate(model, inp, out) == 0
    results = {r["id"]: r for r in read_results(out)}
    expected = LLM(model, device="cpu").generate(PROMPTS + ["def main():\n"],
                                                 SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    for key, output in zip([*range(len(PROMPTS)), "chat"], expected, strict=True):
        assert results[key]["text"] == output.outputs[0].text
        assert results[key]["completion_tokens"] == len(output.outputs[0].token_ids)
        assert results[key]["prompt_tokens"] == len(output.prompt_token_ids)
        assert results[key]["finish_reason"] == output.outputs[0].finish_reason


def test_interrupted_run_keeps_what_finished_and_resumes_without_duplicates(model, tmp_path, monkeypatch):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    step, calls = LLMEngine.step, {"n": 0}

    def interrupted_step(self):
        calls["n"] += 1
        if calls["n"] == 9:  # the first two requests finished at step 6
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        generate(model, inp, out, "--max-num-seqs", "2")
    first = read_results(out)
    assert 0 < len(first) < len(PROMPTS)
    monkeypatch.setattr(LLMEngine, "step", step)
    assert generate(model, inp, out, "--max-num-seqs", "2") == 0
    results = read_results(out)
    assert sorted(r["id"] for r in results) == list(range(len(PROMPTS)))
    assert results[: len(first)] == first


def test_malformed_lines_are_named_or_skipped_and_counted(model, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": 1, "prompt": "a"}, "{not json", {"prompt": "no id"}, {"id": 4, "prompt": "b"},
                      {"id": 1, "prompt": "duplicate"}, {"id": 6, "prompt": "x " * 400}])
    assert generate(model, inp, out) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err
    out.unlink()
    assert generate(model, inp, out, "--skip-bad-lines") == 0
    err = capsys.readouterr().err
    assert "skipped line 3" in err and "duplicate id 1" in err and "skipped line 6" in err
    assert "skipped 4 bad lines" in err
    assert sorted(r["id"] for r in read_results(out)) == [1, 4]


@pytest.mark.parametrize("command", [["serve"], ["run-batch", "-i", "in.jsonl", "-o", "out.jsonl"]])
def test_the_server_commands_without_the_servers_packages_say_what_to_install(model, command, monkeypatch, capsys):
    find_spec = importlib.util.find_spec

    def without_fastapi(name, *args):
        return None if name == "fastapi" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_fastapi)
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--model", model])
    assert stopped.value.code == 2 and "pip install 'pagedllm[server]'" in capsys.readouterr().err


def test_help_lists_the_commands():
    run = subprocess.run([sys.executable, "-m", "pagedllm", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and all(c in run.stdout for c in ("generate", "run-batch", "serve", "bench"))


@pytest.mark.parametrize("args, error", [
    (["serve", "{model}", "--stream-interval", "0"], "stream_interval=0 is invalid: it must be >= 1"),
    (["serve", "/no/such/model"], "model directory '/no/such/model' does not exist"),
    (["serve", "{model}", "--api-server-count", "0"], "argument --api-server-count: must be at least 1, not 0"),
    (["serve", "{model}", "--api-server-count", "-3"], "argument --api-server-count: must be at least 1, not -3"),
    (["serve", "{model}", "--api-server-count", "two"], "argument --api-server-count: invalid count value: 'two'"),
    (["serve", "{model}", "--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
    (["serve", "{model}", "--enable-auto-tool-choice", "--tool-call-parser", "openai"],
     "--tool-call-parser openai reads gpt-oss's harmony messages: reasoning_parser='openai_gptoss' reads <|start|>"),
    (["serve", "{model}", "--enable-auto-tool-choice", "--tool-call-parser", "pythonic"],
     "argument --tool-call-parser: invalid choice: 'pythonic'"),
    (["serve", "{model}", "--reasoning-parser", "granite"], "reasoning_parser='granite' is invalid: it must be one of"),
    (["serve", "{model}", "--reasoning-parser", "qwen3"], "reasoning_parser='qwen3' reads <think>, </think> as tokens"),
    (["serve", "{model}", "--lora-modules", "sql=/adapters/sql"], "--lora-modules: LoRA adapters are not supported"),
    (["serve", "{model}", "--ssl-keyfile", "/k.pem"], "--ssl-keyfile and --ssl-certfile: give both"),
    (["serve", "{model}", "--allowed-origins", '"*"'], "--allowed-origins: give a JSON list of strings, not '*'"),
    (["serve", "{model}", "--port", "70000"], "--port: must be between 0 and 65535, not 70000"),
    (["serve", "{model}", "--api-key", ""], "--api-key (or PAGEDLLM_API_KEY) is empty, which would serve without"),
    (["serve", "{model}", "--served-model-name", "a", ""], "--served-model-name: a name must not be empty"),
    (["serve", "{model}", "--max-request-bytes", "0"], "--max-request-bytes: must be at least 1, not 0"),
    (["serve", "{model}", "--read-timeout", "0"], "--read-timeout: must be more than 0 seconds, not 0.0"),
    (["serve", "{model}", "--read-timeout", "nan"], "--read-timeout: must be more than 0 seconds, not nan"),
    (["serve", "{model}", "--port", "-1"], "--port: must be between 0 and 65535, not -1"),
    (["serve", "{model}", "--api-server-count", "100000"], "--api-server-count: at most 128, not 100000"),
    (["serve", "{model}", "--host", "a..b"], "--host: cannot listen on 'a..b'"),
    (["serve", "{model}", "--chat-template", "/no/such/template.jinja"],
     "--chat-template: no file '/no/such/template.jinja' (and no Jinja in it"),
    (["bench", "--model", "{model}", "--max-num-seqs", "0"], "max_num_seqs=0 is invalid"),
    (["bench", "--model", "{model}", "--num-prompts", "0"], "argument --num-prompts: must be at least 1, not 0"),
    (["bench", "--model", "{model}", "--output-len", "-1"], "argument --output-len: must be at least 1, not -1"),
    (["generate", "--model", "{model}", "--input", "in.jsonl", "--output", "out.jsonl", "--temperature", "-1"],
     "SamplingParams.temperature=-1.0 is invalid"),
    (["generate", "--model", "{model}", "--input", "none.jsonl", "--output", "out.jsonl"], "--input: no file "),
    (["generate", "--model", "{model}", "--input", "in.jsonl", "--output", "in.jsonl"],
     "--output: the same file as --input"),
    (["generate", "--model", "{model}", "--input", "in.jsonl", "--output", "/"], "--output: '/' is a directory"),
    (["generate", "--model", "{model}", "--input", "in.jsonl", "--output", "/no/such/folder/out.jsonl"],
     "--output: no folder '/no/such/folder'"),
])
def test_a_setting_that_could_never_run_is_named_as_argparse_names_a_bad_flag(model, tmp_path, capsys, args, error):
    """Status 2 and ``pagedllm CMD: error: ...`` before anything loads, not a traceback."""
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    argv = [a.format(model=model) if "{" in a else str(tmp_path / a) if a.endswith(".jsonl") else a
            for a in args] + ["--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"pagedllm {args[0]}: error: " in err and error in err
    assert "Traceback" not in err


def test_resume_after_a_torn_last_line_generates_its_id_again(model, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:3])])
    assert generate(model, inp, out) == 0
    whole = read_results(out)
    torn = out.read_text().splitlines(keepends=True)
    out.write_text("".join(torn[:2]) + torn[2][:17])  # power lost in the middle of the third line
    assert generate(model, inp, out) == 0
    assert "last line was cut short" in capsys.readouterr().err
    assert read_results(out) == whole
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    assert generate(model, inp, out) == 2  # a bad line before the last is not a crash to repair: it is named
    assert "out.jsonl line 2 is not a result line" in capsys.readouterr().err


def test_ids_are_json_values_and_bad_lines_never_crash(model, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": 1, "prompt": "a"}, {"id": 1.0, "prompt": "b"}, {"id": True, "prompt": "c"},
                      {"id": "1", "prompt": "d"}, {"id": ["a"], "prompt": "e"}, {"id": 7, "messages": [1, 2]},
                      '{"id": 8, "prompt": "a\\ud800b"}', {"id": 9, "prompt": ""},
                      {"id": 10, "messages": [{"role": "user", "content": 5}]}])
    with open(inp, "ab") as f:
        f.write(b'{"id": 11, "prompt": "\xff\xfe"}\n')  # not UTF-8
        f.write(b'{"id": 12, "prompt": "a", "source": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")  # json's recursion
    assert generate(model, inp, out, "--skip-bad-lines") == 0
    err = capsys.readouterr().err
    assert "skipped 6 bad lines" in err and "skipped line 11: JSON nested too deeply" in err
    for number in (6, 7, 8, 9, 10):
        assert f"skipped line {number}" in err
    assert sorted(json.dumps(r["id"]) for r in read_results(out)) == sorted(['1', '1.0', 'true', '"1"', '["a"]'])
    assert generate(model, inp, out, "--skip-bad-lines") == 0  # resumes: nothing left to do
    assert len(read_results(out)) == 5


def test_a_lines_own_sampling_params_override_the_command_lines(model, tmp_path, capsys):
    """A line's "sampling_params" (SamplingParams' fields, as pagedllm.ray's rows carry them) over
    the job's; bad ones name the line and the field. A max_tokens at the top of a line was ignored
    without a word: it is said, once, and the line still runs with the job's values."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": "own", "prompt": "def main():", "sampling_params": {"max_tokens": 2, "ignore_eos": True}},
                      {"id": "job", "prompt": "def main():", "sampling_params": {"max_tokens": None}},
                      {"id": "top", "prompt": "def main():", "max_tokens": 2, "source": "kept for the user"},
                      {"id": "zero", "prompt": "x", "sampling_params": {"max_tokens": 0}},
                      {"id": "typo", "prompt": "x", "sampling_params": {"max_token": 3}},
                      {"id": "list", "prompt": "x", "sampling_params": [3]},
                      {"id": "n", "prompt": "x", "sampling_params": {"n": 3, "temperature": 1.0}}])
    with pytest.warns(UserWarning, match=r"\['max_tokens'\] at the top"):
        assert generate(model, inp, out, "--skip-bad-lines") == 0
    results = {r["id"]: r for r in read_results(out)}
    expected = LLM(model, device="cpu").generate(["def main():"], SamplingParams(temperature=0, max_tokens=6),
                                                 use_tqdm=False)[0].outputs[0]
    assert results["own"]["completion_tokens"] == 2 and expected.text.startswith(results["own"]["text"])
    assert results["job"]["text"] == results["top"]["text"] == expected.text
    err = capsys.readouterr().err
    assert "skipped 4 bad lines" in err
    assert "line 4: SamplingParams.max_tokens=0 is invalid" in err and "['max_token']" in err and "not list" in err
    assert "line 7: SamplingParams.n=3 is invalid here: a row gets one completion" in err  # (its samples but one
    # were dropped without a word)
