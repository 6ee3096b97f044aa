"""``LLM`` used as vLLM users use it."""

import copy
import os
import shutil

import pytest
import torch
from conftest import hf_greedy, random_prompts
from tokenizers import processors
from transformers import AutoModelForCausalLM

from pagedllm import LLM, RequestOutput, SamplingParams, inputs
from pagedllm.testing import EOS_ID, build_tiny_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint("qwen3"), device="cpu")


def test_text_prompts_give_text_completions_in_input_order(llm, tokenizer):
    prompts = ["def main():", "The quick brown fox jumps over the lazy dog. " * 4, "import"]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [type(o) for o in outputs] == [RequestOutput] * 3
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        assert output.prompt == prompt
        assert output.prompt_token_ids == tokenizer.encode(prompt)
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert len(completion.token_ids) == 8 and completion.index == 0


def test_every_prompt_form_gives_the_same_completion(llm, tokenizer):
    text = "def main():"
    ids = tokenizer.encode(text)
    expected = llm.generate(text, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    # (vLLM's multi-modal keys, None or empty, are no input: a generic script's text prompts run)
    for prompt in (ids, [ids], {"prompt_token_ids": ids}, {"prompt": text}, [{"prompt": text}],
                   {"prompt": text, "multi_modal_data": None}, {"prompt": text, "multi_modal_data": {}}):
        outputs = llm.generate(prompt, GREEDY, use_tqdm=False)
        assert len(outputs) == 1 and outputs[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("marks_start", [False, True])
def test_text_prompts_tokenized_a_batch_at_a_time_get_their_own_ids(tokenizer, monkeypatch, marks_start):
    """``LLM.generate`` tokenizes its text prompts a batch at a time (``inputs.parse_prompts``): each
    gets the ids ``tokenizer.encode`` gives it alone (with the special token a tokenizer puts first,
    where it does), across batch boundaries and beside token-id prompts; a bad prompt is named by
    its index before any is tokenized."""
    monkeypatch.setattr(inputs, "ENCODE_BATCH", 3)
    if marks_start:
        tokenizer = copy.deepcopy(tokenizer)
        start = (tokenizer.eos_token, tokenizer.convert_tokens_to_ids(tokenizer.eos_token))
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{start[0]} $A",
                                                                                  special_tokens=[start])
        assert tokenizer.encode("x")[0] == start[1]
    texts = ["def main():", "  leading spaces", "\u00e9moji \U0001f642 and \u00fcn\u00efcode", "a" * 500,
             "<|endoftext|> special", "x", "The quick brown fox"]
    prompts = [texts[0], {"prompt": texts[1]}, tokenizer.encode("ids"), texts[2],
               {"prompt_token_ids": [5, 6], "prompt": "t"}, *texts[3:]]
    parsed = inputs.parse_prompts(prompts, tokenizer)
    assert parsed == [inputs.parse_prompt(p, tokenizer) for p in prompts]
    assert [ids for text, ids in parsed if text in texts] == [tokenizer.encode(t) for t in texts]

    class Counting:
        calls = 0

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return tokenizer(*args, **kwargs)

    for bad, reason in (("", "empty"), ("lone \ud800", "lone surrogate"), (3.5, "a prompt must be")):
        with pytest.raises(ValueError, match=f"prompt {len(prompts)}: .*{reason}"):
            inputs.parse_prompts([*prompts, bad], Counting())
    assert Counting.calls == 0


def test_empty_prompt_list_returns_nothing(llm):
    assert llm.generate([], GREEDY, use_tqdm=False) == []


def test_one_sampling_params_per_prompt(llm):
    prompts = random_prompts([5, 9])
    outputs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 6)],
                           use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 6]


def test_seeded_request_samples_the_same_whatever_the_batch(llm):
    prompt = random_prompts([12], seed=5)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts([3, 30, 7], seed=9)
    mixed = llm.generate(others[:2] + [prompt] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=20)] * 2 + [seeded]
                         + [SamplingParams(temperature=0.7, max_tokens=5)], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=12, seed=99, ignore_eos=True)
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_top_k_one_is_greedy_at_any_temperature(llm):
    prompts = random_prompts([4, 20])
    greedy = llm.generate(prompts, GREEDY, use_tqdm=False)
    top1 = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in top1] == [o.outputs[0].token_ids for o in greedy]


