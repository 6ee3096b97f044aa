"""FP8 against the model's dtype, each pair in one process on the same prompts (no HF peers: the
bf16 run is the baseline). W2 and L1 with ``quantization="fp8"`` (targets on an H100: 1.3x and
1.6x), W4 with ``kv_cache_dtype="fp8"`` (1.2x). Then greedy agreement: the first 64 tokens of 16
prompts under FP8 against the dtype's, for the bundled demo model (trained weights) and W2's
real-shape model (random weights: a weak signal, reported as asked); and the demo model's loss
on a page it did not train on, in bf16, with FP8 weights and with an FP8 KV cache.

Usage: python benchmarks/fp8.py [--out DIR]
"""

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, warm_up_gpu, write_result  # noqa: E402
from benchmarks.throughput import WORKLOADS, _free_gpu, make_requests, model_dir, run_pagedllm  # noqa: E402
from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.testing import held_out_loss  # noqa: E402

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pagedllm-demo")
PAIRS = [("W2", {"quantization": "fp8"}, 1.3), ("L1", {"quantization": "fp8"}, 1.6),
         ("W4", {"kv_cache_dtype": "fp8"}, 1.2)]


def throughput_pair(name: str, fp8_args: dict, target: float) -> dict:
    from transformers import AutoConfig

    workload = WORKLOADS[name]
    path = model_dir(workload)
    try:
        prompts, output_lens = make_requests(workload, AutoConfig.from_pretrained(path).vocab_size)
        runs = {}
        for label, args in (("dtype", {}), ("fp8", fp8_args)):
            runs[label] = run_pagedllm(path, workload, prompts, output_lens, args)
            _free_gpu()
            print(f"{name} {label} {args}: {runs[label]['output_tokens_per_s']:.0f} output tok/s", flush=True)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    speedup = runs["fp8"]["output_tokens_per_s"] / runs["dtype"]["output_tokens_per_s"]
    return {"workload": name, "model_config": workload.config, "fp8_args": fp8_args, "target": target,
            "speedup": speedup, "dtype_run": runs["dtype"], "fp8_run": runs["fp8"]}


def agreement(path: str, dtype: str, prompts: list, **llm_args) -> dict:
    """Per prompt, how many of the first 64 greedy tokens FP8 shares with the dtype's before they part."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    tokens = {}
    for label, quantization in (("dtype", None), ("fp8", "fp8")):
        with LLM(path, dtype=dtype, quantization=quantization, **llm_args) as llm:
            tokens[label] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        _free_gpu()
    shared = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), 64)
              for x, y in zip(tokens["dtype"], tokens["fp8"], strict=True)]
    return {"prompts": len(prompts), "tokens_shared_before_parting": shared, "mean_shared": sum(shared) / len(shared),
            "identical": sum(s == 64 for s in shared)}


def demo_losses() -> dict:
    """The demo model's loss on a page of Python it did not train on (this file), in bf16, with FP8
    weights, and with an FP8 KV cache."""
    losses = {}
    for label, args in (("bfloat16", {}), ("fp8 weights", {"quantization": "fp8"}),
                        ("fp8 kv cache", {"kv_cache_dtype": "fp8"})):
        with LLM(DEMO, dtype="bfloat16", **args) as llm:
            losses[label] = held_out_loss(llm, os.path.abspath(__file__))
        _free_gpu()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON here (the device tool's $OUT)")
    args = parser.parse_args()
    warm_up_gpu()
    from transformers import AutoConfig

    payload = {"benchmark": "fp8", "environment": environment(), "pairs": [], "greedy_agreement": {}}
    for pair in PAIRS:  # written after each part, so a run cut short keeps what it measured
        payload["pairs"].append(throughput_pair(*pair))
        write_result("fp8", payload, args.out)
    text = [f"def f{i}(x):\n    " if i % 2 else f"The {i}th thing about the city is" for i in range(16)]
    agree = payload["greedy_agreement"]
    agree["demo"] = agreement(DEMO, "bfloat16", text)
    path = model_dir(WORKLOADS["W2"])
    try:
        ids = [p[:32] for p in make_requests(WORKLOADS["W2"], AutoConfig.from_pretrained(path).vocab_size)[0][:16]]
        agree["llama-3-8b (random weights)"] = agreement(path, "bfloat16", [{"prompt_token_ids": p} for p in ids],
                                                         load_format="dummy", max_model_len=256)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    payload["demo_held_out_loss"] = demo_losses()
    print("demo model's held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in payload["demo_held_out_loss"].items()))
    for name, a in agree.items():
        print(f"agreement {name}: {a['mean_shared']:.1f} of 64 tokens shared on average, {a['identical']}/16 identical")
    print(f"wrote {write_result('fp8', payload, args.out)}")


if __name__ == "__main__":
    main()
