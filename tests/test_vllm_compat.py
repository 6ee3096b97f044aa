"""A vLLM user's script runs unchanged: tests/vllm_scripts/offline_script.py (vLLM's arguments and
fields, the way vLLM's examples use them, only the import changed) runs against the demo model,
and each result is checked for what it means."""

import json
import math
import os
import subprocess
import sys

import pytest

from pagedllm import LLM, BeamSearchParams, SamplingParams
from pagedllm.entrypoints.cli import main as cli_main

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "pagedllm-demo")
SCRIPT = os.path.join(os.path.dirname(__file__), "vllm_scripts", "offline_script.py")


@pytest.fixture(scope="module")
def results():
    run = subprocess.run([sys.executable, SCRIPT, DEMO], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    cases: dict[str, list[dict]] = {}
    for line in lines:
        cases.setdefault(line.pop("case"), []).append(line)
    return cases, run.stderr


@pytest.fixture(scope="module")
def tokenizer():
    return LLM(DEMO, device="cpu").get_tokenizer()


def test_compatibility_options_are_accepted_and_said(results):
    _, log = results
    assert "swap_space" not in log  # left at vLLM's default: nothing to say
    assert "disable_log_stats=True: pagedllm logs no periodic stats" in log
    assert "num_gpu_blocks_override=64: the same as num_kv_blocks" in log
    assert "distributed_executor_backend='mp': tensor-parallel workers are processes of this host here" in log
    assert "compilation_config=3: nothing is compiled with torch.compile here" in log


def test_greedy_outputs_times_and_cumulative_logprob(results, tokenizer):
    cases, _ = results
    for output in cases["greedy"]:
        assert output["text"] == tokenizer.decode(output["token_ids"]) and len(output["token_ids"]) == 12
        assert output["cumulative_logprob"] < 0
        m = output["metrics"]
        assert m["arrival_time"] <= m["first_scheduled_time"] <= m["first_token_time"] <= m["last_token_time"]
        assert m["last_token_time"] <= m["finished_time"] and m["time_in_queue"] >= 0
    first = cases["greedy"][0]["token_ids"]
    assert cases["prompt_types"][0]["token_ids"] == [first] * 3
    # generate(..., lora_request=None, priority=[0, 0, 0]), as vLLM takes them: the same outputs
    assert cases["generate_arguments"][0]["token_ids"] == [output["token_ids"] for output in cases["greedy"]]
    assert cases["async_engine"][0]["token_ids"] == first


def test_sampling_fields_change_what_is_sampled(results, tokenizer):
    cases, _ = results
    bias = cases["logit_bias"][0]
    assert set(bias["token_ids"]) == {bias["favourite"]}
    allowed = cases["allowed_token_ids"][0]
    assert set(allowed["token_ids"]) <= set(allowed["allowed"])
    bad = cases["bad_words"][0]
    assert bad["word"] in bad["without"]
    for text in (bad["word"], " " + bad["word"]):
        word = tokenizer.encode(text, add_special_tokens=False)
        ids = bad["banned_token_ids"]
        assert not any(ids[i:i + len(word)] == word for i in range(len(ids)))
    forced = cases["logits_processors"][0]
    assert forced["token_ids"] == [7] * 5 and forced["seen_prompt"] == forced["prompt"]


def test_prompt_and_output_handling(results):
    cases, _ = results
    truncated = cases["truncate_prompt_tokens"][0]
    assert truncated["prompt_token_ids"] == truncated["full"][-10:]
    quiet = cases["detokenize"][0]
    assert quiet["text"] == "" and len(quiet["token_ids"]) == 6
    assert "logprobs=-1 is invalid: it must be at most 20" in cases["logprobs_all_under_max_logprobs"][0]["error"]
    options = cases["engine_options"][0]
    assert options["max_model_len"] == 128 and options["num_blocks"] == 64 and options["tokenizer"] is None
    assert options["logprob_entries"] == [options["vocab"]] * 2 and options["text"] == ""


def test_several_samples(results, tokenizer):
    cases, _ = results
    best = cases["best_of"][0]
    assert [index for index, _, _ in best["best"]] == [0, 1]
    top_two = sorted((logprob for _, logprob in best["all"]), reverse=True)[:2]  # the same 4 seeded samples
    assert [logprob for _, _, logprob in best["best"]] == pytest.approx(top_two)
    samples = cases["stream_n"][0]["samples"]
    assert sorted(samples) == ["0", "1", "2"]
    for outputs in samples.values():  # at every streamed output, each sample's text is its tokens'
        assert all(text == tokenizer.decode(ids) for text, ids in outputs)
        assert len(outputs[-1][1]) == 6
    kinds = cases["output_kind"][0]
    assert all(len(ids) == 1 for ids in kinds["delta_token_ids"])
    final_text, final_ids = kinds["final_only"][0]
    assert len(kinds["final_only"]) == 1 and "".join(kinds["delta_texts"]) == final_text
    assert sum(kinds["delta_token_ids"], []) == final_ids


def test_sampling_params_helpers(results):
    cases, _ = results
    helpers = cases["clone_from_optional"][0]
    assert helpers["original_stop"] == ["\n"] and helpers["copy_stop"] == ["\n", "x"]
    defaults = helpers["from_optional"]
    assert (defaults["temperature"], defaults["top_p"], defaults["n"], defaults["max_tokens"]) == (1.0, 1.0, 1, None)


def test_beam_search(results, tokenizer):
    cases, _ = results
    beams = cases["beam_search"][0]
    sequences = beams["sequences"]
    assert len(sequences) == 3
    scores = [logprob / len(tokens) for tokens, logprob, _, _ in sequences]
    assert scores == sorted(scores, reverse=True) and len({tuple(t) for t, _, _, _ in sequences}) == 3
    for tokens, _, text, reason in sequences:
        assert tokens[:len(beams["prompt"])] == beams["prompt"] and text == tokenizer.decode(tokens)
        assert reason in ("stop", "length")
    single = cases["beam_width_1"][0]
    assert single["tokens"] == single["greedy"]  # one beam is greedy decoding


def test_chat_prefix_cache_metrics_and_progress(results):
    cases, _ = results
    chat = cases["chat"][0]
    assert chat["parts"] == chat["string"]  # text parts render as the string they spell
    assert chat["rendered"] == "tools: search\n<think>\nuser: hi\nassistant: def"  # the last message left open
    assert cases["content_format"][0]["prompt"] == "[hi]"  # chat_template_content_format="openai": parts
    assert "message 0 has no content" in cases["chat_without_content"][0]["error"]
    cache = cases["prefix_cache"][0]
    assert cache["hits_again"] > 0 and cache["reset"] is True and cache["hits_after_reset"] == 0
    assert cache["generation_tokens"] > 0 and "pagedllm:num_preemptions" in cache["metric_names"]
    assert cases["use_tqdm_class"][0]["updates"] == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"quantization": "awq"}, "quantization='awq' is invalid"),
    ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype='fp8_e5m2' is invalid"),
    ({"task": "embed"}, "task='embed' is invalid"),
    ({"tokenizer_mode": "mistral"}, "tokenizer_mode='mistral' is invalid"),
    ({"num_kv_blocks": 32, "num_gpu_blocks_override": 64}, "num_gpu_blocks_override=64 is invalid"),
    ({"hf_overrides": "x"}, "hf_overrides='x' is invalid"),
    ({"enable_lora": True}, "enable_lora=True is invalid: it must be False: LoRA adapters are not supported"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size=2 is invalid: it must be 1"),
    ({"speculative_config": {"model": "x", "num_speculative_tokens": 4}}, "speculative_config=.* is invalid"),
    ({"runner": "pooling"}, "runner='pooling' is invalid"),
    ({"distributed_executor_backend": "external_launcher"}, "distributed_executor_backend='external_launcher'"),
    ({"enable_sleep_mode": True}, "enable_sleep_mode=True is invalid: it must be False: sleep mode is not supported"),
    ({"enable_expert_parallel": True}, "enable_expert_parallel=True is invalid: it must be False: experts are split"),
    ({"disable_sliding_window": True}, "disable_sliding_window=True is invalid"),
    ({"calculate_kv_scales": True}, "calculate_kv_scales=True is invalid"),
    ({"scheduling_policy": "priority"}, "scheduling_policy='priority' is invalid: it must be 'fcfs': requests are"),
    ({"logprobs_mode": "processed_logprobs"}, "logprobs_mode='processed_logprobs' is invalid: it must be "
                                              "'raw_logprobs'"),
    ({"model_impl": "transformers"}, "model_impl='transformers' is invalid: it must be 'auto' or 'vllm'"),
    ({"config_format": "mistral"}, "config_format='mistral' is invalid"),
    ({"code_revision": "v2"}, "code_revision='v2' is invalid"),
    ({"structured_outputs_config": {"backend": "guidance"}}, "structured_outputs_config=.* is invalid: it must be "
                                                             "None or .*: structured outputs run on xgrammar here"),
    ({"hf_token": 5}, "hf_token=5 is invalid: it must be bool or str or None"),
])
def test_options_pagedllm_cannot_honour_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(DEMO, device="cpu", **kwargs)


