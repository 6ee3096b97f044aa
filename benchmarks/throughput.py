"""End-to-end throughput of pagedllm against HF transformers on the workloads of BENCHMARKS.md.

Every engine runs in this one process on the same prompts, after one short warm-up: pagedllm
first (then freed), then HF static ``generate`` at batch 64 and 256 and HF continuous batching
(``generate_batch``). Models are built from the real configs in benchmarks/model_configs with
random weights; every request ignores EOS and generates exactly its output length.

Usage: python benchmarks/throughput.py --workload W1 [--workload L1 ...] [--no-peers] [--out DIR]
"""

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    environment,
    gpu_peaks,
    warm_up_gpu,
    write_result,
)
from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.layers.vocab import ParallelLMHead, VocabParallelEmbedding  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


@dataclass(frozen=True)
class Workload:
    name: str
    config: str
    dtype: torch.dtype
    num_requests: int
    prompt_len: int | tuple[int, int]  # fixed, or uniform in [lo, hi]
    output_len: int | tuple[int, int]
    hf_static_batch_sizes: tuple[int, ...] = (64, 256)


WORKLOADS = {w.name: w for w in [
    Workload("W1", "opt-1.3b", torch.float16, 512, 256, 256),
    Workload("W2", "llama-3-8b", torch.bfloat16, 256, 256, 256),
    Workload("W3", "qwen3-0.6b", torch.bfloat16, 256, (100, 1024), (100, 1024)),
    Workload("W4", "llama-3-8b", torch.bfloat16, 32, 8192, 512, (32,)),
    Workload("L1", "llama-3-8b", torch.bfloat16, 1, 128, 512, (1,)),
]}


def model_dir(workload: Workload) -> str:
    """A directory holding only the real config.json (random weights are built from it).
    W4's 8192 + 512 tokens need positions past Llama-3's 8192: the copy raises
    max_position_embeddings to cover them (rotary positions; no weight depends on it)."""
    path = tempfile.mkdtemp(prefix=f"pagedllm-{workload.name}-")
    with open(os.path.join(CONFIGS, f"{workload.config}.json")) as f:
        config = json.load(f)
    needed = _max(workload.prompt_len) + _max(workload.output_len)
    if config.get("max_position_embeddings", needed) < needed:
        config["max_position_embeddings"] = needed
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def _max(length: int | tuple[int, int]) -> int:
    return length if isinstance(length, int) else length[1]


def make_requests(workload: Workload, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """Prompts of random ids in [10, vocab - 10) and output lengths, from one seeded generator."""
    g = torch.Generator().manual_seed(0)

    def draw(length):
        return length if isinstance(length, int) else int(torch.randint(length[0], length[1] + 1, (1,), generator=g))

    prompts, output_lens = [], []
    for _ in range(workload.num_requests):
        prompt_len, output_len = draw(workload.prompt_len), draw(workload.output_len)
        prompts.append(torch.randint(10, vocab_size - 10, (prompt_len,), generator=g).tolist())
        output_lens.append(output_len)
    return prompts, output_lens


def run_pagedllm(path: str, workload: Workload, prompts, output_lens) -> dict:
    start = time.perf_counter()
    llm = LLM(path, load_format="dummy", dtype=workload.dtype, max_model_len=max(
        len(p) + o for p, o in zip(prompts, output_lens, strict=True)))
    startup_s = time.perf_counter() - start
    engine = llm.llm_engine
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    steps = []  # per step: (tokens computed, context after the step) of each scheduled request
    blocks_used, tokens_held = [], []
    execute = engine.model_runner.execute

    def recording_execute(out):
        steps.append([(n, r.num_computed_tokens + n)
                      for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)])
        manager = engine.block_manager
        blocks_used.append(manager.num_blocks - manager.num_free_blocks)
        tokens_held.append(sum(r.num_computed_tokens for r in engine.scheduler.running) + out.total_num_tokens)
        return execute(out)

    engine.model_runner.execute = recording_execute
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert [len(o.outputs[0].token_ids) for o in outputs] == output_lens
    allocated_slots = sum(blocks_used) * engine.config.block_size
    result = {
        "engine": "pagedllm", "wall_s": wall, "startup_s": startup_s, "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (output_tokens + sum(map(len, prompts))) / wall,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "kv_cache_blocks": engine.block_manager.num_blocks, "block_size": engine.config.block_size,
        "kv_peak_blocks_used": max(blocks_used),
        "kv_waste_fraction": 1 - sum(tokens_held) / allocated_slots if allocated_slots else 0.0,
        "num_steps": len(steps), "num_preemptions": engine.scheduler.num_preemptions,
        "cuda_graphs": engine.model_runner.decode_graphs is not None,
    }
    return result | {"roofline": roofline(steps, _model_stats(llm))}