def test_max_tokens_none_generates_until_max_model_len(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("gpt2"), device="cpu", max_model_len=40)
    out = llm.generate([list(range(3, 33))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


def test_eos_stops_generation_unless_ignored(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("opt"), device="cpu")
    prompt = random_prompts([10])[0]
    free_run = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.llm_engine.eos_token_ids = {free_run[2]}  # pretend the model's EOS is its third token
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free_run[:3] and (out.finish_reason, out.stop_reason) == ("stop", None)
    ignored = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == free_run and ignored.finish_reason == "length"
    assert EOS_ID in llm.__class__(tiny_checkpoint("opt"), device="cpu").llm_engine.eos_token_ids


@pytest.mark.parametrize("fmt", ["bin", "sharded-safetensors"])
def test_bin_and_sharded_checkpoints_load_as_hf_saved_them(tiny_checkpoint, tmp_path, fmt):
    src = tiny_checkpoint("llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    if fmt == "bin":
        model.config.save_pretrained(tmp_path)  # transformers 5 writes no .bin: save as older versions did
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        model.save_pretrained(tmp_path, max_shard_size="40KB")
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    for name in os.listdir(src):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(src, name), tmp_path)
    prompt = random_prompts([15])[0]
    out = LLM(str(tmp_path), device="cpu").generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == hf_greedy(model, prompt, 8)


def test_dummy_weights_from_a_bare_config(tiny_checkpoint, tmp_path):
    shutil.copy(os.path.join(tiny_checkpoint("mistral"), "config.json"), tmp_path)
    llm = LLM(str(tmp_path), device="cpu", load_format="dummy")
    assert llm.get_tokenizer() is None
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="no tokenizer: give prompts as token ids"):
        llm.generate("text", use_tqdm=False)


def test_dummy_weights_route_a_batch_over_every_expert(tmp_path, monkeypatch):
    """Random biases (the same for every token) once outweighed what differs between tokens and
    sent a gpt-oss batch to the same 4 of its 32 experts in deep layers: benchmark speed flattered."""
    from transformers import GptOssConfig

    import pagedllm.layers.moe as moe

    GptOssConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=12, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, num_local_experts=32, num_experts_per_tok=4, vocab_size=1000,
                 max_position_embeddings=512, architectures=["GptOssForCausalLM"]).save_pretrained(tmp_path)
    experts_hit, route = [], moe.route

    def counted(*args):
        weights, ids = route(*args)
        experts_hit.append(ids.unique().numel())
        return weights, ids

    monkeypatch.setattr(moe, "route", counted)
    llm = LLM(str(tmp_path), device="cpu", load_format="dummy", enforce_eager=True)
    experts_hit.clear()  # (the profile run's)
    llm.generate([random_prompts([64])[0]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(experts_hit) == 12 and min(experts_hit) >= 28  # 64 tokens x top 4 over 32 experts


def test_hub_id_resolves_from_the_local_hf_cache(tiny_checkpoint, tmp_path, monkeypatch):
    repo = tmp_path / "models--someorg--tiny-opt"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_checkpoint("opt"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    llm = LLM("someorg/tiny-opt", device="cpu")
    assert llm.llm_engine.config.model_path == str(repo / "snapshots" / commit)
    assert len(llm.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_progress_bar_reports_requests_and_tokens(llm, capsys):
    llm.generate(random_prompts([3, 4]), GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err and "tok/s" in err


def test_bf16_runs_on_cpu(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu", dtype="bfloat16")
    assert llm.llm_engine.executor.runner.kv_cache.dtype == torch.bfloat16
    out = llm.generate(random_prompts([9]), GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8


def test_fresh_checkpoint_builds_and_loads(tmp_path):
    path = build_tiny_checkpoint("gpt2", str(tmp_path / "gpt2"), seed=3)
    assert LLM(path, device="cpu").generate("x", GREEDY, use_tqdm=False)[0].finished


def test_shutdown_frees_the_model_and_refuses_more_work(tiny_checkpoint):
    import gc
    import weakref

    with LLM(tiny_checkpoint("gpt2"), device="cpu") as llm:
        model = weakref.ref(llm.llm_engine.executor.runner.model)
        cache = weakref.ref(llm.llm_engine.executor.runner.kv_cache)
        assert llm.generate([[5, 6]], GREEDY, use_tqdm=False)[0].finished
    gc.collect()
    assert model() is None and cache() is None
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[5, 6]], GREEDY, use_tqdm=False)
    llm.shutdown()  # a second shutdown does nothing


def test_shutdown_frees_the_model_and_kv_cache_without_the_collector(tiny_checkpoint):
    """On the CPU a shutdown runs no collection of the whole heap (in a long-lived process each took
    0.3-1 s, two per LLM: a third of this suite's time): the model and the KV cache must go by
    their reference counts alone, nothing holding them in a cycle."""
    import gc
    import weakref

    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    runner = llm.llm_engine.executor.runner
    model, cache = weakref.ref(runner.model), weakref.ref(runner.kv_cache)
    llm.generate([[5, 6]], GREEDY, use_tqdm=False)
    del runner
    gc.disable()
    try:
        llm.shutdown()
        assert model() is None and cache() is None
    finally:
        gc.enable()


def test_an_llm_in_a_reference_cycle_frees_its_weights_in_one_collection(tiny_checkpoint):
    """A notebook's history or a closure can put the LLM in a cycle: the collector then runs its
    shutdown, and the weights must go in that same collection (they stayed until the next one, and
    a benchmark's next LLM found them still allocated)."""
    import gc
    import weakref

    def make() -> weakref.ref:
        llm = LLM(tiny_checkpoint("llama"), device="cpu")
        llm.generate([[5, 6]], GREEDY, use_tqdm=False)
        llm.itself = llm
        return weakref.ref(next(llm.llm_engine.executor.runner.model.parameters()))

    weight = make()
    gc.collect()
    assert weight() is None or weight().numel() == 0
