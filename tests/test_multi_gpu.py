"""Tensor parallelism over NCCL on several GPUs (skipped on machines with fewer than two)."""

import pytest
import torch
from conftest import random_prompts

from pagedllm import LLM, SamplingParams
from pagedllm.testing import TINY_CONFIGS

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def greedy_on_cuda(path: str, tensor_parallel_size: int, **kwargs) -> list[list[int]]:
    # float32, so that the ranks' different summation order cannot flip an argmax
    with LLM(path, device="cuda", dtype="float32", num_kv_blocks=256, max_num_seqs=32, max_num_batched_tokens=64,
             tensor_parallel_size=tensor_parallel_size, **kwargs) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(random_prompts([1, 7, 33, 100, 5]), GREEDY,
                                                             use_tqdm=False)]


@pytest.mark.parametrize("kind", TINY_CONFIGS)
def test_nccl_ranks_give_the_greedy_output_of_one_gpu(kind, tiny_checkpoint):
    """Decode CUDA graphs with all-reduces inside, chunked prefill, every architecture."""
    expected = greedy_on_cuda(tiny_checkpoint(kind), 1)
    for size in (2, 4):
        if size <= torch.cuda.device_count() and TINY_CONFIGS[kind].num_attention_heads % size == 0:
            assert greedy_on_cuda(tiny_checkpoint(kind), size) == expected, f"tensor_parallel_size={size}"


def test_symmetric_memory_all_reduce_gives_the_greedy_output_of_one_gpu(tiny_checkpoint):
    """disable_custom_all_reduce=False: decode graphs all-reduce through symmetric memory, the
    prefill's larger messages through NCCL."""
    path = tiny_checkpoint("llama")
    assert greedy_on_cuda(path, 2, disable_custom_all_reduce=False) == greedy_on_cuda(path, 1)


def run_script(body: str, timeout: float = 180):
    """A user's script fed on stdin (no main guard), timed to its exit."""
    import subprocess
    import sys
    import time

    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-"], input=body, capture_output=True, text=True, timeout=timeout)
    return run, time.perf_counter() - start


def test_a_script_that_just_ends_exits_within_seconds(tiny_checkpoint):
    """No shutdown() and no main guard: the workers are forked (this process has not initialised
    CUDA: devices are counted through NVML), and at exit every rank leaves the NCCL group together,
    so nothing hangs (destroy_process_group once waited forever)."""
    run, seconds = run_script(
        f"from pagedllm import LLM, SamplingParams\n"
        f"llm = LLM({tiny_checkpoint('llama')!r}, device='cuda', dtype='float32', tensor_parallel_size=2)\n"
        f"print('tokens', llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), "
        f"use_tqdm=False)[0].outputs[0].token_ids)\n")
    assert run.returncode == 0 and "tokens [" in run.stdout, run.stderr[-3000:]
    print(f"script with tensor_parallel_size=2 ran and exited in {seconds:.1f} s")


def test_shutdown_then_a_new_group_and_a_killed_worker_on_nccl(tiny_checkpoint):
    import os
    import signal
    import time

    from pagedllm.worker.tensor_parallel import WorkerFailed

    path = tiny_checkpoint("qwen3")
    llm = LLM(path, device="cuda", dtype="float32", tensor_parallel_size=2)
    workers = llm.llm_engine.executor.workers.procs
    start = time.perf_counter()
    llm.shutdown()
    assert [w.exitcode for w in workers] == [0] and time.perf_counter() - start < 30
    llm = LLM(path, device="cuda", dtype="float32", tensor_parallel_size=2)  # a new group in the same process
    stream = llm.generate_stream(random_prompts([30] * 4), SamplingParams(temperature=0, max_tokens=200,
                                                                          ignore_eos=True))
    next(stream)
    os.kill(llm.llm_engine.executor.workers.procs[0].pid, signal.SIGKILL)
    start = time.perf_counter()
    with pytest.raises(WorkerFailed):
        for _ in stream:
            pass
    assert time.perf_counter() - start < 30
    llm.shutdown()
