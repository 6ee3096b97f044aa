"""PagedAttention kernels against dense torch SDPA on the same work, on one GPU.

Decode: Llama-3-8B head layout (32 query heads, 8 KV heads, head_dim 128), bf16, batch 1, 16, 64,
256 at contexts 512, 2k, 8k, 32k; achieved bytes/s (K/V read once) against the GPU's measured copy
bandwidth (benchmarks/common.py: 3.0 TB/s on the H100, 4.3 TB/s on the H200).
The dense peer holds the same K/V contiguously ``[batch, kv_heads, context, head_dim]`` and runs
SDPA with each KV head's 4 query heads as 4 query rows (the same arithmetic, K/V read once).
Prefill: causal attention over one prompt of 1k-8k tokens and over 32 prompts of 256 (a prefill
step of short prompts); achieved FLOP/s against the bf16 matmul peak, beside SDPA's causal
attention on the same tokens through each of its fused backends: flash (FlashAttention-2) and
cuDNN (its default on Hopper, FlashAttention-3-like). Every time is the median of CUDA-graph
replays, so Python launch overhead stays out of the kernel figures.
Usage: python benchmarks/attention_kernels.py [--out DIR]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    environment,
    gpu_peaks,
    warm_up_gpu,
    write_result,
)
from pagedllm_kernels.paged_attention import paged_attention  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
MAX_KV_TOKENS = 4 << 20  # 4M tokens: 16 GiB of K/V for each of paged and dense


def gpu_time_ms(fn) -> float:
    """Median time of ``fn`` replayed in a CUDA graph: kernel time without Python launch overhead,
    as the engine's graph-captured decode steps see it."""
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=200, return_mode="median")