def test_cpu_offload_is_a_warning_not_a_crash(pagedllm_log):
    LLM(DEMO, device="cpu", cpu_offload_gb=4, swap_space=16)
    said = {r.getMessage(): r.levelname for r in pagedllm_log}
    assert said["cpu_offload_gb=4: weights stay on the device here: the model must fit there"] == "WARNING"
    assert said["swap_space=16: preempted requests are recomputed here, never swapped to host memory"] == "INFO"


def test_generation_config_gives_the_default_sampling_params(tmp_path):
    import shutil

    model = shutil.copytree(DEMO, tmp_path / "m")
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(config | {"temperature": 0.25, "top_k": 7,
                                                                      "max_new_tokens": 5}))
    defaults = LLM(str(model), device="cpu").get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (0.25, 7, 5)
    llm = LLM(str(model), device="cpu", generation_config="vllm")
    assert llm.get_default_sampling_params() == SamplingParams()
    assert len(LLM(str(model), device="cpu").generate("import os", use_tqdm=False)[0].outputs[0].token_ids) <= 5


def test_serve_takes_the_model_as_a_flag_too(monkeypatch):
    from pagedllm.entrypoints.openai import api_server

    seen = []
    monkeypatch.setattr(api_server, "serve", lambda args: seen.append(args.model) or 0)
    assert cli_main(["serve", "--model", DEMO, "--device", "cpu"]) == 0
    assert cli_main(["serve", DEMO, "--device", "cpu"]) == 0
    assert seen == [DEMO, DEMO]
    with pytest.raises(SystemExit):
        cli_main(["serve", "--device", "cpu"])


