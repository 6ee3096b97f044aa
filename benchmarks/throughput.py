"""End-to-end throughput of pagedllm against HF transformers on the workloads of benchmarks/README.md.

Every engine runs in this one process on the same prompts, after one short warm-up: pagedllm
first (then freed), then HF static ``generate`` at batch 64 and 256 and HF continuous batching
(``generate_batch``). Models are built from the real configs in benchmarks/model_configs with
random weights; every request ignores EOS and generates exactly its output length.

A peer that has not finished after ``--peer-time-limit`` seconds is stopped and reported as such,
with the throughput it stayed below, so that one slow peer cannot use up a device session.

Usage: python benchmarks/throughput.py --workload W1 [--workload L1 ...] [--no-peers] [--out DIR]
"""

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
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
from pagedllm.layers.moe import SparseMoeBlock  # noqa: E402
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
    Workload("L2", "qwen3-0.6b", torch.bfloat16, 1, 128, 512, (1,)),  # one stream where a step's fixed cost shows
    Workload("W5", "qwen3-30b-a3b", torch.bfloat16, 256, 256, 256),  # bf16 fits an H200; an H100 needs FP8
    Workload("W6", "gpt-oss-20b", torch.bfloat16, 256, 256, 256),  # its MXFP4 experts run dequantized: 41 GB
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


def run_pagedllm(path: str, workload: Workload, prompts, output_lens, engine_args: dict) -> dict:
    held_before = torch.cuda.memory_allocated()  # by earlier runs in this process: their leak shrinks the KV cache
    start = time.perf_counter()
    llm = LLM(path, load_format="dummy", dtype=workload.dtype, max_model_len=max(
        len(p) + o for p, o in zip(prompts, output_lens, strict=True)), **engine_args)
    startup_s = time.perf_counter() - start
    engine = llm.llm_engine
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    steps = []  # per step: (tokens computed, context after the step) of each scheduled request
    first_launch = None  # when the first step was launched
    done_times = {}  # step index -> when the host saw it done (its tokens read back, its work finished)
    blocks_used, tokens_held = [], []
    launch = engine.executor.launch

    def recording_launch(out, *rest):
        nonlocal first_launch
        index = len(steps)
        if first_launch is None:
            first_launch = time.perf_counter()
        steps.append([(n, r.num_computed_tokens + n)
                      for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)])
        manager = engine.block_manager
        blocks_used.append(manager.num_blocks - manager.num_free_blocks)
        tokens_held.append(sum(r.num_computed_tokens for r in engine.scheduler.running) + out.total_num_tokens)
        pending = launch(out, *rest)
        queued = torch.cuda.Event()  # after all of the step's work: a step that samples nothing (prompt chunks
        queued.record()  # only) has no read-back to wait for, and would end when the host next looked
        wait = pending.wait

        def timed_wait():
            result = wait()
            queued.synchronize()
            done_times[index] = time.perf_counter()
            return result

        pending.wait = timed_wait
        return pending

    engine.executor.launch = recording_launch
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    end = time.perf_counter()
    wall = end - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert [len(o.outputs[0].token_ids) for o in outputs] == output_lens
    allocated_slots = sum(blocks_used) * engine.config.block_size
    result = {
        "engine": "pagedllm", "wall_s": wall, "startup_s": startup_s, "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (output_tokens + sum(map(len, prompts))) / wall,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "kv_cache_blocks": engine.block_manager.num_blocks, "block_size": engine.config.block_size,
        "kv_cache_budget": engine.executor.runner.kv_cache_budget,
        "gpu_memory_held_before_gib": held_before / 2**30,
        "kv_peak_blocks_used": max(blocks_used),
        "kv_waste_fraction": 1 - sum(tokens_held) / allocated_slots if allocated_slots else 0.0,
        "num_steps": len(steps), "num_preemptions": engine.scheduler.num_preemptions,
        "cuda_graphs": engine.executor.runner.decode_graphs is not None,
        "max_num_seqs": engine.config.max_num_seqs, "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "async_scheduling": engine.async_scheduling,
    }
    result["roofline"] = roofline(steps, _model_stats(llm))
    step_seconds = step_periods(first_launch, [done_times[i] for i in range(len(steps))])
    result["time_split"] = time_split(steps, step_seconds, result["roofline"].pop("least_time_per_step_s"))
    result["time_split"]["before_first_step_s"] = first_launch - start
    return result


