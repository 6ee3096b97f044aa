"""Where a decode step's time goes over steady-state decode steps: host phases (schedule, inputs,
forward launch, sampling, waiting for the device, update) timed without the profiler (under it
every torch op pays its tracing, which tripled some phases); the decode graph's GPU time alone
(CUDA events over back-to-back replays); then GPU kernels from the torch profiler. Set
``PAGEDLLM_PDL=0`` for per-kernel times: with dependent launch a kernel's time includes its wait
for the one before.

Usage: python benchmarks/profile_step.py --config llama-3-8b --batch 1 [--context 256] [--eager]
       [--quantization fp8] [--kv-cache-dtype fp8]
"""

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import warm_up_gpu  # noqa: E402
from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.worker.executor import PendingOutput  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


spent: collections.Counter = collections.Counter()  # host seconds per phase label


def labelled(label: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            with record_function(label):
                return fn(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
    return wrapper


def graph_gpu_ms(runner, batch: int, replays: int = 20) -> float | None:
    """GPU time of one replay of the decode graph that serves ``batch`` (on the last step's inputs)."""
    bucket = runner.decode_graphs.bucket(batch) if runner.decode_graphs else None
    if bucket is None:
        return None
    graph = runner.decode_graphs.graphs[bucket][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--no-async-scheduling", action="store_true")
    parser.add_argument("--quantization", choices=["fp8"])
    parser.add_argument("--kv-cache-dtype", default="auto")
    args = parser.parse_args()
    path = tempfile.mkdtemp()
    shutil.copy(os.path.join(CONFIGS, f"{args.config}.json"), os.path.join(path, "config.json"))
    warm_up_gpu()
    llm = LLM(path, load_format="dummy", dtype=args.dtype, enforce_eager=args.eager,
              max_model_len=args.context + 4 * args.steps + 64, max_num_seqs=max(args.batch, 256),
              async_scheduling=not args.no_async_scheduling, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.llm_engine
    runner = engine.executor.runner
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=3 * args.steps, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), torch.randint(10, 30000, (args.context,), generator=g).tolist(), params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        engine.step()  # prefill
    for _ in range(5):
        engine.step()  # decode warm-up
    scheduler.schedule = labelled("host: schedule", scheduler.schedule)
    scheduler.update_from_output = labelled("host: update", scheduler.update_from_output)
    runner.inputs.prepare = labelled("host: prepare inputs", runner.inputs.prepare)
    engine.executor.sampler.__class__.__call__ = labelled("sample (launch)", engine.executor.sampler.__class__.__call__)
    PendingOutput.wait = labelled("wait for the device", PendingOutput.wait)
    if runner.decode_graphs:
        runner.decode_graphs.replay = labelled("forward (graph replay launch)", runner.decode_graphs.replay)
    else:
        runner.model.forward = labelled("forward (eager launches)", runner.model.forward)
    torch.cuda.synchronize()
    spent.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    host = {label: seconds / args.steps * 1e3 for label, seconds in spent.items()}
    graph_ms = graph_gpu_ms(runner, args.batch)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    print(f"\n{args.config} batch {args.batch} context ~{args.context}: {per_step * 1e3:.2f} ms per decode step "
          f"({args.batch / per_step:.0f} output tok/s), {'eager' if args.eager else 'CUDA graphs'}, "
          f"{'async' if engine.async_scheduling else 'synchronous'} scheduling, quantization {args.quantization}, "
          f"KV cache {args.kv_cache_dtype}")
    print("\nhost phases (ms per step, timed without the profiler):")
    for label, ms in host.items():
        print(f"  {label:<34} {ms:8.3f}")
    print(f"  {'(not in a phase)':<34} {per_step * 1e3 - sum(host.values()):8.3f}")
    if graph_ms is not None:
        print(f"\nthe decode graph alone: {graph_ms:.3f} ms of GPU time a replay")
    print("\nGPU kernels (ms per step, top 15 by GPU time, under the profiler):")
    labels = ("host:", "sample", "forward", "wait", "aten::")
    kernels = sorted((e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith(labels)),
                     key=lambda e: -e.self_device_time_total)
    for e in kernels[:15]:
        print(f"  {e.self_device_time_total / 1e3 / args.steps:8.3f}  x{e.count // args.steps:<4} {e.key[:90]}")
    total_gpu = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
    print(f"  all kernels: {total_gpu:.3f} ms per step")


if __name__ == "__main__":
    main()
