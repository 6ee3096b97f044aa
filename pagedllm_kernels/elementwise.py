"""Triton kernels that fuse the small per-token operations of a transformer layer, each one pass
over its rows instead of several torch kernels (references: rms_norm_ref, rotary_ref,
silu_and_mul_ref). At batch 1 a Llama-3-8B decode step otherwise spends ~1.7 ms in ~700 tiny
kernels beside ~5.5 ms of weight reads."""

import torch
import triton
import triton.language as tl

from pagedllm_kernels.cache_ops import KVWrite, as_cached
from pagedllm_kernels.fp8_ops import WIDEST_BLOCK, empty_fp8_rows, quantize_rows, quantizing_warps, store_row_as_fp8
from pagedllm_kernels.pdl import pdl, wait_for_previous
from pagedllm_kernels.reference import FP8_MAX


@triton.jit
def _row_with_residual(x_ptr, residual_ptr, residual_out_ptr, stride_x, stride_r, n, out_ty,
                       HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """This program's row of x, or of ``x + residual`` rounded to the output dtype (stored as the
    new residual); with its columns and their mask."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(out_ty)
        tl.store(residual_out_ptr + row * n + cols, x, mask=mask)
    return row, cols, mask, x


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr, residual_out_ptr, stride_x, stride_r,
                     stride_o, n, eps, HAS_RESIDUAL: tl.constexpr, SCALE_IN_FLOAT32: tl.constexpr,
                     QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    dtype = x_ptr.dtype.element_ty
    row, cols, mask, x = _row_with_residual(x_ptr, residual_ptr, residual_out_ptr, stride_x, stride_r, n,
                                            dtype, HAS_RESIDUAL, BLOCK)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / n + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (w * (h if SCALE_IN_FLOAT32 else h.to(dtype).to(tl.float32))).to(dtype)
    if QUANTIZE:
        store_row_as_fp8(out.to(tl.float32), out_ptr, scale_ptr, row, stride_o, cols, mask, FP8_MAX)
    else:
        tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             scale_in_float32: bool = False, quantize: bool = False):
    """Same contract as ``rms_norm_ref`` over the last dimension of a 2-D or 3-D ``x`` (quantized:
    of a 2-D ``x``)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n = x2.shape
    if quantize:
        out, scale = empty_fp8_rows(rows, n, x.device)
    else:
        out, scale = torch.empty(rows, n, dtype=x.dtype, device=x.device), None
    residual_out = torch.empty(rows, n, dtype=x.dtype, device=x.device) if residual is not None else x2
    r2 = residual.reshape(-1, n) if residual is not None else x2
    block = triton.next_power_of_2(n)
    if rows:
        _rms_norm_kernel[(rows,)](x2, r2, weight, out, scale, residual_out, x2.stride(0), r2.stride(0), out.stride(0),
                                  n, eps, HAS_RESIDUAL=residual is not None, SCALE_IN_FLOAT32=scale_in_float32,
                                  QUANTIZE=quantize, FP8_MAX=FP8_MAX, BLOCK=block,
                                  num_warps=quantizing_warps(block) if quantize else 4, **pdl(x2))
    out = (out, scale) if quantize else out.view(shape)
    return out if residual is None else (out, residual_out.view(shape))


@triton.jit
def _layer_norm_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, residual_out_ptr, stride_x, stride_r,
                       stride_o, n, eps, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row, cols, mask, x = _row_with_residual(x_ptr, residual_ptr, residual_out_ptr, stride_x, stride_r, n,
                                            out_ptr.dtype.element_ty, HAS_RESIDUAL, BLOCK)
    h = x.to(tl.float32)
    mean = tl.sum(h, axis=0) / n
    centred = tl.where(mask, h - mean, 0.0)
    out = centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / n + eps)
    if HAS_WEIGHT:
        out = out * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``layer_norm_ref`` over the last dimension of ``x`` (OPT's and GPT-2's
    norms, each fused with the residual add before it)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    rows, n = x2.shape
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    r2 = residual.reshape(-1, n) if residual is not None else x2
    if rows:
        _layer_norm_kernel[(rows,)](x2, r2, weight if weight is not None else x2, bias if bias is not None else x2,
                                    out, residual_out, x2.stride(0), r2.stride(0), out.stride(0), n, eps,
                                    HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
                                    HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(n), **pdl(x2))
    out = out.view(shape)
    return out if residual is None else (out, residual_out.view(shape))


