"""The fused-MoE kernel on real MoE layers (Qwen3-30B-A3B: 128 experts, top 8, H 2048, I 768;
Mixtral-8x7B: 8 experts, top 2, H 4096, I 14336), bf16, random weights and routing, from one token
(decode at batch 1) to 8192 (a prefill chunk). Each time is the median of CUDA-graph replays; the
fraction of the roofline is the larger of (FLOPs / bf16 peak, bytes / copy bandwidth) over the
time, bytes counting each expert the routing hits once. The peer is the expert-by-expert loop HF
transformers runs (``fused_moe_ref``, timed eagerly: it reads the routing back to the host).

Usage: python benchmarks/moe.py [--out DIR]
"""

import argparse
import json
import os
import sys
import time

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, gpu_peaks, warm_up_gpu, write_result  # noqa: E402
from pagedllm_kernels.elementwise import silu_and_mul  # noqa: E402
from pagedllm_kernels.fused_moe import fused_moe  # noqa: E402
from pagedllm_kernels.reference import fused_moe_ref, silu_and_mul_ref  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
TOKENS = (1, 64, 256, 2048, 8192)


def layer_shape(name: str) -> tuple[int, int, int, int]:
    """(experts, top_k, hidden, expert intermediate) of one of the model configs."""
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        c = json.load(f)
    experts = c.get("num_experts") or c["num_local_experts"]
    return experts, c["num_experts_per_tok"], c["hidden_size"], c.get("moe_intermediate_size") or c["intermediate_size"]


def bench(name: str, num_tokens: int, peaks: dict) -> dict:
    experts, top_k, hidden, inter = layer_shape(name)
    g = torch.Generator(device="cuda").manual_seed(num_tokens)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=g) / 32
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=g) / 32
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    weights, ids = torch.randn(num_tokens, experts, device="cuda", generator=g).softmax(-1).topk(top_k)
    ms = do_bench_cudagraph(lambda: fused_moe(x, w13, w2, weights, ids, silu_and_mul), rep=100, return_mode="median")
    expected = fused_moe_ref(x, w13, w2, weights, ids, silu_and_mul_ref)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        fused_moe_ref(x, w13, w2, weights, ids, silu_and_mul_ref)
    torch.cuda.synchronize()
    peer_ms = (time.perf_counter() - start) / 3 * 1e3
    got = fused_moe(x, w13, w2, weights, ids, silu_and_mul)
    flops = 2 * num_tokens * top_k * 3 * hidden * inter
    nbytes = ids.unique().numel() * 3 * hidden * inter * 2 + 2 * num_tokens * hidden * 2
    roofline_ms = max(flops / peaks["bf16_flops"], nbytes / peaks["hbm_bytes_per_s"]) * 1e3
    return {"model": name, "experts": experts, "top_k": top_k, "hidden": hidden, "intermediate": inter,
            "tokens": num_tokens, "fused_ms": ms, "hf_loop_ms": peer_ms, "speedup_over_hf_loop": peer_ms / ms,
            "tflops": flops / ms / 1e9, "tb_per_s": nbytes / ms / 1e9, "roofline_fraction": roofline_ms / ms,
            "max_abs_diff_vs_loop": (got.float() - expected.float()).abs().max().item(),
            "max_abs_loop": expected.float().abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="also write the JSON here (the device tool's $OUT)")
    args = parser.parse_args()
    warm_up_gpu()
    peaks, rows = gpu_peaks(), []
    for name in ("qwen3-30b-a3b", "mixtral-8x7b"):
        for num_tokens in TOKENS:
            rows.append(bench(name, num_tokens, peaks))
            r = rows[-1]
            print(f"{name:>14} {num_tokens:>5} tokens: {r['fused_ms']:.3f} ms, {r['tflops']:.0f} TFLOP/s, "
                  f"{r['tb_per_s']:.2f} TB/s, {r['roofline_fraction']:.2f} of the roofline; HF's loop "
                  f"{r['hf_loop_ms']:.2f} ms ({r['speedup_over_hf_loop']:.1f}x)", flush=True)
            torch.cuda.empty_cache()
    path = write_result("moe", {"benchmark": "moe", "environment": environment(), "results": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