def test_temperature_of_the_wrong_type_names_the_field():
    with pytest.raises(ValueError, match=r"SamplingParams\.temperature='hot' is invalid"):
        SamplingParams(temperature="hot")
    assert math.isclose(SamplingParams.from_optional(logit_bias={"5": 200}).logit_bias[5], 100.0)


def test_readme_lists_every_engine_option():
    """The README's table and compatibility list name every LLM argument."""
    import dataclasses

    from pagedllm.config import EngineConfig

    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        readme = f.read()
    for field in dataclasses.fields(EngineConfig):
        if field.init:
            assert f"`{field.name}`" in readme, field.name


BAD_BEAM_PARAMS = [({"beam_width": 0}, "beam_width"), ({"beam_width": 2.0}, "beam_width"),
                   ({"max_tokens": True}, "max_tokens"), ({"length_penalty": float("nan")}, "length_penalty"),
                   ({"length_penalty": float("inf")}, "length_penalty"), ({"length_penalty": "1"}, "length_penalty"),
                   ({"temperature": -1}, "temperature"), ({"temperature": 1e400}, "temperature"),
                   ({"ignore_eos": "yes"}, "ignore_eos"),
                   ({"include_stop_str_in_output": 1}, "include_stop_str_in_output")]


@pytest.mark.parametrize("kwargs, field", BAD_BEAM_PARAMS, ids=[str(k) for k, _ in BAD_BEAM_PARAMS])
def test_beam_search_params_are_checked_by_name(kwargs, field):
    with pytest.raises(ValueError, match=f"BeamSearchParams.{field}="):
        BeamSearchParams(**({"beam_width": 2, "max_tokens": 4} | kwargs))


def test_beam_search_ranks_with_any_finite_length_penalty():
    """The score is the cumulative logprob over the length to the penalty: a penalty of 1,000 made
    ``length ** penalty`` overflow (OverflowError), -1e308 divided by zero. Ranked in logs, each
    completes; a penalty of 0 ranks by cumulative logprob alone."""
    llm = LLM(DEMO, device="cpu")
    for penalty in (1e308, -1e308, 1e3, 0.0):
        out = llm.beam_search([{"prompt": "def f("}], BeamSearchParams(beam_width=3, max_tokens=4,
                                                                        length_penalty=penalty))[0]
        assert len(out.sequences) == 3
        if penalty == 0.0:
            scores = [s.cum_logprob for s in out.sequences]
            assert scores == sorted(scores, reverse=True)


