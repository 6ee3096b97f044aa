"""Triton kernel: write the step's new K/V rows into the paged cache (reference: store_kv_cache_ref)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_cache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                           stride_key, stride_value,
                           ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    dst = slot.to(tl.int64) * ROW + offs
    tl.store(k_cache_ptr + dst, tl.load(key_ptr + token * stride_key + offs, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(value_ptr + token * stride_value + offs, mask=mask), mask=mask)


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """key/value ``[num_tokens, num_kv_heads, head_dim]`` (rows may be strided, each row dense)
    into caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` at flat slots; -1 skips."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    key, value = _rows_dense(key), _rows_dense(value)
    _store_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
        ROW=row, BLOCK=triton.next_power_of_2(row),
    )


def _rows_dense(x: torch.Tensor) -> torch.Tensor:
    """Each token's heads x head_dim contiguous (a q/k/v split of a fused projection already is)."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x
    return x.contiguous()
