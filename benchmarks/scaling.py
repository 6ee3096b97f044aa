"""Throughput on several GPUs of one host: tensor parallelism (one engine split over N GPUs) or data
parallelism (N engine replicas), against one GPU in the same run.

Each size runs in a fresh process (its own GPUs, its own process group) on the workload's prompts
of benchmarks/throughput.py (random weights from the real config, EOS ignored), timed after a
short warm-up. Recorded per size: output tokens/s, speed-up over one GPU, per-GPU efficiency
(speed-up / GPUs), and for tensor parallelism the share of a decode step's GPU kernel time that
rank 0 spends in all-reduce kernels (from a torch profile of 16 decode steps of the full batch),
the first 32 greedy tokens of 8 prompts against one GPU's, and for data parallelism the bound
that the longest request sets (one GPU's time over that request's time alone).

Usage: python benchmarks/scaling.py --workload W2 --tensor-parallel-size 1 2 [--out DIR]
       python benchmarks/scaling.py --workload W3 --data-parallel-size 1 2 4 [--out DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, write_result  # noqa: E402
from benchmarks.throughput import WORKLOADS, Workload, make_requests, model_dir  # noqa: E402

AGREEMENT_PROMPTS, AGREEMENT_TOKENS = 8, 32
PROFILED_DECODE_STEPS = 16


def run_one(workload: Workload, tp: int, dp: int, engine_args: dict) -> dict:
    """One size, in this process: start-up, the timed run, and for TP > 1 the profile."""
    from transformers import AutoConfig

    from pagedllm import LLM, SamplingParams

    path = model_dir(workload)
    prompts, output_lens = make_requests(workload, AutoConfig.from_pretrained(path).vocab_size)
    start = time.perf_counter()
    llm = LLM(path, load_format="dummy", dtype=workload.dtype, tensor_parallel_size=tp, data_parallel_size=dp,
              max_model_len=max(len(p) + o for p, o in zip(prompts, output_lens, strict=True)), **engine_args)
    startup_s = time.perf_counter() - start
    # every replica compiles its kernels before the clock starts
    llm.generate(prompts[: 4 * dp], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    greedy = SamplingParams(temperature=0, max_tokens=AGREEMENT_TOKENS, ignore_eos=True)
    agreement = [o.outputs[0].token_ids for o in llm.generate(prompts[:AGREEMENT_PROMPTS], greedy, use_tqdm=False)]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outputs] == output_lens
    custom = tp > 1 and not llm.llm_engine.config.disable_custom_all_reduce
    result = {"tensor_parallel_size": tp, "data_parallel_size": dp, "gpus": tp * dp, "wall_s": wall,
              "all_reduce": "symmetric memory, NCCL beyond 8/32 MiB" if custom else "nccl" if tp > 1 else None,
              "startup_s": startup_s, "output_tokens_per_s": sum(output_lens) / wall,
              "greedy_tokens": agreement}
    if tp * dp == 1:  # the critical path no number of replicas can shorten: the longest request alone
        longest = max(range(len(prompts)), key=lambda i: (output_lens[i], len(prompts[i])))
        start = time.perf_counter()
        llm.generate([prompts[longest]], params[longest], use_tqdm=False)
        result["longest_request_alone_s"] = time.perf_counter() - start
    if tp > 1:
        result["decode_profile"] = profile_decode(llm, prompts)
    llm.shutdown()
    shutil.rmtree(path, ignore_errors=True)
    return result


def profile_decode(llm, prompts: list[list[int]]) -> dict:
    """Rank 0's GPU kernel time over decode steps of the whole batch, and NCCL's share of it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pagedllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    batch = prompts[: engine.config.max_num_seqs]
    for i, prompt in enumerate(batch):
        engine.add_request(f"profile-{i}", prompt[:128], params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    for _ in range(4):
        engine.step()
    on_gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(PROFILED_DECODE_STEPS):
            engine.step()
        if on_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    for i in range(len(batch)):
        engine.abort_request(f"profile-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]  # none on the CPU
    total_us = sum(e.self_device_time_total for e in kernels)
    nccl_us = sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower() or "all_reduce" in e.key)
    return {"batch": len(batch), "steps": PROFILED_DECODE_STEPS,
            "step_wall_ms": 1e3 * wall / PROFILED_DECODE_STEPS,
            "step_kernel_ms": 1e-3 * total_us / PROFILED_DECODE_STEPS,
            "all_reduce_share_of_kernel_time": nccl_us / total_us if total_us else None,
            "nccl_kernels_seen": sum(1 for e in kernels if "nccl" in e.key.lower())}


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """How far each prompt's greedy tokens follow one GPU's before they first differ."""
    prefix = []
    for ours, theirs in zip(tokens, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), len(ours))
        prefix.append(same)
    return {"prompts_equal": sum(p == AGREEMENT_TOKENS for p in prefix), "prompts": len(prefix),
            "tokens_before_first_difference": prefix}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), required=True)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--tensor-parallel-size", type=int, nargs="+")
    sizes.add_argument("--data-parallel-size", type=int, nargs="+")
    parser.add_argument("--out", help="also write the JSON here (the device tool's $OUT)")
    parser.add_argument("--timeout", type=float, default=400, help="seconds per size")
    parser.add_argument("--custom-all-reduce", action="store_true",
                        help="small all-reduces through symmetric memory (disable_custom_all_reduce=False)")
    parser.add_argument("--one", nargs=3, metavar=("TP", "DP", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    engine_args = {"disable_custom_all_reduce": False} if args.custom_all_reduce else {}
    flags = ["--custom-all-reduce"] if args.custom_all_reduce else []
    if args.one:
        tp, dp, result_path = args.one
        with open(result_path, "w") as f:
            json.dump(run_one(workload, int(tp), int(dp), engine_args), f)
        return
    if not (args.tensor_parallel_size or args.data_parallel_size):
        parser.error("give --tensor-parallel-size or --data-parallel-size")
    kind = "tensor" if args.tensor_parallel_size else "data"
    runs = []
    for n in args.tensor_parallel_size or args.data_parallel_size:
        tp, dp = (n, 1) if kind == "tensor" else (1, n)
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            try:  # a fresh process per size: its own GPUs and process group
                child = subprocess.run([sys.executable, __file__, "--workload", workload.name, "--one", str(tp),
                                        str(dp), result.name, *flags], timeout=args.timeout)
                run = json.load(open(result.name)) if child.returncode == 0 else {"error": f"exit {child.returncode}"}
            except subprocess.TimeoutExpired:
                run = {"error": f"did not finish within {args.timeout:.0f} s"}
        runs.append({"tensor_parallel_size": tp, "data_parallel_size": dp, "gpus": n, **run})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "greedy_tokens"}), flush=True)
    base = next((r for r in runs if r["gpus"] == 1 and "error" not in r), None)
    reference = base["greedy_tokens"] if base else None
    for run in runs:
        tokens = run.pop("greedy_tokens", None)
        if base and "error" not in run:
            run["speedup"] = run["output_tokens_per_s"] / base["output_tokens_per_s"]
            run["per_gpu_efficiency"] = run["speedup"] / run["gpus"]
            run["greedy_agreement"] = agreement(tokens, reference)
            if kind == "data":  # replicas cannot finish before the longest request does on its own
                run["speedup_bound"] = base["wall_s"] / base["longest_request_alone_s"]
    payload = {"benchmark": "scaling", "parallelism": kind, "workload": workload.name,
               "model_config": workload.config, "dtype": str(workload.dtype).split(".")[-1],
               "num_requests": workload.num_requests, "prompt_len": workload.prompt_len,
               "output_len": workload.output_len, "engine_args": engine_args, "environment": environment(),
               "runs": runs}
    name = f"scaling-{workload.name}-{kind}-{max(r['gpus'] for r in runs)}gpu" + (
        "-custom-all-reduce" if args.custom_all_reduce else "")
    print(f"wrote {write_result(name, payload, args.out)}")
    for run in runs:
        if "speedup" in run:
            print(f"{kind} parallel x{run['gpus']}: {run['output_tokens_per_s']:.0f} output tok/s, "
                  f"{run['speedup']:.2f}x one GPU, per-GPU efficiency {run['per_gpu_efficiency']:.2f}")


if __name__ == "__main__":
    main()