@triton.jit
def _rotary_kernel(positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, q_weight_ptr, k_weight_ptr, eps,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, num_q_heads, num_k_heads,
                   v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, stride_vt, stride_vh, k_scale, v_scale,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
                   NORM: tl.constexpr, SCALE_IN_FLOAT32: tl.constexpr, WRITE_KV: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    token = tl.program_id(0)
    pos = tl.load(positions_ptr + token)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HALF
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d_mask, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=d_mask, other=0.0)[None, :]
    hk = tl.arange(0, BLOCK_HK)  # K's heads (fewer than q's with GQA: no lanes spent on masked rows)
    k_mask = (hk < num_k_heads)[:, None] & d_mask[None, :]
    if WRITE_KV:  # the token's V (and K, below) at its slot, as store_kv_cache writes them
        slot = tl.load(slot_mapping_ptr + token)
        cached = slot.to(tl.int64) * num_k_heads * 2 * HALF + hk[:, None] * 2 * HALF + d[None, :]
        write_mask = k_mask & (tl.zeros_like(hk) + slot >= 0)[:, None]  # a padding token (-1) writes nothing
        v_row = v_ptr + token * stride_vt + hk[:, None] * stride_vh + d[None, :]
        for part in tl.static_range(2):
            v = tl.load(v_row + part * HALF, mask=write_mask, other=0.0)
            tl.store(v_cache_ptr + cached + part * HALF, as_cached(v, v_scale, v_cache_ptr), mask=write_mask)
    for which in tl.static_range(2):
        if which == 0:
            h = tl.arange(0, BLOCK_H)
            base = q_ptr + token * stride_qt + h[:, None] * stride_qh
            mask = (h < num_q_heads)[:, None] & d_mask[None, :]
            weight_ptr = q_weight_ptr
        else:
            base = k_ptr + token * stride_kt + hk[:, None] * stride_kh
            mask = k_mask
            weight_ptr = k_weight_ptr
        x1 = tl.load(base + d[None, :], mask=mask, other=0.0)
        x2 = tl.load(base + HALF + d[None, :], mask=mask, other=0.0)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        if NORM:  # each head's RMSNorm first, rounded as rms_norm rounds its output
            inv = tl.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)[:, None]
            w1 = tl.load(weight_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            w2 = tl.load(weight_ptr + HALF + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            f1, f2 = f1 * inv, f2 * inv
            if not SCALE_IN_FLOAT32:
                f1, f2 = f1.to(x1.dtype).to(tl.float32), f2.to(x1.dtype).to(tl.float32)
            f1, f2 = (w1 * f1).to(x1.dtype).to(tl.float32), (w2 * f2).to(x1.dtype).to(tl.float32)
        out1, out2 = (f1 * c - f2 * s).to(x1.dtype), (f2 * c + f1 * s).to(x1.dtype)
        tl.store(base + d[None, :], out1, mask=mask)
        tl.store(base + HALF + d[None, :], out2, mask=mask)
        if WRITE_KV and which == 1:
            tl.store(k_cache_ptr + cached, as_cached(out1, k_scale, k_cache_ptr), mask=write_mask)
            tl.store(k_cache_ptr + cached + HALF, as_cached(out2, k_scale, k_cache_ptr), mask=write_mask)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None, eps: float = 0.0,
           scale_in_float32: bool = False, kv_write: KVWrite | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as ``rotary_ref``, written in place into q and k (each row's head_dim dense).
    With ``norm_weights`` (q's and k's, QK-norm: Qwen3, Gemma 3), each head is RMS-normalized
    first in the same pass, as ``rms_norm_ref(x, weight, eps, None, scale_in_float32)``: two
    fewer kernels a layer, and q and k read and written once. With ``kv_write`` the rotated K and
    the step's V go into the paged cache as well, as ``store_kv_cache`` writes them: a kernel less
    a layer (the whole head rotates)."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1
    q_weight, k_weight = norm_weights if norm_weights is not None else (q, k)
    w = kv_write
    if w is not None:
        assert w.value.stride(2) == 1 and w.k_cache.is_contiguous() and w.v_cache.is_contiguous()
    cache_args = ((w.value, w.k_cache, w.v_cache, w.slot_mapping, w.value.stride(0), w.value.stride(1), w.k_scale,
                   w.v_scale) if w is not None else (k, k, k, positions, 0, 0, 1.0, 1.0))
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](positions, q, k, cos, sin, q_weight, k_weight, eps, q.stride(0), q.stride(1),
                                      k.stride(0), k.stride(1), cos.stride(0), num_q_heads, k.shape[1], *cache_args,
                                      HALF=half, BLOCK_H=triton.next_power_of_2(num_q_heads),
                                      BLOCK_HK=triton.next_power_of_2(k.shape[1]),
                                      BLOCK_D=triton.next_power_of_2(half), NORM=norm_weights is not None,
                                      SCALE_IN_FLOAT32=scale_in_float32, WRITE_KV=w is not None, **pdl(q))
    return q, k


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, scale_ptr, stride_in, n, alpha, limit, QUANTIZE: tl.constexpr,
                         CLAMPED: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + n + cols, mask=mask, other=0.0)
    if CLAMPED:  # gpt-oss's, in float32 and rounded once
        gate = tl.minimum(gate, limit)
        glu = gate * tl.sigmoid(gate * alpha)
        out = ((tl.clamp(up.to(tl.float32), -limit, limit) + 1.0) * glu).to(up.dtype)
    else:
        act = (gate * tl.sigmoid(gate)).to(up.dtype).to(tl.float32)
        out = (act * up.to(tl.float32)).to(up.dtype)
    if QUANTIZE:  # (the whole row in this program)
        store_row_as_fp8(out.to(tl.float32), out_ptr, scale_ptr, row, n, cols, mask, FP8_MAX)
    else:
        tl.store(out_ptr + row * n + cols, out, mask=mask)


def silu_and_mul(gate_up: torch.Tensor, quantize: bool = False):
    """Same contract as ``silu_and_mul_ref``."""
    return _gated(gate_up, quantize)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Same contract as ``clamped_swiglu_ref`` (within a rounding: one, at the end, where HF rounds
    each of its ops in a 16-bit dtype)."""
    return _gated(gate_up, False, (alpha, limit))


def _gated(gate_up: torch.Tensor, quantize: bool, clamp: tuple[float, float] | None = None):
    num_tokens, width = gate_up.shape
    n = width // 2
    if quantize and n > WIDEST_BLOCK:  # a row too wide for one program's registers
        return quantize_rows(_gated(gate_up, False, clamp))
    if quantize:
        out, scale = empty_fp8_rows(num_tokens, n, gate_up.device)
    else:
        out, scale = torch.empty(num_tokens, n, dtype=gate_up.dtype, device=gate_up.device), None
    if num_tokens:
        block = triton.next_power_of_2(n) if quantize else min(1024, triton.next_power_of_2(n))
        alpha, limit = clamp or (1.0, 0.0)
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(n, block))](gate_up, out, scale, gate_up.stride(0), n, alpha,
                                                                  limit, QUANTIZE=quantize, CLAMPED=clamp is not None,
                                                                  FP8_MAX=FP8_MAX, BLOCK=block,
                                                                  num_warps=quantizing_warps(block) if quantize else 4,
                                                                  **pdl(gate_up))
    return (out, scale) if quantize else out
