"""Attention kernels over a paged KV cache, each beside its plain-torch reference.

Knows nothing of requests or of pagedllm: tensors in, tensors out. The Triton kernels are
imported from their modules (``pagedllm_kernels.paged_attention``, ``.cache_ops``) so that the
references work where triton is not installed.
"""

from pagedllm_kernels.reference import paged_attention_ref, store_kv_cache_ref

__all__ = ["paged_attention_ref", "store_kv_cache_ref"]
