"""The same engine on a GPU: greedy equality with HF on CUDA, and the profiled KV cache size."""

import pytest
import torch
from conftest import hf_model, random_prompts

from pagedllm import LLM, SamplingParams
from pagedllm.testing import TINY_CONFIGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kind", TINY_CONFIGS)
def test_greedy_matches_hf_on_cuda(kind, tiny_checkpoint):
    prompts = random_prompts([1, 7, 33, 100])
    hf = hf_model(kind, tiny_checkpoint(kind)).cuda()
    expected = []
    for p in prompts:
        out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    llm = LLM(tiny_checkpoint(kind), device="cuda", dtype="float32", num_kv_blocks=64,
              max_num_batched_tokens=48)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_the_batch_defaults_read_the_gpu_through_nvml_leaving_cuda_uninitialised(tiny_checkpoint):
    """NVML's memory and name are CUDA's; a fresh process's config leaves CUDA uninitialised (so that
    tensor-parallel workers and data-parallel replicas can still be forked)."""
    import json
    import subprocess
    import sys

    from pagedllm.config import gpu_memory_and_name

    props = torch.cuda.get_device_properties(0)
    total, name = gpu_memory_and_name(0)
    assert (name, abs(total - props.total_memory) < 1 << 30) == (props.name, True)
    script = ("import json, sys, torch; from pagedllm.config import EngineConfig; c = EngineConfig(sys.argv[1]); "
              "print(json.dumps([c.max_num_seqs, c.max_num_batched_tokens, torch.cuda.is_initialized()]))")
    seqs, tokens, initialised = json.loads(subprocess.run([sys.executable, "-c", script, tiny_checkpoint("llama")],
                                                          capture_output=True, text=True, check=True).stdout)
    large = props.total_memory >= 70 << 30 and "a100" not in props.name.lower()
    assert (seqs, tokens, initialised) == ((1024, 16384) if large else (256, 8192)) + (False,)


def test_kv_cache_fills_gpu_memory_utilization(tiny_checkpoint, monkeypatch):
    from pagedllm.worker import model_runner

    sampled_rows, profile_sampler = [], model_runner.profile_sampler  # the profile run samples its logits,
    monkeypatch.setattr(model_runner, "profile_sampler",  # so that the sampler's memory is counted
                        lambda logits, k: sampled_rows.append(len(logits)) or profile_sampler(logits, k))
    total = torch.cuda.mem_get_info()[1]
    llm = LLM(tiny_checkpoint("llama"), device="cuda", gpu_memory_utilization=0.3, max_num_batched_tokens=2048)
    assert sampled_rows == [llm.llm_engine.config.max_num_seqs]
    runner = llm.llm_engine.executor.runner
    cache_bytes = runner.kv_cache.numel() * runner.kv_cache.element_size()
    assert 0.2 * total < cache_bytes < 0.3 * total
    sampled = SamplingParams(temperature=0.8, top_k=20, max_tokens=8, seed=3)
    assert len(llm.generate(random_prompts([12]), sampled, use_tqdm=False)[0].outputs[0].token_ids) == 8
    del runner
    llm.shutdown()


@pytest.mark.parametrize("kind", ["llama", "opt", "gemma3", "qwen3-moe"])
def test_cuda_graph_decode_equals_eager(kind, tiny_checkpoint):
    # 5 and 19 sequences run in graphs of 8 and 32 rows: the padding must not change any output
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for eager in (True, False):
        llm = LLM(tiny_checkpoint(kind), device="cuda", dtype="float32", num_kv_blocks=256,
                  max_num_seqs=32, enforce_eager=eager)
        assert (llm.llm_engine.executor.runner.decode_graphs is None) == eager
        outputs[eager] = [[o.outputs[0].token_ids for o in llm.generate(random_prompts(lengths), params,
                                                                         use_tqdm=False)]
                          for lengths in ([3, 50, 7, 1, 90], list(range(1, 96, 5)))]
        llm.shutdown()
    assert outputs[True] == outputs[False]


def test_shutdown_returns_gpu_memory_for_a_second_model(tiny_checkpoint):
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    with LLM(tiny_checkpoint("llama"), device="cuda", gpu_memory_utilization=0.5) as llm:
        assert torch.cuda.memory_allocated() > before + (1 << 30)
        llm.generate(random_prompts([5]), SamplingParams(max_tokens=4), use_tqdm=False)
    assert torch.cuda.memory_allocated() < before + (64 << 20)
    with LLM(tiny_checkpoint("opt"), device="cuda", gpu_memory_utilization=0.5) as second:
        assert second.generate(random_prompts([5]), SamplingParams(max_tokens=4), use_tqdm=False)[0].finished


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 16, 33, 300])  # few_rows_matmul (16-bit) up to FEW_ROWS, then cuBLASLt's epilogue
def test_linear_with_relu_equals_linear_then_relu(dtype, rows):
    """OPT's fc1 takes its ReLU inside the product (cuBLASLt's bias+ReLU epilogue) where it can."""
    from pagedllm.layers.linear import linear

    torch.manual_seed(0)
    x = torch.randn(rows, 256, device="cuda", dtype=dtype)
    weight = torch.randn(1024, 256, device="cuda", dtype=dtype) / 16
    bias = torch.randn(1024, device="cuda", dtype=dtype)
    for b in (bias, None):
        want = torch.relu(linear(x, weight, b, None))
        got = linear(x, weight, b, None, relu=True)
        assert got.shape == want.shape == (rows, 1024) and (got >= 0).all() and (got == 0).any()
        torch.testing.assert_close(got, want)