def test_vllm_defaults_of_its_other_options_are_taken():
    llm = LLM(DEMO, device="cpu", enable_prefix_caching=None, runner="generate", enable_lora=False,
              pipeline_parallel_size=1, speculative_config=None, distributed_executor_backend=None,
              enable_sleep_mode=False, enable_expert_parallel=False, disable_sliding_window=False,
              calculate_kv_scales=False, scheduling_policy="fcfs", logprobs_mode="raw_logprobs", model_impl="auto",
              config_format="hf", code_revision=None, structured_outputs_config={"backend": "xgrammar"},
              max_parallel_loading_workers=4, mm_processor_cache_gb=0, hf_token=None)
    assert llm.llm_engine.config.enable_prefix_caching is True  # vLLM's None: on


GPUS = [((80 << 30, "NVIDIA H100 80GB HBM3"), (1024, 16384)), ((141 << 30, "NVIDIA H200"), (1024, 16384)),
        ((80 << 30, "NVIDIA A100-SXM4-80GB"), (256, 8192)), ((24 << 30, "NVIDIA L4"), (256, 8192)),
        (OSError("libnvidia-ml.so.1: cannot open shared object file"), (256, 8192))]


@pytest.mark.parametrize("gpu, batch", GPUS, ids=[str(g[1] if isinstance(g, tuple) else g) for g, _ in GPUS])
def test_batch_defaults_are_vllms_for_the_gpu(monkeypatch, gpu, batch):
    """vLLM's LLM class: max_num_seqs 1024 and max_num_batched_tokens 16384 on a GPU of >= 70 GiB other
    than an A100, else 256 / 8192; a GPU NVML cannot read gets the small ones."""
    from pagedllm import config

    def read(index):
        assert index == 1
        if isinstance(gpu, Exception):
            raise gpu
        return gpu

    monkeypatch.setattr(config, "gpu_memory_and_name", read)
    assert config._batch_defaults("cuda:1") == batch