def paged_cache(num_tokens_per_seq: list[int], generator: torch.Generator):
    """K/V of each sequence in shuffled blocks of a paged cache, and the same K/V dense."""
    blocks = [-(-n // BLOCK_SIZE) for n in num_tokens_per_seq]
    total = sum(blocks)
    k_cache = torch.randn(total, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(total, generator=generator).cuda()
    tables = torch.zeros(len(blocks), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = order[start:start + nb]
        start += nb
    return k_cache, v_cache, tables


def dense_kv(cache: torch.Tensor, tables: torch.Tensor, context: int) -> torch.Tensor:
    """``[batch, kv_heads, context, head_dim]`` gathered from the paged cache (same values)."""
    return cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()


def bench_decode(batch: int, context: int, generator: torch.Generator) -> dict:
    k_cache, v_cache, tables = paged_cache([context] * batch, generator)
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    context_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM**-0.5

    def paged():
        return paged_attention(query, k_cache, v_cache, tables, context_lens, cu, scale,
                               max_query_len=1, max_context_len=context)

    k_dense, v_dense = dense_kv(k_cache, tables, context), dense_kv(v_cache, tables, context)
    q_dense = query.view(batch, NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)

    def dense():
        return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, scale=scale)

    torch.testing.assert_close(paged().float(), dense().reshape(batch, NUM_HEADS, HEAD_DIM).float(),
                               rtol=2e-2, atol=2e-2)
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    io_bytes = kv_bytes + 2 * query.numel() * DTYPE.itemsize
    paged_ms, dense_ms = gpu_time_ms(paged), gpu_time_ms(dense)
    return {"kind": "decode", "batch": batch, "context": context, "bytes": io_bytes,
            "paged_ms": paged_ms, "sdpa_dense_ms": dense_ms,
            "paged_bytes_per_s": io_bytes / paged_ms * 1e3, "sdpa_bytes_per_s": io_bytes / dense_ms * 1e3,
            "paged_hbm_fraction": io_bytes / paged_ms * 1e3 / gpu_peaks()["hbm_bytes_per_s"],
            "sdpa_hbm_fraction": io_bytes / dense_ms * 1e3 / gpu_peaks()["hbm_bytes_per_s"],
            "paged_over_sdpa_time": paged_ms / dense_ms}


def bench_prefill(num_seqs: int, num_tokens: int, generator: torch.Generator) -> dict:
    """``num_seqs`` prompts of ``num_tokens`` each in one flat batch (the engine's prefill steps of
    short prompts are many at once)."""
    k_cache, v_cache, tables = paged_cache([num_tokens] * num_seqs, generator)
    query = torch.randn(num_seqs * num_tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    context_lens = torch.full((num_seqs,), num_tokens, dtype=torch.int32, device="cuda")
    cu = torch.arange(0, num_seqs + 1, dtype=torch.int32, device="cuda") * num_tokens
    scale = HEAD_DIM**-0.5

    def paged():
        return paged_attention(query, k_cache, v_cache, tables, context_lens, cu, scale,
                               max_query_len=num_tokens, max_context_len=num_tokens)

    group = NUM_HEADS // NUM_KV_HEADS
    k_dense = dense_kv(k_cache, tables, num_tokens).repeat_interleave(group, dim=1)
    v_dense = dense_kv(v_cache, tables, num_tokens).repeat_interleave(group, dim=1)
    q_dense = query.view(num_seqs, num_tokens, NUM_HEADS, HEAD_DIM).transpose(1, 2)

    def dense(backend):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, is_causal=True, scale=scale)

    flops = num_seqs * 4 * NUM_HEADS * HEAD_DIM * num_tokens * (num_tokens + 1) / 2  # two matmuls, causal half
    paged_ms = gpu_time_ms(paged)
    row = {"kind": "prefill", "seqs": num_seqs, "tokens": num_tokens, "flops": flops, "paged_ms": paged_ms,
           "paged_flops_per_s": flops / paged_ms * 1e3,
           "paged_peak_fraction": flops / paged_ms * 1e3 / gpu_peaks()["bf16_flops"]}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            want = dense(backend)
        except RuntimeError as e:  # a backend this GPU or build lacks
            row[f"sdpa_{name}_error"] = str(e).splitlines()[0]
            continue
        torch.testing.assert_close(paged().float(), want.transpose(1, 2).flatten(0, 1).float(), rtol=2e-2, atol=2e-2)
        ms = gpu_time_ms(lambda backend=backend: dense(backend))
        row.update({f"sdpa_{name}_ms": ms, f"sdpa_{name}_flops_per_s": flops / ms * 1e3,
                    f"paged_over_{name}_time": paged_ms / ms})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", help="also write the JSON here (the device tool's $OUT)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    warm_up_gpu()
    rows, skipped = [], []
    print(f"{'decode':>8} {'batch':>5} {'ctx':>6} | {'paged ms':>9} {'GB/s':>6} {'HBM%':>5} | "
          f"{'sdpa ms':>9} {'GB/s':>6} {'HBM%':>5} | paged/sdpa")
    for context in (512, 2048, 8192, 32768):
        for batch in (1, 16, 64, 256):
            if batch * context > MAX_KV_TOKENS:
                skipped.append({"kind": "decode", "batch": batch, "context": context,
                                "reason": "paged + dense copies exceed the benchmark's memory cap"})
                continue
            r = bench_decode(batch, context, generator)
            torch.cuda.empty_cache()
            rows.append(r)
            print(f"{'':>8} {batch:>5} {context:>6} | {r['paged_ms']:>9.4f} {r['paged_bytes_per_s'] / 1e9:>6.0f} "
                  f"{100 * r['paged_hbm_fraction']:>4.0f}% | {r['sdpa_dense_ms']:>9.4f} "
                  f"{r['sdpa_bytes_per_s'] / 1e9:>6.0f} {100 * r['sdpa_hbm_fraction']:>4.0f}% | "
                  f"{r['paged_over_sdpa_time']:.2f}")
    print(f"\n{'prefill':>8} {'tokens':>6} | {'paged ms':>9} {'TFLOP/s':>7} {'peak%':>5} | "
          f"{'flash ms':>9} paged/flash | {'cudnn ms':>9} paged/cudnn")
    for seqs, tokens in ((1, 1024), (1, 2048), (1, 4096), (1, 8192), (32, 256)):
        r = bench_prefill(seqs, tokens, generator)
        rows.append(r)
        print(f"{'':>8} {seqs:>3}x{tokens:<6} | {r['paged_ms']:>9.3f} {r['paged_flops_per_s'] / 1e12:>7.0f} "
              f"{100 * r['paged_peak_fraction']:>4.0f}% | {r.get('sdpa_flash_ms', float('nan')):>9.3f} "
              f"{r.get('paged_over_flash_time', float('nan')):>11.2f} | {r.get('sdpa_cudnn_ms', float('nan')):>9.3f} "
              f"{r.get('paged_over_cudnn_time', float('nan')):.2f}")
    layout = {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
              "block_size": BLOCK_SIZE, "dtype": str(DTYPE)}
    path = write_result("kernels", {"benchmark": "kernels", "environment": environment(), "layout": layout,
                                    "results": rows, "skipped": skipped}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
