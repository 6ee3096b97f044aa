"""Tensor parallelism over NCCL on several GPUs (skipped on machines with fewer than two)."""

import pytest
import torch
from conftest import random_prompts

from pagedllm import LLM, SamplingParams
from pagedllm.testing import TINY_CONFIGS

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def greedy_on_cuda(path: str, tensor_parallel_size: int) -> list[list[int]]:
    # float32, so that the ranks' different summation order cannot flip an argmax
    with LLM(path, device="cuda", dtype="float32", num_kv_blocks=256, max_num_seqs=32, max_num_batched_tokens=64,
             tensor_parallel_size=tensor_parallel_size) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(random_prompts([1, 7, 33, 100, 5]), GREEDY,
                                                             use_tqdm=False)]


@pytest.mark.parametrize("kind", TINY_CONFIGS)
def test_nccl_ranks_give_the_greedy_output_of_one_gpu(kind, tiny_checkpoint):
    """Decode CUDA graphs with all-reduces inside, chunked prefill, every architecture."""
    expected = greedy_on_cuda(tiny_checkpoint(kind), 1)
    for size in (2, 4):
        if size <= torch.cuda.device_count() and TINY_CONFIGS[kind].num_attention_heads % size == 0:
            assert greedy_on_cuda(tiny_checkpoint(kind), size) == expected, f"tensor_parallel_size={size}"
