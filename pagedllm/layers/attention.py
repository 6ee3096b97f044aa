"""Attention over the paged KV cache: store the step's K/V (rotating q and k first where given the
rotary embedding), then attend through block tables."""

import os

import torch
import torch.nn as nn

from pagedllm.distributed import tp_world_size
from pagedllm.forward_context import get_attention_metadata
from pagedllm.layers.linear import check_full_shape, copy_checked, shard_units
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.triton_ops import paged_attention, store_kv_cache
from pagedllm_kernels import paged_attention_ref, store_kv_cache_ref
from pagedllm_kernels.cache_ops import KVWrite

# "triton" (the default on CUDA) or "torch" (the reference; the default on CPU). Setting
# "triton" on CPU runs the kernels under TRITON_INTERPRET=1, which is how CI tests them end to end.
ATTENTION_BACKEND_ENV = "PAGEDLLM_ATTENTION_BACKEND"


def select_attention_backend(device: torch.device) -> str:
    backend = os.environ.get(ATTENTION_BACKEND_ENV) or ("triton" if device.type == "cuda" else "torch")
    if backend not in ("torch", "triton"):
        raise ValueError(f"{ATTENTION_BACKEND_ENV}={backend!r} is invalid: use 'torch' or 'triton'")
    if backend == "triton" and paged_attention is None:
        raise ValueError(f"{ATTENTION_BACKEND_ENV}=triton needs triton installed")
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{ATTENTION_BACKEND_ENV}=triton on the CPU needs TRITON_INTERPRET=1 (set before "
                         "triton is imported)")
    return backend


class Attention(nn.Module):
    """Takes flat q ``[num_tokens, num_heads * head_dim]`` and k, v with ``num_kv_heads``.

    ``k_cache``/``v_cache`` are this layer's views of the engine's KV cache and ``backend``
    its kernels; the model runner sets both. With ``sinks`` (gpt-oss), each head's softmax has a
    learned logit more, whose value is zero: the parameter ``sinks``, this rank's heads' part of
    the checkpoint's ``[num_heads]``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, softcap: float | None = None, sinks: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap or 0.0  # scores capped at +-softcap (Gemma 2), 0: not
        self.sinks = None
        if sinks:  # float32 whatever the model's dtype: the kernels add it to float32 scores
            self.sinks = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32))
            self.sinks.weight_loader = self._load_sinks
            self.sinks_shard = shard_units(num_heads * tp_world_size())  # (the rank is known while built)
            self.sinks.full_shape = (self.sinks_shard.full_size,)
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = 1.0  # an FP8 cache holds K / k_scale and V / v_scale
        self.backend = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
                rotary_emb: RotaryEmbedding | None = None, q_norm: nn.Module | None = None,
                k_norm: nn.Module | None = None) -> torch.Tensor:
        """With ``rotary_emb``, q and k are rotated here first (QK-normed with ``q_norm``/``k_norm``):
        on the Triton backend in the kernel that stores K/V, where it can."""
        meta = get_attention_metadata()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        slots, tables = meta.slot_mapping, meta.block_tables
        if self.sliding_window is not None and meta.window_block_tables is not None:  # its own pool
            slots, tables = meta.window_slot_mapping, meta.window_block_tables
        rotary_stores = self.backend == "triton" and rotary_emb is not None and rotary_emb.one_kernel(q)
        if rotary_emb is not None:
            write = KVWrite(v, self.k_cache, self.v_cache, slots, self.k_scale, self.v_scale) if rotary_stores else None
            q, k = rotary_emb(positions, q, k, q_norm, k_norm, write)
        if self.backend == "triton":
            if not rotary_stores:
                store_kv_cache(k, v, self.k_cache, self.v_cache, slots, self.k_scale, self.v_scale)
            out = paged_attention(q, self.k_cache, self.v_cache, tables, meta.context_lens,
                                  meta.cu_seqlens_q, self.scale, self.sliding_window, self.k_scale, self.v_scale,
                                  max_query_len=meta.max_query_len, max_context_len=meta.max_context_len,
                                  softcap=self.softcap, sinks=self.sinks)
        else:
            store_kv_cache_ref(k, v, self.k_cache, self.v_cache, slots, self.k_scale, self.v_scale)
            out = paged_attention_ref(q, self.k_cache, self.v_cache, tables, meta.context_lens,
                                      meta.cu_seqlens_q, self.scale, self.sliding_window, self.k_scale, self.v_scale,
                                      self.softcap, self.sinks)
        return out.view(-1, self.num_heads * self.head_dim)

    def _load_sinks(self, param: nn.Parameter, loaded, part: int | None) -> None:
        shard = self.sinks_shard
        check_full_shape(loaded, param.full_shape)
        copy_checked(param, loaded[shard.start : shard.start + shard.size])