def test_the_cpu_takes_the_small_batch_defaults_and_set_limits_are_kept(monkeypatch):
    from pagedllm import config

    assert config._batch_defaults("cpu") == (256, 8192)
    cpu = LLM(DEMO, device="cpu", max_num_seqs=None).llm_engine.config
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (256, 8192)
    # on a large GPU (faked: no CUDA is touched while the config resolves), a limit that is set stays
    monkeypatch.setattr(config.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(config, "gpu_memory_and_name", lambda index: (80 << 30, "NVIDIA H100 80GB HBM3"))
    seqs_set = config.EngineConfig(DEMO, device="cuda:1", max_num_seqs=8)
    tokens_set = config.EngineConfig(DEMO, device="cuda:1", max_num_batched_tokens=64)
    assert (seqs_set.max_num_seqs, seqs_set.max_num_batched_tokens) == (8, 16384)
    assert (tokens_set.max_num_seqs, tokens_set.max_num_batched_tokens) == (1024, 64)


def test_the_server_steps_at_most_8192_tokens_and_the_offline_commands_take_the_engines_default():
    import argparse

    from pagedllm.entrypoints.server_args import add_engine_args, engine_args

    served, offline = argparse.ArgumentParser(), argparse.ArgumentParser()
    engine_args(served)
    add_engine_args(offline)
    assert served.parse_args([]).max_num_batched_tokens == 8192
    assert served.parse_args(["--max-num-batched-tokens", "16384"]).max_num_batched_tokens == 16384
    assert offline.parse_args([]).max_num_batched_tokens is None and offline.parse_args([]).max_num_seqs is None


def test_sampling_params_carry_vllms_extra_args_for_custom_code():
    params = SamplingParams(temperature=0, max_tokens=3, extra_args={"target_token": 5})
    output = LLM(DEMO, device="cpu").generate("x", params, use_tqdm=False)[0]
    assert params.extra_args == {"target_token": 5} and len(output.outputs[0].token_ids) == 3


def test_an_argument_llm_does_not_take_is_named_with_the_ones_it_is_close_to():
    with pytest.raises(TypeError, match="unexpected argument 'max_model_length' \\(did you mean max_model_len\\?\\)"):
        LLM(DEMO, device="cpu", max_model_length=64)
    with pytest.raises(TypeError, match="unexpected argument 'limit_mm_per_prompt': its arguments are"):
        LLM(DEMO, device="cpu", limit_mm_per_prompt={"image": 0})


@pytest.mark.parametrize("call, match", [
    (lambda llm: llm.generate("x", lora_request=object(), use_tqdm=False),
     "lora_request=.* is invalid: it must be None"),
    (lambda llm: llm.generate(["x", "y"], priority=[0, 1], use_tqdm=False), "priority=\\[0, 1\\] is invalid: requests "
                                                                             "are served first come, first served"),
    (lambda llm: llm.generate(["x", "y"], priority=[0], use_tqdm=False), "one int per prompt \\(2\\)"),
    (lambda llm: llm.chat([{"role": "user", "content": "x"}], mm_processor_kwargs={"fps": 1}, use_tqdm=False),
     "mm_processor_kwargs=.* is invalid: it must be None"),
    (lambda llm: llm.chat([{"role": "user", "content": "x"}], chat_template_content_format="json", use_tqdm=False),
     "chat_template_content_format='json' is invalid"),
    (lambda llm: llm.beam_search(["x"], BeamSearchParams(beam_width=2, max_tokens=2), "my-adapter"),
     "lora_request='my-adapter' is invalid"),
])
def test_vllm_call_arguments_asking_for_what_is_not_here_are_refused(call, match):
    llm = LLM(DEMO, device="cpu")
    with pytest.raises(ValueError, match=match):
        call(llm)
    assert llm.generate("x", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids  # still usable


def test_async_engine_takes_vllm_call_arguments_at_their_defaults_only():
    import asyncio

    from pagedllm import AsyncLLMEngine
    from pagedllm.config import EngineConfig

    async def run():
        engine = AsyncLLMEngine.from_engine_args(EngineConfig(DEMO, device="cpu"))
        try:
            params = SamplingParams(max_tokens=3, temperature=0)
            outputs = [o async for o in engine.generate("x", params, "a", lora_request=None, priority=0)]
            for kwargs in ({"lora_request": "adapter"}, {"priority": 2}):
                with pytest.raises(ValueError, match="is invalid"):
                    async for _ in engine.generate("x", params, "b", **kwargs):
                        pass
            return outputs[-1].outputs[0].token_ids
        finally:
            engine.shutdown()

    assert len(asyncio.run(run())) == 3


def test_commands_take_vllm_flags_for_these_options():
    import argparse

    from pagedllm.entrypoints.server_args import add_engine_args, engine_setting_error

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--compilation-config", '{"level": 3}', "--distributed-executor-backend", "mp",
                              "--pipeline-parallel-size", "1", "--no-enable-lora"])
    assert args.compilation_config == {"level": 3}
    assert parser.parse_args(["--compilation-config", "3"]).compilation_config == 3
    args.model, args.device = DEMO, "cpu"
    assert engine_setting_error(args) is None
    args.enable_lora = True
    assert "enable_lora=True is invalid" in engine_setting_error(args)
    # vLLM's --hf-token: the token, or the flag alone for the saved login
    assert parser.parse_args(["--hf-token"]).hf_token is True
    assert parser.parse_args(["--hf-token", "hf_x"]).hf_token == "hf_x"


VLLM_IMPORTS = [
    "from vllm import LLM, SamplingParams, AsyncEngineArgs, AsyncLLMEngine, EngineArgs, TokensPrompt, TextPrompt",
    "from vllm.sampling_params import SamplingParams, BeamSearchParams, GuidedDecodingParams, RequestOutputKind, "
    "StructuredOutputsParams",
    "from vllm.inputs import TokensPrompt, TextPrompt, PromptType",
    "from vllm.outputs import RequestOutput, CompletionOutput",
    "from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs",
    "from vllm.engine.async_llm_engine import AsyncLLMEngine",
]


@pytest.mark.parametrize("statement", VLLM_IMPORTS)
def test_vllms_import_lines_work_with_the_name_changed(statement):
    """vLLM's examples import from its submodules too: the same paths exist here."""
    exec(statement.replace("vllm", "pagedllm"), {})