def step_periods(first_launch: float, done_times: list[float]) -> list[float]:
    """Each step's time: from the previous step's read-back (the first step: its launch) to its own.
    Launch-to-launch was a step late under async scheduling, where step k+1 is launched as step k-1
    is read back: a run's last prefill step was counted as a decode step."""
    return [done - before for before, done in zip([first_launch] + done_times[:-1], done_times, strict=True)]


def time_split(steps: list, step_seconds: list[float], least: list[float]) -> dict:
    """Where the wall time went: decode-only steps and steps with prompt tokens (``step_seconds``
    from ``step_periods``), against their least time."""
    def totals(rows):
        return {"steps": len(rows), "measured_s": sum(step_seconds[i] for i in rows),
                "least_s": sum(least[i] for i in rows)}

    decode = [i for i, step in enumerate(steps) if all(n == 1 for n, _ in step)]
    decode_set = set(decode)
    split = {"decode": totals(decode), "prefill": totals([i for i in range(len(steps)) if i not in decode_set])}
    # Decode steps by batch size: a run's tail of shrinking batches is where each step's fixed cost shows.
    split["decode_by_batch"] = {label: totals([i for i in decode if lo <= len(steps[i]) <= hi])
                                for label, lo, hi in DECODE_BATCH_BUCKETS}
    return split


DECODE_BATCH_BUCKETS = (("1-8", 1, 8), ("9-32", 9, 32), ("33-128", 33, 128), ("129+", 129, float("inf")))


def _model_stats(llm: LLM) -> dict:
    runner = llm.llm_engine.executor.runner
    g = runner.geometry
    lm_head = runner.model.lm_head.weight
    embeddings = [m.weight for m in runner.model.modules()
                  if isinstance(m, (torch.nn.Embedding, VocabParallelEmbedding)) and not isinstance(m, ParallelLMHead)]
    matmul_params = sum(p.numel() for p in runner.model.parameters()) - sum(w.numel() for w in embeddings)
    if any(w is lm_head for w in embeddings):
        matmul_params += lm_head.numel()  # tied: counted once as embedding, but used as a matmul
    for moe in (m for m in runner.model.modules() if isinstance(m, SparseMoeBlock)):  # a token uses top_k experts
        experts = moe.w13.numel() + moe.w2.numel()
        matmul_params -= experts - experts * moe.top_k // moe.w13.shape[0]
    num_heads = llm.llm_engine.config.hf_config.num_attention_heads
    pools = runner.pools  # sliding layers with a pool of their own read only their window's K/V
    window = pools.window_geometry
    return {"weight_bytes": runner.weight_bytes, "matmul_params": matmul_params,
            "num_layers": g.num_layers, "num_window_layers": window.num_layers if window else 0, "num_heads": num_heads,
            "head_dim": g.head_dim, "kv_bytes_per_token": g.bytes_per_block // g.block_size,
            "window_kv_bytes_per_token": window.bytes_per_block // window.block_size if window else 0,
            "sliding_window": pools.sliding_window if window else None, "lm_head_params": lm_head.numel()}