def _model_stats(llm: LLM) -> dict:
    runner = llm.llm_engine.model_runner
    g = runner.geometry
    lm_head = runner.model.lm_head.weight
    embeddings = [m.weight for m in runner.model.modules()
                  if isinstance(m, (torch.nn.Embedding, VocabParallelEmbedding)) and not isinstance(m, ParallelLMHead)]
    matmul_params = sum(p.numel() for p in runner.model.parameters()) - sum(w.numel() for w in embeddings)
    if any(w is lm_head for w in embeddings):
        matmul_params += lm_head.numel()  # tied: counted once as embedding, but used as a matmul
    num_heads = llm.llm_engine.config.hf_config.num_attention_heads
    return {"weight_bytes": runner.weight_bytes, "matmul_params": matmul_params, "num_layers": g.num_layers,
            "num_heads": num_heads, "head_dim": g.head_dim,
            "kv_bytes_per_token": g.bytes_per_block // g.block_size, "lm_head_params": lm_head.numel()}


def roofline(steps: list, stats: dict) -> dict:
    """The least time each step of the run could take on this GPU: max(bytes / copy bandwidth, FLOPs / matmul peak),
    bytes = weights + the K/V each sequence reads, FLOPs = 2 x matmul params x tokens + attention."""
    least, peaks = 0.0, gpu_peaks()
    for step in steps:
        tokens = sum(n for n, _ in step)
        kv_read = sum(ctx for _, ctx in step) * stats["kv_bytes_per_token"]
        attention_flops = sum(4 * stats["num_layers"] * stats["num_heads"] * stats["head_dim"] * n * (ctx - n / 2)
                              for n, ctx in step)
        flops = 2 * stats["matmul_params"] * tokens + attention_flops
        least += max((stats["weight_bytes"] + kv_read) / peaks["hbm_bytes_per_s"], flops / peaks["bf16_flops"])
    return {"least_time_s": least, **stats}


def run_hf_static(path: str, workload: Workload, prompts, output_lens, batch_size: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=workload.dtype).eval()

    def run(batch_prompts, batch_outputs):
        width = max(map(len, batch_prompts))
        ids = torch.zeros(len(batch_prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch_prompts):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        n = max(batch_outputs)
        model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)

    try:
        run(prompts[:2], [8, 8])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            run(prompts[i:i + batch_size], output_lens[i:i + batch_size])
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        result = _peer_result(f"hf-static-bs{batch_size}", wall, prompts, output_lens)
    except Exception as err:  # an OOM or an API change is a result too
        result = {"engine": f"hf-static-bs{batch_size}", "error": _error(err)}
    return result


def run_hf_continuous(path: str, workload: Workload, prompts, output_lens) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=workload.dtype).eval()
    try:
        if len(set(output_lens)) == 1:
            def run(batch, lens):
                gen = GenerationConfig(max_new_tokens=lens[0], do_sample=False, eos_token_id=-1)
                model.generate_batch(inputs=batch, generation_config=gen)
        else:  # each request its own length
            def run(batch, lens):
                gen = GenerationConfig(max_new_tokens=max(lens), do_sample=False, eos_token_id=-1)
                manager = model.init_continuous_batching(generation_config=gen)
                manager.start()
                for ids, n in zip(batch, lens, strict=True):
                    manager.add_request(ids, max_new_tokens=n)
                for _ in batch:
                    manager.get_result(timeout=3600)
                manager.stop()

        run(prompts[:2], [8, 8])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run(prompts, output_lens)
        torch.cuda.synchronize()
        result = _peer_result("hf-continuous-batching", time.perf_counter() - start, prompts, output_lens)
    except Exception as err:
        result = {"engine": "hf-continuous-batching", "error": _error(err)}
    return result


