"""The profile run before the KV cache is sized: the largest step, its sampling, and the longest
context's last chunk, so that a user's run compiles no kernel in its middle."""

import os
import shutil

import pytest
import torch
from conftest import random_prompts

from pagedllm import LLM, SamplingParams

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "model_configs")


@pytest.mark.parametrize("kind", ["llama", "gemma3"])  # gemma3: its sliding layers keep a pool of their own
def test_profile_run_ends_with_the_longest_context(kind, tiny_checkpoint, monkeypatch):
    llm = LLM(tiny_checkpoint(kind), device="cpu", max_model_len=200, max_num_batched_tokens=64, max_num_seqs=8)
    runner = llm.llm_engine.executor.runner
    steps = []
    forward = runner._forward
    monkeypatch.setattr(runner, "_forward", lambda chunks, *rest: steps.append(chunks) or forward(chunks, *rest))
    assert runner._dummy_run() > 0
    largest, longest = steps[-2:]
    assert sum(len(c.token_ids) for c in largest) == 64 and len(largest) == 8
    (chunk,) = longest
    assert len(chunk.token_ids) == 64 and chunk.start + 64 == 200 and len(chunk.block_table) == -(-200 // 16)
    assert (chunk.window_block_table is not None) == (kind == "gemma3")
    llm.shutdown()


def _compiled_kernels() -> dict[str, int]:
    """Compiled variants of each of the library's Triton kernels, in this process."""
    import triton

    from pagedllm_kernels import cache_ops, elementwise, fp8_ops, fused_moe, paged_attention, sampling_ops

    modules = (cache_ops, elementwise, fp8_ops, fused_moe, paged_attention, sampling_ops)
    return {f"{m.__name__}.{name}": sum(len(caches[0]) for caches in kernel.device_caches.values())
            for m in modules for name, kernel in vars(m).items() if isinstance(kernel, triton.runtime.jit.JITFunction)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's compiled kernels need CUDA")
def test_no_kernel_compiles_after_start_up(tmp_path):
    """Qwen3-0.6B's real shapes: after start-up, steps of every kind (one long prompt, short ones
    in many batch sizes, mixed steps, greedy and random rows, seeds, logprobs, n > 1, prompt
    logprobs) run only kernels compiled already: each compile would stall a user's run ~0.2-1 s."""
    shutil.copy(os.path.join(CONFIGS, "qwen3-0.6b.json"), tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy", max_model_len=2048, gpu_memory_utilization=0.3)
    started = _compiled_kernels()
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    random = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, min_p=0.02, max_tokens=24, ignore_eos=True,
                            seed=1, logprobs=3, n=2, repetition_penalty=1.1, presence_penalty=0.5)
    llm.generate(random_prompts([1500], high=150_000), greedy, use_tqdm=False)
    for count in (1, 3, 17, 40, 300):
        prompts = random_prompts([1 + (i * 37) % 700 for i in range(count)], seed=count, high=150_000)
        llm.generate(prompts, [greedy, random][count % 2], use_tqdm=False)
    llm.generate(random_prompts([30, 90]), SamplingParams(max_tokens=4, prompt_logprobs=2, logprobs=20),
                 use_tqdm=False)
    after = _compiled_kernels()
    llm.shutdown()
    assert {k: (started[k], n) for k, n in after.items() if n != started[k]} == {}