def roofline(steps: list, stats: dict) -> dict:
    """The least time each step of the run could take on this GPU: max(bytes / copy bandwidth, FLOPs / matmul peak),
    bytes = weights + the K/V each sequence reads, FLOPs = 2 x matmul params x tokens + attention."""
    least, peaks = [], gpu_peaks()
    for step in steps:
        tokens = sum(n for n, _ in step)
        window = stats["sliding_window"] or 0  # of the layers with a pool of their own, which read no more
        kv_read = sum(ctx * stats["kv_bytes_per_token"] + min(ctx, window) * stats["window_kv_bytes_per_token"]
                      for _, ctx in step)
        keys_seen = [(n, stats["num_layers"] * (ctx - n / 2) + stats["num_window_layers"] * min(ctx - n / 2, window))
                     for n, ctx in step]  # per query token, summed over the layers
        attention_flops = sum(4 * stats["num_heads"] * stats["head_dim"] * n * keys for n, keys in keys_seen)
        flops = 2 * stats["matmul_params"] * tokens + attention_flops
        least.append(max((stats["weight_bytes"] + kv_read) / peaks["hbm_bytes_per_s"], flops / peaks["bf16_flops"]))
    return {"least_time_s": sum(least), "least_time_per_step_s": least, **stats}


class PeerTimeLimit(BaseException):
    """Raised in a peer that runs past its limit; a BaseException, so HF's own handlers let it through."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise PeerTimeLimit(f"did not finish within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _hf_model(path: str, dtype: torch.dtype):
    """The HF model of the config in ``path``, random weights, built on the GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype).eval()


def run_hf_static(path: str, workload: Workload, prompts, output_lens, batch_size: int, limit_s: float) -> dict:
    model = _hf_model(path, workload.dtype)

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

    return _time_peer(f"hf-static-bs{batch_size}", run, prompts, output_lens, batch_size, limit_s)


def run_hf_continuous(path: str, workload: Workload, prompts, output_lens, limit_s: float) -> dict:
    from transformers import GenerationConfig

    model = _hf_model(path, workload.dtype)
    if len(set(output_lens)) == 1:
        def run(batch, lens):
            gen = GenerationConfig(max_new_tokens=lens[0], do_sample=False, eos_token_id=-1)
            results = model.generate_batch(inputs=batch, generation_config=gen)
            _check_lengths([r.generated_tokens for r in results.values()], lens)
    else:  # each request its own length
        def run(batch, lens):
            gen = GenerationConfig(max_new_tokens=max(lens), do_sample=False, eos_token_id=-1)
            manager = model.init_continuous_batching(generation_config=gen)
            manager.start()
            try:
                ids = [manager.add_request(p, max_new_tokens=n) for p, n in zip(batch, lens, strict=True)]
                results = {}
                while len(results) < len(batch):
                    result = manager.get_result(timeout=3600)
                    if result is None:
                        raise RuntimeError("HF continuous batching stopped before every request finished")
                    if result.is_finished():
                        results[result.request_id] = result.generated_tokens
                _check_lengths([results[i] for i in ids], lens)
            finally:
                manager.stop(block=True)

    return _time_peer("hf-continuous-batching", run, prompts, output_lens, len(prompts), limit_s)


def _time_peer(engine: str, run, prompts, output_lens, batch_size: int, limit_s: float) -> dict:
    """One short warm-up, then ``run(prompts, output_lens)`` over batches of ``batch_size``, timed.
    An OOM, an API change or the time limit is a result too."""
    try:
        run(prompts[:2], [8] * len(prompts[:2]))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with time_limit(limit_s):
            for i in range(0, len(prompts), batch_size):
                run(prompts[i:i + batch_size], output_lens[i:i + batch_size])
            torch.cuda.synchronize()
        return _peer_result(engine, time.perf_counter() - start, prompts, output_lens)
    except (Exception, PeerTimeLimit) as err:
        return _peer_failure(engine, err, output_lens, limit_s)


def _check_lengths(generated: list[list[int]], lens: list[int]) -> None:
    """generate_batch logs and swallows a failure, returning what finished: count it as a failure."""
    got = [len(tokens) for tokens in generated]
    if sorted(got) != sorted(lens):
        raise RuntimeError(f"HF continuous batching returned {len(got)} of {len(lens)} requests, "
                           f"{sum(got)} of {sum(lens)} tokens")


