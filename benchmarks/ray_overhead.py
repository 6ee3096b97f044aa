"""What Ray Data adds: the same rows (2,000 prompts of the demo model, 16 greedy tokens each, EOS
ignored) through ``pagedllm.ray`` on a local Ray instance with N replicas, against
``LLM(data_parallel_size=N).generate`` and one ``LLM.generate``, each timed end to end from the
first row in to the last row out (Ray's start-up excluded: it is paid once per cluster; the
replicas' model loading included for both parallel runs). CPU by default: the issue's measure
where the device tool cannot carry Ray's wheel.

Usage: python benchmarks/ray_overhead.py [--rows 2000] [--replicas 2] [--out DIR]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, write_result  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pagedllm-demo")
GREEDY = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}


def main() -> None:
    import ray

    from pagedllm import LLM, SamplingParams
    from pagedllm.ray import PagedLLMProcessorConfig, build_processor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    prompts = [f"def f{i}(x):" for i in range(args.rows)]
    results = {}

    start = time.perf_counter()
    with LLM(DEMO, device="cpu") as llm:
        expected = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)]
    results["one LLM"] = time.perf_counter() - start

    start = time.perf_counter()
    with LLM(DEMO, device="cpu", data_parallel_size=args.replicas) as llm:
        llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    results[f"LLM data_parallel_size={args.replicas}"] = time.perf_counter() - start

    ray.init(num_cpus=args.replicas, include_dashboard=False, log_to_driver=False)
    config = PagedLLMProcessorConfig(model_source=DEMO, engine_kwargs={"device": "cpu"}, concurrency=args.replicas,
                                     batch_size=64, num_gpus_per_replica=0)
    processor = build_processor(config, preprocess=lambda row: {"id": row["id"], "prompt": row["text"],
                                                                "sampling_params": GREEDY})
    start = time.perf_counter()
    out = processor(ray.data.from_items([{"id": i, "text": p} for i, p in enumerate(prompts)])).take_all()
    results[f"Ray Data, {args.replicas} replicas"] = time.perf_counter() - start
    ray.shutdown()
    assert sorted(r["id"] for r in out) == list(range(args.rows))
    assert all(r["generated_text"] == expected[r["id"]] for r in out)

    base = results[f"LLM data_parallel_size={args.replicas}"]
    payload = {"benchmark": "ray-overhead", "rows": args.rows, "replicas": args.replicas, "max_tokens": 16,
               "device": "cpu", "cpu_count": os.cpu_count(), "environment": environment(), "wall_s": results,
               "ray_over_data_parallel": results[f"Ray Data, {args.replicas} replicas"] / base}
    print(json.dumps(payload["wall_s"], indent=1), f"Ray / data parallel: {payload['ray_over_data_parallel']:.3f}")
    print(f"wrote {write_result('ray-overhead', payload, args.out)}")


if __name__ == "__main__":
    main()
