"""Bad input fails early with a clear error that names the problem, and disturbs nothing."""

import json
import os
import shutil

import pytest
import torch
from conftest import break_text_of

from pagedllm import LLM, RequestFailedError, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("llama"), device="cpu", max_model_len=64)


def copy_checkpoint(src: str, dst, keep_weights: bool = True) -> str:
    shutil.copytree(src, dst, ignore=None if keep_weights else shutil.ignore_patterns("*.safetensors"))
    return str(dst)


def test_model_dir_that_does_not_exist():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/no/such/model/dir")


def test_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


def test_missing_weight_files(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("opt"), tmp_path / "m", keep_weights=False)
    with pytest.raises(FileNotFoundError, match=r"no weight files \(\*\.safetensors or \*\.bin\)"):
        LLM(path)


def test_unknown_architecture(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint("opt"), tmp_path / "m")
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["architectures"] = ["OPTForQuestionAnswering"]
    with open(config_file, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"OPTForQuestionAnswering.*not supported.*LlamaForCausalLM"):
        LLM(path)


def test_checkpoint_missing_a_weight(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy_checkpoint(tiny_checkpoint("gpt2"), tmp_path / "m")
    weights = load_file(os.path.join(path, "model.safetensors"))
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights.*h\.1\.mlp\.c_fc\.weight"):
        LLM(path)


@pytest.mark.parametrize("kind, key, weight", [
    ("llama", "intermediate_size", r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"),
    ("gpt2", "n_inner", r"h\.0\.mlp\.c_(fc|proj)\.(weight|bias)"),
])
def test_checkpoint_that_disagrees_with_config_json(kind, key, weight, tiny_checkpoint, tmp_path):
    """Each layer reads only the slice it needs, yet a tensor of the wrong size is still an error."""
    path = copy_checkpoint(tiny_checkpoint(kind), tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config[key] = 96  # the checkpoint's MLP is 128 (llama) or 256 (gpt2) wide
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=rf"checkpoint weight \S*{weight}: has shape .* but config.json implies"):
        LLM(path, device="cpu")


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 12}, "block_size=12"),
    ({"max_model_len": 100000}, "max_model_len=100000"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization=1.5"),
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"device": "cuda:x"}, r"device='cuda:x' is not supported: use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"device": "cuda:-1"}, "device='cuda:-1' is not supported"),
    ({"device": "meta"}, "device='meta' is not supported"),
    ({"load_format": "gguf"}, "load_format='gguf'"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size=0"),
    ({"max_num_seqs": "8"}, "max_num_seqs='8' is invalid: it must be int"),
    ({"enforce_eager": 1}, "enforce_eager=1 is invalid: it must be bool"),
    ({"stream_interval": 0}, "stream_interval=0"),
    ({"stream_interval": 2.5}, "stream_interval=2.5 is invalid: it must be int"),
    ({"seed": 1.5}, "seed=1.5 is invalid: it must be int or None"),
    # past int64 these failed deep in torch ("Overflow when unpacking long long"), naming nothing
    ({"seed": 2**70}, r"seed=1180591620717411303424 is invalid: it must be an int in \[-2\*\*63, 2\*\*64\)"),
    ({"max_num_seqs": 2**70}, "max_num_seqs=1180591620717411303424 is invalid: it must be between 1 and 1,048,576"),
    ({"max_num_batched_tokens": 2**70}, "max_num_batched_tokens=1180591620717411303424 is invalid"),
    ({"swap_space": "lots"}, "swap_space='lots' is invalid: it must be float"),
    # vLLM's options that do nothing here are still checked as vLLM checks them
    ({"swap_space": -1}, r"swap_space=-1 is invalid: it must be a finite number >= 0 \(GiB\)"),
    ({"cpu_offload_gb": -0.5}, r"cpu_offload_gb=-0.5 is invalid: it must be a finite number >= 0"),
    ({"mm_processor_cache_gb": float("inf")}, "mm_processor_cache_gb=inf is invalid: it must be a finite number >= 0"),
    ({"max_parallel_loading_workers": 0}, "max_parallel_loading_workers=0 is invalid: it must be >= 1 or None"),
    ({"max_seq_len_to_capture": -8}, "max_seq_len_to_capture=-8 is invalid: it must be >= 1"),
    ({"hf_overrides": [1]}, r"hf_overrides=\[1\] is invalid: it must be dict or None"),
    ({"tensor_parallel_size": 3, "device": "cpu"},
     "tensor_parallel_size=3 is invalid for this model: its 4 attention heads"),
])
def test_invalid_engine_arguments(tiny_checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny_checkpoint("opt"), **kwargs)