def _peer_result(engine: str, wall: float, prompts, output_lens) -> dict:
    output_tokens = sum(output_lens)
    return {"engine": engine, "wall_s": wall, "output_tokens": output_tokens,
            "output_tokens_per_s": output_tokens / wall,
            "total_tokens_per_s": (output_tokens + sum(map(len, prompts))) / wall,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def _peer_failure(engine: str, err: BaseException, output_lens, limit_s: float) -> dict:
    result = {"engine": engine, "error": _error(err)}
    if isinstance(err, PeerTimeLimit):  # it would have needed longer: its throughput was below this
        result["output_tokens_per_s_below"] = sum(output_lens) / limit_s
    return result


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}".strip() + (
        "" if isinstance(err, torch.OutOfMemoryError) else f" [{traceback.format_exc().splitlines()[-3].strip()}]")


def _free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def print_ours(name: str, ours: dict) -> None:
    print(f"{name}: pagedllm {ours['output_tokens_per_s']:.0f} output tok/s in {ours['wall_s']:.1f} s "
          f"(start-up {ours['startup_s']:.1f} s, roofline fraction {ours['roofline_fraction']:.2f}, "
          f"KV waste {100 * ours['kv_waste_fraction']:.2f}%, steps {ours['num_steps']})")
    split = ours["time_split"]
    print("    " + ", ".join(f"{k} {split[k]['steps']} steps {split[k]['measured_s']:.2f} s (least "
                              f"{split[k]['least_s']:.2f} s)" for k in ("decode", "prefill"))
          + f", before the first step {split['before_first_step_s']:.2f} s", flush=True)
    print("    decode by batch size: " + ", ".join(
        f"{k} {v['steps']} steps {v['measured_s']:.2f} s (least {v['least_s']:.2f} s)"
        for k, v in split["decode_by_batch"].items() if v["steps"]), flush=True)


def run_workload(workload: Workload, peers: bool, out_dir: str | None, engine_args: dict,
                 peer_time_limit_s: float) -> dict:
    path = model_dir(workload)
    try:
        from transformers import AutoConfig

        prompts, output_lens = make_requests(workload, AutoConfig.from_pretrained(path).vocab_size)
        ours = run_pagedllm(path, workload, prompts, output_lens, engine_args)
        _free_gpu()  # each engine's memory goes with its function's frame
        ours["roofline_fraction"] = ours["roofline"]["least_time_s"] / ours["wall_s"]
        print_ours(workload.name, ours)  # before the peers, which can take their whole time limit each
        peer_results = []
        if peers:
            for bs in workload.hf_static_batch_sizes:
                peer_results.append(run_hf_static(path, workload, prompts, output_lens, bs, peer_time_limit_s))
                _free_gpu()
            peer_results.append(run_hf_continuous(path, workload, prompts, output_lens, peer_time_limit_s))
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
    parser.add_argument("--peer-time-limit", type=float, default=600.0, help="seconds per timed peer run")
    parser.add_argument("--max-num-seqs", type=int, help="pagedllm's max_num_seqs (default: the engine's)")
    parser.add_argument("--max-num-batched-tokens", type=int, help="pagedllm's max_num_batched_tokens")
    parser.add_argument("--no-async-scheduling", action="store_true", help="pagedllm reads each step back first")
    args = parser.parse_args()
    engine_args = {"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}
    if args.max_num_batched_tokens:
        engine_args["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.no_async_scheduling:
        engine_args["async_scheduling"] = False
    warm_up_gpu()
    for name in args.workload:
        payload = run_workload(WORKLOADS[name], not args.no_peers, args.out, engine_args, args.peer_time_limit)
        for peer in payload["peers"]:
            figure = peer["error"] if "error" in peer else f"{peer['output_tokens_per_s']:.0f} output tok/s"
            print(f"    {peer['engine']}: {figure}")
        ratio = payload["pagedllm"]["ratio_vs_best_hf"]
        if ratio:
            print(f"    ratio vs best HF: {ratio:.2f}")


if __name__ == "__main__":
    main()
