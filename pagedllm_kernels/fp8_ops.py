"""FP8 linear layers' kernels, each beside its reference in ``reference.py``.

- ``quantize_rows`` (``quantize_rows_ref``): activations per token in one kernel: each row's
  largest magnitude sets its scale, then the row is divided, clamped to e4m3's range and stored as
  FP8. In torch this is five kernels per linear layer, each a pass over the activations.
- ``fp8_weight_matmul`` (``fp8_weight_matmul_ref``): a few rows of FP8 activations times FP8
  weights, each with its row scales. With one to a few tokens a step (one stream's decode) the
  product is a read of the weights, which ``torch._scaled_mm`` tiles poorly at that size."""

import torch
import triton
import triton.language as tl

from pagedllm_kernels.pdl import pdl, wait_for_previous
from pagedllm_kernels.reference import FP8_MAX


@triton.jit
def _row_scales(largest, scale_ptr, row, FP8_MAX: tl.constexpr):
    """Store a row's scale (its largest magnitude / FP8_MAX); return what its values are multiplied
    by (FP8_MAX / largest), both divided once with IEEE rounding, as torch divides (``/`` is
    approximate in Triton): per value a product, since an IEEE division each took the kernel
    twice as long (H200)."""
    largest = tl.maximum(largest, 1e-12)
    tl.store(scale_ptr + row, tl.math.div_rn(largest, FP8_MAX))
    return tl.math.div_rn(tl.zeros_like(largest) + FP8_MAX, largest)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n, stride_x, stride_q, FP8_MAX: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    largest = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
        largest = tl.maximum(largest, tl.abs(x))
    inverse = _row_scales(tl.max(largest, axis=0), scale_ptr, row, FP8_MAX)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
        q = tl.clamp(x * inverse, -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < n)


@triton.jit
def store_row_as_fp8(values, q_ptr, scale_ptr, row, stride_q, cols, mask, FP8_MAX: tl.constexpr):
    """A row held whole in registers (float32 values, as rounded to the model's dtype), stored as
    ``quantize_rows_ref`` quantizes it: for a kernel whose output only an FP8 linear layer reads
    (a norm, the MLP's activation), which then needs no quantizing kernel of its own."""
    inverse = _row_scales(tl.max(tl.where(mask, tl.abs(values), 0.0), axis=0), scale_ptr, row, FP8_MAX)
    q = tl.clamp(values * inverse, -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantizing_warps(block: int) -> int:
    """Warps of a program that quantizes a row of ``block`` (H200: 16 from 4096 wide on; 4 took 1.4x as long)."""
    return min(16, max(4, block // 256))


def empty_fp8_rows(rows: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Room for ``rows`` quantized rows of ``n`` and their scales."""
    return (torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(rows, 1, dtype=torch.float32, device=device))


WIDEST_BLOCK = 16384  # a row up to this wide (every hidden and MLP width of the supported models) in one block


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, cols]`` (each row dense) as FP8 and one float32 scale per row ``[rows, 1]``."""
    rows, n = x.shape
    q, scale = empty_fp8_rows(rows, n, x.device)
    if rows:
        block = min(WIDEST_BLOCK, triton.next_power_of_2(n))
        _quantize_rows_kernel[(rows,)](x, q, scale, n, x.stride(0), q.stride(0), FP8_MAX=FP8_MAX, BLOCK=block,
                                       num_warps=quantizing_warps(block), **pdl(x))
    return q, scale


@triton.jit
def _fp8_weight_matmul_kernel(x_ptr, x_scale_ptr, w_ptr, scale_ptr, out_ptr, partial_ptr, arrivals_ptr, m, n, k,
                              stride_xm, stride_wn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
                              PDL: tl.constexpr):
    wait_for_previous(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(split * K_PER_SPLIT, tl.minimum(k, (split + 1) * K_PER_SPLIT), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=(rows < m)[:, None] & (ks < k)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=(cols < n)[:, None] & (ks < k)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    if SPLIT_K > 1:  # each split leaves its partial sum; the last to arrive adds them up, in split order
        tile = rows[:, None] * n + cols[None, :]
        tl.store(partial_ptr + split * m * n + tile, acc, mask=mask)
        counter = arrivals_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(counter, 1) == SPLIT_K - 1:  # (acq_rel: the other splits' stores are seen)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for other in range(SPLIT_K):
                acc += tl.load(partial_ptr + other * m * n + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(counter, 0)  # ready for the next call
        else:
            return
    acc = acc * tl.load(scale_ptr + cols, mask=cols < n, other=0.0)[None, :]
    acc = acc * tl.load(x_scale_ptr + rows, mask=rows < m, other=0.0)[:, None]
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


_arrivals: dict[torch.device, torch.Tensor] = {}  # per device: split-K's arrival counters, zero between calls


def _arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Counters that every call leaves at zero, so one set serves every layer (their kernels run one
    after another); made once, before any CUDA graph captures the kernel (the warm-up runs first)."""
    counters = _arrivals.get(device)
    if counters is None or len(counters) < tiles:
        counters = _arrivals[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return counters


def few_rows_config(n: int, k: int) -> dict:
    """Tiles of ``fp8_weight_matmul`` for an ``[n, k]`` weight: best of a sweep on an H200 over
    Llama-3-8B's layers at 1-16 rows (a wide layer wants wider tiles; a deep one, split-K)."""
    split_k = 4 if k > 2 * n else 1
    block_n = 64 if n >= 16384 or split_k > 1 else 32
    return dict(block_n=block_n, block_k=512 if block_n == 32 else 256, split_k=split_k,
                num_stages=4 if split_k > 1 else 3)


def fp8_weight_matmul(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      out_dtype: torch.dtype, *, block_n: int | None = None, block_k: int | None = None,
                      split_k: int | None = None, num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """``(x [m, k] * x_scale [m, 1]) @ (weight [n, k] * weight_scale [n, 1]).T`` in ``out_dtype``,
    both operands FP8, x's rows dense. Each program reads ``block_n`` weight rows over
    ``k / split_k`` columns (by default ``few_rows_config``'s); split-K's partial sums are added by
    the last program of each tile to finish, in split order (no kernel after it, and results that do
    not vary from run to run)."""
    m, k = x.shape
    n = weight.shape[0]
    tiles = few_rows_config(n, k)
    block_n, block_k = block_n or tiles["block_n"], block_k or tiles["block_k"]
    split_k, num_stages = split_k or tiles["split_k"], num_stages or tiles["num_stages"]
    block_m = 16  # tl.dot's least; a single row pads to it in registers, costing no reads
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m:
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
        partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
        arrivals = _arrival_counters(x.device, grid[0] * grid[1]) if split_k > 1 else out
        _fp8_weight_matmul_kernel[grid](x, x_scale, weight, weight_scale, out, partial, arrivals, m, n, k,
                                        x.stride(0), weight.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                        BLOCK_K=block_k, K_PER_SPLIT=k_per_split, SPLIT_K=split_k,
                                        num_warps=num_warps, num_stages=num_stages, **pdl(x))
    return out
