"""The Triton kernels, or None where triton is not installed; layers then use the torch references."""

import torch

try:
    from pagedllm_kernels.cache_ops import store_kv_cache
    from pagedllm_kernels.elementwise import clamped_swiglu, layer_norm, rms_norm, rotary, silu_and_mul
    from pagedllm_kernels.few_rows import few_rows_matmul, reads_faster
    from pagedllm_kernels.fp8_ops import quantize_rows
    from pagedllm_kernels.fused_moe import fused_moe
    from pagedllm_kernels.paged_attention import paged_attention
    from pagedllm_kernels.sampling_ops import greedy_sample, seeded_exponential_, token_logprobs
except ImportError:
    store_kv_cache = rms_norm = rotary = silu_and_mul = paged_attention = token_logprobs = greedy_sample = None
    seeded_exponential_ = fused_moe = layer_norm = quantize_rows = few_rows_matmul = reads_faster = None
    clamped_swiglu = None


def fused_on(x: torch.Tensor) -> bool:
    """Whether the fused elementwise kernels run for this tensor (CUDA, with triton installed)."""
    return x.is_cuda and rms_norm is not None
