"""Attention over the paged KV cache: store the step's K/V, then attend through block tables."""

import torch
import torch.nn as nn

from pagedllm.forward_context import get_attention_metadata
from pagedllm_kernels import paged_attention_ref, store_kv_cache_ref


class Attention(nn.Module):
    """Takes flat q ``[num_tokens, num_heads * head_dim]`` and k, v with ``num_kv_heads``.

    ``k_cache``/``v_cache`` are this layer's views of the engine's KV cache, bound by the
    model runner once the cache is allocated.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = get_attention_metadata()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        store_kv_cache_ref(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = paged_attention_ref(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens,
                                  meta.cu_seqlens_q, self.scale, self.sliding_window)
        return out.view(-1, self.num_heads * self.head_dim)
