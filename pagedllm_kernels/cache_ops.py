"""Triton kernel: write the step's new K/V rows into the paged cache, divided by the layer's scales
and clamped to e4m3's range when the cache is FP8 (reference: store_kv_cache_ref). A kernel that
makes K itself (the rotary embedding's) can write both instead, given a ``KVWrite``."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm_kernels.pdl import pdl, wait_for_previous


@dataclass(frozen=True)
class KVWrite:
    """Where this step's K/V go: the layer's caches ``[num_blocks, block_size, num_kv_heads,
    head_dim]`` at flat slots (-1 skips), V as ``[num_tokens, num_kv_heads, head_dim]``."""

    value: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    k_scale: float
    v_scale: float


@triton.jit
def as_cached(x, scale, cache_ptr):
    """x as the cache holds it: divided by the scale and clamped into an FP8 cache, else as it is."""
    if cache_ptr.dtype.element_ty != x.dtype:  # an FP8 cache
        x = fp8_quotient(x.to(tl.float32), scale)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def fp8_quotient(x, scale):
    """torch's ``(x / scale).clamp(-448, 448)`` for float32 x, to the bit, without a division a
    value (compiled to a branch to a slow path around each, it made the FP8 store 2.6x slower than
    the bf16 one): the scale's reciprocal, once, and two FMA corrections (Markstein's). The plain
    product stands where those give NaN (an infinite or huge x: it is as large, and clamped the
    same) or zero (it keeps the sign of a zero quotient)."""
    inv = tl.math.div_rn(1.0, scale)
    product = x * inv
    q = tl.fma(tl.fma(-product, scale, x), inv, product)
    q = tl.fma(tl.fma(-q, scale, x), inv, q)
    return tl.clamp(tl.where((q == q) & (q != 0.0), q, product), -448.0, 448.0)


@triton.jit
def _store_kv_cache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                           stride_key, stride_value, k_scale, v_scale,
                           ROW: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    dst = slot.to(tl.int64) * ROW + offs
    key = tl.load(key_ptr + token * stride_key + offs, mask=mask)
    value = tl.load(value_ptr + token * stride_value + offs, mask=mask)
    tl.store(k_cache_ptr + dst, as_cached(key, k_scale, k_cache_ptr), mask=mask)
    tl.store(v_cache_ptr + dst, as_cached(value, v_scale, v_cache_ptr), mask=mask)


def store_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """key/value ``[num_tokens, num_kv_heads, head_dim]`` (rows may be strided, each row dense)
    into caches ``[num_blocks, block_size, num_kv_heads, head_dim]`` at flat slots; -1 skips."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    row = num_kv_heads * head_dim
    key, value = _rows_dense(key), _rows_dense(value)
    _store_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0), k_scale, v_scale,
        ROW=row, BLOCK=triton.next_power_of_2(row), **pdl(key),
    )


def _rows_dense(x: torch.Tensor) -> torch.Tensor:
    """Each token's heads x head_dim contiguous (a q/k/v split of a fused projection already is)."""
    if x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return x
    return x.contiguous()
