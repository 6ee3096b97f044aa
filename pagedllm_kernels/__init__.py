"""Attention kernels over a paged KV cache, each beside its plain-torch reference.

Knows nothing of requests or of pagedllm: tensors in, tensors out.
"""

from pagedllm_kernels.reference import paged_attention_ref, store_kv_cache_ref

__all__ = ["paged_attention_ref", "store_kv_cache_ref"]