def _peer_result(engine: str, wall: float, prompts, output_lens) -> dict:
    output_tokens = sum(output_lens)
    return {"engine": engine, "wall_s": wall, "output_tokens": output_tokens,
            "output_tokens_per_s": output_tokens / wall,
            "total_tokens_per_s": (output_tokens + sum(map(len, prompts))) / wall,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}".strip() + (
        "" if isinstance(err, torch.OutOfMemoryError) else f" [{traceback.format_exc().splitlines()[-3].strip()}]")


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_workload(workload: Workload, peers: bool, out_dir: str | None) -> dict:
    path = model_dir(workload)
    try:
        from transformers import AutoConfig

        prompts, output_lens = make_requests(workload, AutoConfig.from_pretrained(path).vocab_size)
        ours = run_pagedllm(path, workload, prompts, output_lens)
        _free_gpu()  # each engine's memory goes with its function's frame
        ours["roofline_fraction"] = ours["roofline"]["least_time_s"] / ours["wall_s"]
        peer_results = []
        if peers:
            for bs in workload.hf_static_batch_sizes:
                peer_results.append(run_hf_static(path, workload, prompts, output_lens, bs))
                _free_gpu()
            peer_results.append(run_hf_continuous(path, workload, prompts, output_lens))
            _free_gpu()
        done = [p["output_tokens_per_s"] for p in peer_results if "output_tokens_per_s" in p]
        ours["ratio_vs_best_hf"] = ours["output_tokens_per_s"] / max(done) if done else None
        payload = {"benchmark": "throughput", "workload": workload.name, "model_config": workload.config,
                   "dtype": str(workload.dtype).split(".")[-1], "num_requests": workload.num_requests,
                   "prompt_len": workload.prompt_len, "output_len": workload.output_len,
                   "environment": environment(), "pagedllm": ours, "peers": peer_results}
        if peers:
            print(f"wrote {write_result(f'throughput-{workload.name}', payload, out_dir)}")
        return payload
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", action="append", choices=list(WORKLOADS), required=True)
    parser.add_argument("--no-peers", action="store_true", help="pagedllm alone (not written as a result)")
    parser.add_argument("--out", help="also write the JSON here (the device tool's $OUT)")
    args = parser.parse_args()
    warm_up_gpu()
    for name in args.workload:
        payload = run_workload(WORKLOADS[name], not args.no_peers, args.out)
        ours = payload["pagedllm"]
        print(f"{name}: pagedllm {ours['output_tokens_per_s']:.0f} output tok/s in {ours['wall_s']:.1f} s "
              f"(start-up {ours['startup_s']:.1f} s, roofline fraction {ours['roofline_fraction']:.2f}, "
              f"KV waste {100 * ours['kv_waste_fraction']:.2f}%, steps {ours['num_steps']})")
        for peer in payload["peers"]:
            figure = f"{peer['output_tokens_per_s']:.0f} output tok/s" if "error" not in peer else peer["error"]
            print(f"    {peer['engine']}: {figure}")
        if ours["ratio_vs_best_hf"]:
            print(f"    ratio vs best HF: {ours['ratio_vs_best_hf']:.2f}")


if __name__ == "__main__":
    main()
