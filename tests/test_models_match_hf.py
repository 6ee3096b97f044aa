"""Greedy outputs equal HF transformers token for token, for every architecture and under every
scheduling pressure: queueing, chunked prefill, preemption."""

import pytest
import torch
from conftest import hf_greedy, hf_model, random_prompts
from transformers import AutoModelForCausalLM

from pagedllm import LLM, SamplingParams
from pagedllm.testing import TINY_CONFIGS

PROMPT_LENGTHS = [1, 3, 17, 40, 64, 120]
MAX_TOKENS = 16
SCENARIOS = {
    "default": {},
    "queueing": {"max_num_seqs": 2},
    "chunked-prefill": {"max_num_batched_tokens": 24},
    # 6 prompts of up to 136 tokens in 12 blocks of 16: running requests must be preempted.
    "preemption": {"num_kv_blocks": 12},
}


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoint):
    cache: dict[str, list[list[int]]] = {}

    def get(kind: str) -> list[list[int]]:
        if kind not in cache:
            model = hf_model(kind, tiny_checkpoint(kind))
            cache[kind] = [hf_greedy(model, p, MAX_TOKENS) for p in random_prompts(PROMPT_LENGTHS)]
        return cache[kind]

    return get


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", TINY_CONFIGS)
def test_greedy_matches_hf(kind, scenario, tiny_checkpoint, hf_reference):
    llm = LLM(tiny_checkpoint(kind), device="cpu", **SCENARIOS[scenario])
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(random_prompts(PROMPT_LENGTHS), params, use_tqdm=False)

    assert [o.outputs[0].token_ids for o in outputs] == hf_reference(kind)
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outputs)
    engine = llm.llm_engine
    if scenario == "preemption":
        assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_longrope_takes_its_long_factors_when_contexts_may_pass_the_original_length(tmp_path, tokenizer):
    """Phi-3's LongRoPE with max_model_len past original_max_position_embeddings (32) uses the long
    factors throughout, as HF does once a sequence passes 32: equal to HF on prompts longer than 32.
    Within 32 (max_model_len=32) the short factors, as HF."""
    phi3 = TINY_CONFIGS["phi3"]
    config = type(phi3)(**{**phi3.to_dict(), "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf = hf.float().eval()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for max_model_len, prompts in ((256, random_prompts([33, 60, 120])), (32, random_prompts([1, 9, 16]))):
        outputs = LLM(str(tmp_path), device="cpu", max_model_len=max_model_len).generate(prompts, params,
                                                                                         use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


def test_gemma3_image_and_text_checkpoints_run_their_language_model(tmp_path, tokenizer):
    """gemma-3-4b and up are Gemma3ForConditionalGeneration checkpoints: text prompts run their
    language model, equal to HF's whole model on the same ids; the vision tower is not loaded."""
    from transformers import AutoModelForImageTextToText, Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=TINY_CONFIGS["gemma3"].to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=509, boi_token_index=510, eoi_token_index=511)
    torch.manual_seed(0)
    hf = AutoModelForImageTextToText.from_config(config)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    hf = hf.float().eval()
    prompts = random_prompts([1, 17, 64], high=500)
    llm = LLM(str(tmp_path), device="cpu")
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    assert not any("vision" in name for name, _ in llm.llm_engine.executor.runner.model.named_parameters())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliding_window_models_release_the_blocks_that_slide_out(backend, tiny_checkpoint, monkeypatch):
    """Mistral's every layer sees the last 48 positions: a 200-token prompt in chunks of 16 and 40
    tokens more hold at most a window's blocks (and a chunk's), not the whole sequence's, and the
    output is still HF's."""
    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", backend)
    path = tiny_checkpoint("mistral")
    prompt = random_prompts([200], seed=9)[0]
    llm = LLM(path, device="cpu", dtype="float32", max_num_batched_tokens=16, enable_prefix_caching=False)
    engine = llm.llm_engine
    assert engine.block_manager.sliding_window == 48
    engine.add_request("0", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    peak, outputs = 0, []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        peak = max(peak, engine.block_manager.num_blocks - engine.block_manager.num_free_blocks)
    assert peak <= -(-(48 + 16) // 16) + 1 < -(-240 // 16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert outputs[-1].outputs[0].token_ids == hf_greedy(hf, prompt, 40)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gemma3s_sliding_layers_keep_only_their_windows_blocks(backend, tiny_checkpoint, monkeypatch):
    """Gemma 3 mixes sliding layers (window 24) with a full one: the sliding layers get a pool of
    their own whose blocks are released as they slide out, while the full layer's pool keeps the
    whole sequence. A 200-token prompt in chunks of 16 and 40 tokens more: greedy output is HF's,
    the sliding pool never holds more than a window's and a chunk's blocks."""
    from pagedllm.engine.block_manager import HybridBlockManager

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", backend)
    path = tiny_checkpoint("gemma3")
    prompt = random_prompts([200], seed=9)[0]
    llm = LLM(path, device="cpu", dtype="float32", max_num_batched_tokens=16, max_num_seqs=4)
    engine, runner = llm.llm_engine, llm.llm_engine.executor.runner
    manager = engine.block_manager
    assert isinstance(manager, HybridBlockManager) and manager.window.sliding_window == 24
    assert len(runner.pools.window_layers) == 2 and len(runner.pools.layers) == 1
    assert runner.window_kv_cache.shape[:3] == (2, 2, runner.num_window_kv_blocks)
    assert runner.num_window_kv_blocks == 4 * (-(-24 // 16) + 2) + 2  # four requests' windows, two steps' chunks
    engine.add_request("0", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    window_peak, full_peak, outputs = 0, 0, []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        window_peak = max(window_peak, manager.window.num_blocks - manager.window.num_free_blocks)
        full_peak = max(full_peak, manager.num_blocks - manager.num_free_blocks)
    assert window_peak <= -(-(24 + 16) // 16) + 1 and full_peak == -(-240 // 16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert outputs[-1].outputs[0].token_ids == hf_greedy(hf, prompt, 40)
    assert manager.num_free_blocks == manager.num_blocks and manager.window.num_free_blocks == manager.window.num_blocks


def test_gemma3_reuses_a_cached_prefix_across_its_two_pools(tiny_checkpoint):
    """Prefix caching with Gemma 3's two pools: requests sharing a 120-token prefix (well past the
    window of 24) take it from the cache, and their greedy outputs are HF's."""
    path = tiny_checkpoint("gemma3")
    prefix = random_prompts([120], seed=5)[0]
    prompts = [prefix + tail for tail in random_prompts([7, 13, 2], seed=6)]
    llm = LLM(path, device="cpu", dtype="float32", max_num_batched_tokens=32, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompts[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    rest = [o.outputs[0].token_ids for o in llm.generate(prompts[1:], params, use_tqdm=False)]
    manager = llm.llm_engine.block_manager
    assert manager.num_cache_hits >= 2 * (120 // 16)  # each later request took the prefix's full blocks
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert [first, *rest] == [hf_greedy(hf, p, 12) for p in prompts]


def test_a_sliding_window_model_takes_a_request_longer_than_its_cache(tiny_checkpoint):
    """8 blocks hold 128 tokens; a 240-token request of Mistral (window 48) never holds more than a
    window's and two chunks' blocks, so it is accepted and runs, equal to HF. Llama, whose layers
    see everything, is refused the same request, by name."""
    prompt = random_prompts([200], seed=9)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    path = tiny_checkpoint("mistral")
    llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=8, max_num_batched_tokens=16)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert out == hf_greedy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), prompt, 40)
    llama = LLM(tiny_checkpoint("llama"), device="cpu", num_kv_blocks=8, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="needs 15 KV cache blocks of 16 tokens, but the cache has only 8"):
        llama.generate([prompt], params, use_tqdm=False)


def test_stop_token_ends_output_where_hf_produced_it(tiny_checkpoint, hf_reference):
    prompt = random_prompts(PROMPT_LENGTHS)[3]
    expected = hf_reference("llama")[3]
    stop = expected[5]
    cut = expected.index(stop) + 1
    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == expected[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_min_tokens_bans_stop_tokens_until_reached(tiny_checkpoint, hf_reference):
    prompt = random_prompts(PROMPT_LENGTHS)[3]
    first = hf_reference("llama")[3][0]
    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=3, stop_token_ids=[first])
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != first  # banned at step one, so greedy picks the runner-up
    assert first not in out.token_ids[:3]
    assert len(out.token_ids) >= 3


@pytest.mark.parametrize("kind", ["llama", "mistral", "opt", "phi3", "gemma2", "gemma3", "qwen3", "gpt-oss"])
def test_triton_kernels_end_to_end_match_hf(kind, tiny_checkpoint, hf_reference, monkeypatch):
    """The whole engine through the Triton kernels (under the interpreter on CPU), chunked prefill
    included; the rotary kernel writes the KV cache wherever the whole head rotates, as on CUDA
    (Gemma 3's sliding layers into their own pool; Phi-3's partial rotary stores apart, as OPT's and
    SmolLM3's layers without rotary do)."""
    from pagedllm.layers.rotary import RotaryEmbedding

    monkeypatch.setenv("PAGEDLLM_ATTENTION_BACKEND", "triton")
    monkeypatch.setattr(RotaryEmbedding, "one_kernel", lambda self, q: self.rotary_dim == self.head_dim)
    llm = LLM(tiny_checkpoint(kind), max_num_batched_tokens=48, num_kv_blocks=64, dtype="float32")
    assert llm.llm_engine.executor.runner.attention_backend == "triton"
    # half HF's tokens (greedy: their first half) of three of its prompts (one token, one chunk, a prompt
    # over three chunks), as each interpreted step costs ~0.5 s and each sequence adds to it
    kept = [0, 3, 5]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS // 2, ignore_eos=True)
    outputs = llm.generate([random_prompts(PROMPT_LENGTHS)[i] for i in kept], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_reference(kind)[i][:MAX_TOKENS // 2] for i in kept]
