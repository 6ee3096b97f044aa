"""The linear layers of a decode step of a few streams: cuBLAS (``F.linear``) against the split-K
Triton kernel (``few_rows_matmul``) at 1, 4 and 16 rows, over the real layer shapes of Qwen3-0.6B,
OPT-1.3B and Llama-3-8B (q/k/v, output, MLP in and out, LM head), and which of the two the library
picks (``reads_faster``); then Llama-3-8B's layers in FP8 (``quantization="fp8"``: FP8 rows times
FP8 weights, each with row scales), the kernel against ``torch._scaled_mm``. Each
product is timed as a chain of layers in one CUDA graph, each layer its own weights and the chain's
weights at least 512 MiB, so that no weight is read from L2 (as in a model, whose layers follow
one another). Bytes/s: the weight read once.
Usage: python benchmarks/few_rows.py [--out DIR]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, warm_up_gpu, write_result  # noqa: E402
from pagedllm_kernels.few_rows import few_rows_matmul, reads_faster  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
MODELS = ("qwen3-0.6b", "opt-1.3b", "llama-3-8b")
CHAIN_BYTES = 512 << 20


def layer_shapes(name: str) -> dict[str, tuple[int, int]]:
    """Each linear layer's weight ``[n, k]`` from the model's config.json."""
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        c = json.load(f)
    hidden = c["hidden_size"]
    if c["model_type"] == "opt":
        return {"qkv": (3 * hidden, hidden), "o": (hidden, hidden), "fc1": (c["ffn_dim"], hidden),
                "fc2": (hidden, c["ffn_dim"]), "lm_head": (c["vocab_size"], hidden)}
    heads, kv_heads = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate_up": (2 * c["intermediate_size"], hidden), "down": (hidden, c["intermediate_size"]),
            "lm_head": (c["vocab_size"], hidden)}


def chain_us(product, xs: list[torch.Tensor], weights: list[torch.Tensor]) -> float:
    """Median time of one product in a CUDA graph of the whole chain, in microseconds."""
    for _ in range(2):
        for x, w in zip(xs, weights, strict=True):
            product(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for x, w in zip(xs, weights, strict=True):
            product(x, w)
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(weights))
    return sorted(times)[len(times) // 2]


def fp8_rows() -> list[dict]:
    """Llama-3-8B's quantized layers (the LM head stays bf16): the kernel, which FP8 layers use up to
    16 rows, against ``torch._scaled_mm`` (row-wise scales, bf16 out), which they use past it."""
    rows = []
    for layer, (n, k) in layer_shapes("llama-3-8b").items():
        if layer == "lm_head":
            continue
        copies = max(2, min(64, CHAIN_BYTES // (n * k)))
        weights = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies)]
        w_scale = torch.rand(n, 1, device="cuda") / k**0.5
        for m in (1, 4, 16):
            xs = [torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies)]
            x_scale = torch.rand(m, 1, device="cuda")
            scaled_mm = chain_us(lambda x, w, a=x_scale, b=w_scale: torch._scaled_mm(
                x, w.t(), scale_a=a, scale_b=b.t(), out_dtype=torch.bfloat16), xs, weights)
            kernel = chain_us(lambda x, w, a=x_scale, b=w_scale: few_rows_matmul(x, w, torch.bfloat16, None, a, b),
                              xs, weights)
            rows.append({"model": "llama-3-8b", "layer": layer, "dtype": "fp8", "n": n, "k": k, "rows": m,
                         "scaled_mm_us": scaled_mm, "kernel_us": kernel, "picked": "kernel"})
            print(f"{'fp8 ' + layer:>20} {f'{n}x{k}':>14} {m:>4} | {scaled_mm:>9.2f} {n * k / scaled_mm / 1e3:>5.0f} | "
                  f"{kernel:>9.2f} {n * k / kernel / 1e3:>5.0f} | kernel (_scaled_mm in the first columns)")
        del weights
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON here (the device tool's $OUT)")
    args = parser.parse_args()
    warm_up_gpu()
    rows = []
    print(f"{'layer':>20} {'n x k':>14} {'rows':>4} | {'cuBLAS us':>9} {'GB/s':>5} | {'kernel us':>9} {'GB/s':>5} | "
          "picked")
    for model in MODELS:
        for layer, (n, k) in layer_shapes(model).items():
            copies = max(2, min(64, CHAIN_BYTES // (n * k * 2)))
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
            for m in (1, 4, 16):
                xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
                cublas = chain_us(lambda x, w: F.linear(x, w), xs, weights)
                kernel = chain_us(lambda x, w: few_rows_matmul(x, w, torch.bfloat16), xs, weights)
                picked = "kernel" if reads_faster(weights[0]) else "cuBLAS"
                rows.append({"model": model, "layer": layer, "dtype": "bf16", "n": n, "k": k, "rows": m,
                             "cublas_us": cublas, "kernel_us": kernel, "picked": picked})
                print(f"{model + '.' + layer:>20} {f'{n}x{k}':>14} {m:>4} | {cublas:>9.2f} "
                      f"{n * k * 2 / cublas / 1e3:>5.0f} | {kernel:>9.2f} {n * k * 2 / kernel / 1e3:>5.0f} | {picked}")
            del weights
            torch.cuda.empty_cache()
    rows += fp8_rows()
    path = write_result("few-rows", {"benchmark": "few_rows", "environment": environment(), "results": rows},
                        args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
