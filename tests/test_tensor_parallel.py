"""Tensor parallelism on the CPU: worker processes joined by gloo give the outputs of one rank,
read only their slices of the checkpoint, and fail fast and clearly when a worker dies."""

import os
import signal
import time

import pytest
import torch
from conftest import random_prompts
from transformers import AutoModelForCausalLM, LlamaConfig

from pagedllm import LLM, SamplingParams
from pagedllm.testing import TINY_CONFIGS
from pagedllm.worker.tensor_parallel import WorkerFailed, _sigint_deferred

PROMPT_LENGTHS = [1, 3, 17, 40, 64, 120]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# A small token budget and cache: prefills are chunked and running requests get preempted.
PRESSURE = {"max_num_batched_tokens": 24, "num_kv_blocks": 12}


def greedy_tokens(path: str, **kwargs) -> list[list[int]]:
    with LLM(path, device="cpu", **kwargs) as llm:
        outputs = llm.generate(random_prompts(PROMPT_LENGTHS), GREEDY, use_tqdm=False)
        if kwargs.get("num_kv_blocks"):
            assert llm.llm_engine.scheduler.num_preemptions > 0
        return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("kind", TINY_CONFIGS)
def test_two_ranks_give_the_greedy_output_of_one(kind, tiny_checkpoint):
    """Every architecture; Mistral's one KV head is shared by both ranks."""
    path = tiny_checkpoint(kind)
    assert greedy_tokens(path, tensor_parallel_size=2, **PRESSURE) == greedy_tokens(path, **PRESSURE)


def test_async_scheduling_at_two_ranks_gives_the_seeded_samples_of_one(tiny_checkpoint):
    """Each rank feeds the decode inputs still pending on the host from rank 0's broadcast of the
    tokens the step before sampled; seeded samples then equal one rank's."""
    path = tiny_checkpoint("llama")
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=7, ignore_eos=True)

    def sample(**kwargs):
        with LLM(path, device="cpu", **kwargs) as llm:
            runner, fed = llm.llm_engine.executor.runner, []
            feed = runner._feed_pending_inputs
            runner._feed_pending_inputs = lambda rows: (fed.append(len(rows or [])), feed(rows))
            outputs = llm.generate(random_prompts([5, 17, 40]), params, use_tqdm=False)
            assert llm.llm_engine.async_scheduling and sum(fed) > 0
            return [o.outputs[0].token_ids for o in outputs]

    assert sample(tensor_parallel_size=2) == sample()


def test_four_ranks_share_kv_heads_and_pad_the_vocabulary(tmp_path, tokenizer):
    """2 KV heads on 4 ranks (each shared by two), and a vocabulary of 510 rows that 4 ranks split
    into 128-row shards with 2 rows of padding."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, vocab_size=510, initializer_range=0.2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert greedy_tokens(str(tmp_path), tensor_parallel_size=4) == greedy_tokens(str(tmp_path))


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
def test_sharded_checkpoint_each_rank_reads_only_its_slices(safetensors, tmp_path, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"])
    model.save_pretrained(tmp_path, max_shard_size="100KB", safe_serialization=safetensors)
    tokenizer.save_pretrained(tmp_path)
    assert len([f for f in os.listdir(tmp_path) if f.endswith((".safetensors", ".bin"))]) > 2
    total = sum(p.numel() * p.element_size() for p in model.parameters())

    with LLM(str(tmp_path), device="cpu", tensor_parallel_size=2) as llm:
        executor = llm.llm_engine.executor
        reads = [executor.runner.checkpoint_bytes_read, *executor.workers.checkpoint_bytes_read]
        outputs = llm.generate(random_prompts(PROMPT_LENGTHS), GREEDY, use_tqdm=False)
    # Only the norms (under 2% of this model) are read by both ranks; everything else by one.
    assert all(r < 0.51 * total for r in reads), (reads, total)
    assert sum(reads) >= total
    assert [o.outputs[0].token_ids for o in outputs] == greedy_tokens(str(tmp_path))


def test_killed_worker_makes_generate_fail_within_seconds(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu", tensor_parallel_size=2)
    worker = llm.llm_engine.executor.workers.procs[0]
    stream = llm.generate_stream(random_prompts([30] * 4), SamplingParams(temperature=0, max_tokens=200,
                                                                          ignore_eos=True))
    next(stream)
    os.kill(worker.pid, signal.SIGKILL)
    start = time.perf_counter()
    with pytest.raises(WorkerFailed, match=r"worker rank 1 \(pid \d+\) died with exit code -9"):
        for _ in stream:
            pass
    assert time.perf_counter() - start < 10
    with pytest.raises(WorkerFailed, match="create a new LLM"):
        llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)
    llm.shutdown()


def test_shutdown_stops_the_workers_and_a_new_group_can_start(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    llm = LLM(path, device="cpu", tensor_parallel_size=2)
    workers = llm.llm_engine.executor.workers.procs
    llm.shutdown()
    assert [w.exitcode for w in workers] == [0]
    assert greedy_tokens(path, tensor_parallel_size=2) == greedy_tokens(path)


def test_ctrl_c_during_a_step_waits_for_its_end_and_keeps_ranks_in_step(tiny_checkpoint):
    """Ctrl-C lands between steps, never between two ranks' collectives: the LLM stays usable."""
    path = tiny_checkpoint("llama")
    expected = greedy_tokens(path)
    with LLM(path, device="cpu", tensor_parallel_size=2) as llm:
        runner = llm.llm_engine.executor.runner
        forward = runner.run_forward

        def interrupted_forward(batch):
            os.kill(os.getpid(), signal.SIGINT)  # after the workers got the batch, before rank 0's part
            return forward(batch)

        runner.run_forward = interrupted_forward
        with pytest.raises(KeyboardInterrupt):
            llm.generate(random_prompts(PROMPT_LENGTHS), GREEDY, use_tqdm=False)
        runner.run_forward = forward
        outputs = llm.generate(random_prompts(PROMPT_LENGTHS), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert not llm.llm_engine.has_unfinished_requests()


def test_sigint_is_held_to_the_end_of_the_block():
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with _sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached_end = True
    assert reached_end


def test_one_rank_model_runs_beside_a_tensor_parallel_one(tiny_checkpoint):
    path = tiny_checkpoint("gpt2")
    with LLM(path, device="cpu", tensor_parallel_size=2) as sharded:
        with LLM(path, device="cpu") as whole:
            one = [o.outputs[0].token_ids for o in whole.generate(random_prompts(PROMPT_LENGTHS), GREEDY,
                                                                   use_tqdm=False)]
        two = [o.outputs[0].token_ids for o in sharded.generate(random_prompts(PROMPT_LENGTHS), GREEDY,
                                                                 use_tqdm=False)]
        assert one == two
        with pytest.raises(ValueError, match=r"already holds a torch.distributed process group"):
            LLM(path, device="cpu", tensor_parallel_size=2)


def test_a_script_without_main_guard_read_from_stdin_runs_and_exits(tiny_checkpoint):
    """Workers are forked where that is safe, as vLLM does: dataset scripts rarely have the
    `if __name__ == "__main__":` guard, and some are fed on stdin. The script ends without
    shutdown(): every process is gone within seconds."""
    import subprocess
    import sys

    script = (f"from pagedllm import LLM, SamplingParams\n"
              f"llm = LLM({tiny_checkpoint('llama')!r}, device='cpu', tensor_parallel_size=2)\n"
              f"out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)\n"
              f"print('tokens', out[0].outputs[0].token_ids)\n")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tokens [" in run.stdout and time.perf_counter() - start < 60