@pytest.mark.parametrize("blocks", [2**40, 2**62])
def test_a_fixed_kv_cache_larger_than_memory_is_named(tiny_checkpoint, blocks):
    """num_kv_blocks=2**40 failed as the allocator's error, 2**62 as a size overflow, naming nothing."""
    with pytest.raises(ValueError, match=f"num_kv_blocks={blocks} is invalid: its KV cache would take .* GiB of host"):
        LLM(tiny_checkpoint("opt"), device="cpu", num_kv_blocks=blocks)


def test_a_gpu_index_past_the_gpus_is_named_before_any_work(tiny_checkpoint, monkeypatch):
    """With one GPU, cuda:1 failed as CUDA's "invalid device ordinal" once the model was loading."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:1' is invalid: torch sees 1 CUDA GPU\(s\), cuda:0 to cuda:0"):
        LLM(tiny_checkpoint("opt"), device="cuda:1")


@pytest.mark.parametrize("kind, overrides, match", [
    # Qwen3-MoE's experts are 48 wide: not a multiple of 5 ranks, where heads and dense MLP would split
    ("qwen3-moe", {"num_attention_heads": 5, "num_key_value_heads": 5, "intermediate_size": 160},
     "its 48 expert MLP width"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 in config.json is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_type 'dynamic' is not supported"),
    ("llama", {"num_hidden_layers": -1}, r"num_hidden_layers=-1 in config.json \(or hf_overrides\) is invalid"),
    ("opt", {"hidden_size": 0}, "hidden_size=0 in config.json"),
    ("gpt2", {"n_head": 2.5}, "hf_overrides n_head=2.5 is invalid: .*expected int"),
    ("opt", {"num_attention_heads": "4"}, "hf_overrides num_attention_heads='4' is invalid"),
    ("qwen3", {"vocab_size": None}, "hf_overrides vocab_size=None is invalid"),
])
def test_model_configs_pagedllm_cannot_run_are_refused_by_name(kind, overrides, match, tiny_checkpoint):
    tp = {"tensor_parallel_size": 5} if kind == "qwen3-moe" else {}
    with pytest.raises(ValueError, match=match):
        LLM(tiny_checkpoint(kind), device="cpu", hf_overrides=overrides, **tp)


def test_an_fp8_checkpoint_weight_without_its_scale_is_named(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pagedllm-demo")
    shutil.copytree(demo, tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name].to(torch.float8_e4m3fn)  # and no weight_scale
    save_file(state, tmp_path / "m" / "model.safetensors")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"FP8 checkpoint weights without their scale.*{name}"):
        LLM(str(tmp_path / "m"), device="cpu")


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"stop_token_ids": [-3]}, "stop_token_ids"),
    ({"seed": "seven"}, "seed"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": -2}, "logprobs"),
    ({"extra_args": ["a"]}, "extra_args"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"prompt_logprobs": -2}, "prompt_logprobs"),
    ({"n": 0}, "n"),
    ({"top_k": 2**63}, "top_k"),  # beyond int64: once broke the sampler's tensors
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**63 - 1, "n": 2, "temperature": 1.0}, "seed"),  # sample 1 would use seed + 1
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"n": True}, "n"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"stop": 5}, "stop"),
    # each is matched at every token in the engine's thread: 100,000 slowed a batch of 8 four-fold
    ({"stop": [f"word {i}" for i in range(100_000)]}, "stop"),
    ({"bad_words": ["no"] * 1025}, "bad_words"),
    ({"stop_token_ids": list(range(150_000))}, "stop_token_ids"),  # banned before min_tokens, every step
])
def test_invalid_sampling_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=.* is invalid") as caught:
        SamplingParams(**kwargs)
    assert len(str(caught.value)) < 500  # a huge value is named, not repeated


def test_a_thousand_stop_strings_stop_ids_and_bad_words_are_welcome():
    params = SamplingParams(stop=[f"word {i}" for i in range(1024)], bad_words=["no"] * 1024,
                            stop_token_ids=list(range(1024)))
    assert len(params.stop) == len(params.bad_words) == len(params.stop_token_ids) == 1024


@pytest.mark.parametrize("bad_prompt, match", [
    ("", "prompt 1: the prompt is empty"),
    ([[]], "prompt 1: the prompt is empty"),
    ({"prompt_token_ids": []}, "prompt 1: the prompt is empty"),
    (list(range(60)), r"prompt 1: the prompt has 60 tokens .* 76 in all, but max_model_len is 64"),
    ([3, 99999], r"prompt 1: .*outside the vocabulary \[0, 512\): \[99999\]"),
    (3.5, "prompt 1: a prompt must be a str"),
])
def test_one_bad_prompt_fails_the_call_before_any_work(llm, bad_prompt, match):
    prompts = ["hello world", bad_prompt[0] if bad_prompt == [[]] else bad_prompt, [5, 6, 7]]
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, SamplingParams(max_tokens=16), use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    ok = llm.generate(["hello world", [5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in ok] == [4, 4]


def test_prompt_that_can_never_fit_in_the_cache(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("opt"), device="cpu", num_kv_blocks=2)
    with pytest.raises(ValueError, match="prompt 0: the request needs 4 KV cache blocks of 16 tokens, "
                                         "but the cache has only 2"):
        llm.generate([list(range(3, 43))], SamplingParams(max_tokens=16), use_tqdm=False)


def test_sampling_params_list_of_the_wrong_length(llm):
    with pytest.raises(ValueError, match="2 SamplingParams were given for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()], use_tqdm=False)


def test_cache_too_small_for_one_max_length_sequence(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CPU_KVCACHE_SPACE", "0.00001")  # ~10 KiB: a few blocks
    with pytest.raises(ValueError, match=r"fewer than one sequence of max_model_len=256: lower max_model_len"):
        LLM(tiny_checkpoint("llama"), device="cpu")


@pytest.mark.parametrize("kwargs, field", [
    ({"logprobs": 5000}, "logprobs"),  # more than the vocabulary (512) and max_logprobs (20)
    ({"prompt_logprobs": 5000}, "prompt_logprobs"),
    ({"logprobs": 21}, "logprobs"),  # max_logprobs is 20, as in vLLM
    ({"stop_token_ids": [512], "min_tokens": 1}, "stop_token_ids"),
    ({"n": 3_783_894_413}, "n"),  # hypothesis found it: 3.8e9 samples made at once took the process's memory
    ({"n": 2, "best_of": 5000}, "best_of"),  # more than max_num_samples (4,096)
    # every allowed token a stop token that min_tokens bans: the sampler took token 0 each step, silently
    ({"allowed_token_ids": [7, 9], "stop_token_ids": [7, 9], "min_tokens": 1}, "allowed_token_ids"),
])
def test_values_only_the_model_can_check_are_named_before_any_work(llm, kwargs, field):
    """Each of these once passed validation and then broke the engine loop mid-run."""
    with pytest.raises(ValueError, match=rf"prompt 1: SamplingParams\.{field}=.* is invalid"):
        llm.generate(["hello", "world"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, **kwargs)],
                     use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    ok = llm.generate(["hello"], SamplingParams(max_tokens=4, logprobs=20), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 4


def test_allowed_stop_tokens_without_min_tokens_end_the_request(llm):
    params = SamplingParams(max_tokens=4, allowed_token_ids=[7, 9], stop_token_ids=[7, 9])
    out = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason in (7, 9) and out.token_ids in ([7], [9])


def test_max_num_samples_sets_the_limit(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu", max_model_len=64, max_num_samples=3)
    assert len(llm.generate(["hello"], SamplingParams(max_tokens=2, n=3), use_tqdm=False)[0].outputs) == 3
    with pytest.raises(ValueError, match=r"SamplingParams\.n=4 is invalid: .* at most max_num_samples=3"):
        llm.generate(["hello"], SamplingParams(max_tokens=2, n=4), use_tqdm=False)


def test_max_logprobs_raises_the_limit(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu", max_model_len=64, max_logprobs=30)
    out = llm.generate(["hello"], SamplingParams(max_tokens=2, logprobs=25, prompt_logprobs=30), use_tqdm=False)[0]
    assert all(len(entry) >= 25 for entry in out.outputs[0].logprobs)


def test_numpy_values_are_welcome(llm):
    np = pytest.importorskip("numpy")
    params = SamplingParams(max_tokens=np.int64(3), temperature=np.float32(0.5), seed=np.int64(3))
    out = llm.generate([np.array([5, 6, 7]).tolist(), list(np.array([5, 6, 7]))], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids


def test_seed_none_draws_fresh_noise_each_engine(tiny_checkpoint):
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    runs = [LLM(tiny_checkpoint("llama"), device="cpu", seed=None).generate(["hello"], params, use_tqdm=False)
            for _ in range(2)]
    assert runs[0][0].outputs[0].token_ids != runs[1][0].outputs[0].token_ids


def test_an_error_pinned_on_one_request_fails_it_alone(llm, monkeypatch):
    engine = llm.llm_engine
    break_text_of(engine, lambda r: r.request_id == "b", RuntimeError("decoding broke"), monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=["never"])
    for request_id in "abc":
        engine.add_request(request_id, [5, 6, 7], params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert outputs["b"].error == "RuntimeError: decoding broke"
    assert outputs["b"].outputs[0].finish_reason == "error"
    assert [outputs[r].outputs[0].finish_reason for r in "ac"] == ["length", "length"]
    assert outputs["a"].outputs[0].token_ids == outputs["c"].outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    # offline, the call fails naming the prompt, the rest is aborted, and the LLM goes on
    llm._next_request_id = 0  # so that the second prompt gets the request id "1"
    monkeypatch.undo()
    break_text_of(engine, lambda r: r.request_id == "1", ZeroDivisionError("division by zero"), monkeypatch)
    with pytest.raises(RequestFailedError, match="prompt 1 failed: ZeroDivisionError") as failure:
        llm.generate(["hello", "world", "again"], params, use_tqdm=False)
    assert failure.value.prompt_index == 1
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    monkeypatch.undo()
    assert len(llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize("prompts, params, match", [
    (None, None, "generate needs prompts"),
    (5, None, "prompts must be a prompt or a list of them, not int"),
    (b"def main():", None, "prompts must be text, not bytes: decode them first"),
    ([b"def main():"], None, "prompt 0: a prompt must be a str, a list of token ids or a dict, not bytes"),
    (["a"], {"max_tokens": 3}, "sampling_params must be SamplingParams or a list of them, not dict"),
    ([["a"]], None, r"prompt 0: token ids must be ints, not \['a'\]"),
    ([{"prompt_token_ids": [1, 2.0]}], None, r"prompt 0: token ids must be ints, not \[2.0\]"),
    ([{}], None, "prompt 0: a dict prompt needs 'prompt_token_ids' or 'prompt'"),
    # an image given to a text model would be dropped, and the answer come as if it had been seen
    (["a", {"prompt": "what is this?", "multi_modal_data": {"image": object()}}], None,
     "prompt 1: the prompt's 'multi_modal_data' is not supported: pagedllm runs text models"),
    ([{"prompt_token_ids": [1, 2], "mm_processor_kwargs": {"fps": 1}}], None, "'mm_processor_kwargs' is not supported"),
    ([{"prompt_embeds": [[0.5] * 8]}], None, "'prompt_embeds' is not supported: .* prompt embeddings are not read"),
])
def test_wrong_types_are_value_errors_that_say_what_was_wrong(llm, prompts, params, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("messages", [None, "hello", {"role": "user", "content": "hi"}])
def test_chat_names_messages_that_are_no_conversation(llm, messages):
    with pytest.raises(ValueError, match="messages=.* is invalid: it must be a conversation"):
        llm.chat(messages, use_tqdm=False)


@pytest.mark.parametrize("processor", [
    lambda ids, logits: 1 / 0,
    lambda ids, logits: logits[:3],  # the wrong shape
    lambda a, b, c, d: None,  # neither of vLLM's forms
], ids=["raises", "wrong shape", "wrong signature"])
def test_a_broken_logits_processor_fails_its_request_alone(llm, processor):
    engine = llm.llm_engine
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("good", [5, 6, 7], good)
    engine.add_request("bad", [5, 6, 8], SamplingParams(max_tokens=6, logits_processors=[processor]))
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step())
    assert outputs["bad"].outputs[0].finish_reason == "error" and outputs["bad"].error
    assert len(outputs["good"].outputs[0].token_ids) == 6
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    with pytest.raises(RequestFailedError, match="prompt 1 failed"):
        llm.generate(["a", "b"], [good, SamplingParams(max_tokens=4, logits_processors=[processor])], use_tqdm=False)
    assert len(llm.generate(["a"], good, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_a_request_id_runs_once_at_a_time(llm):
    """LLMEngine.add_request refuses an id that is still running (as vLLM's): two requests under one
    id came out as two outputs of that id, and one abort ended both. Once it has ended, or was
    aborted, the id is free again; a group's id (n > 1) counts until its last sample ends."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", [5, 6], params)
    with pytest.raises(ValueError, match="request id 'a' is already running"):
        engine.add_request("a", [7, 8], params)
    engine.add_request("g", [5, 7], SamplingParams(temperature=1.0, n=3, max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match="request id 'g' is already running"):
        engine.add_request("g", [5], params)
    engine.abort_request("g")
    engine.add_request("g", [9, 9], params)  # free once aborted
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert sorted((o.request_id, o.prompt_token_ids) for o in finished) == [("a", [5, 6]), ("g", [9, 9])]
    engine.add_request("a", [7, 8], params)  # free once ended
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.unfinished == {}
