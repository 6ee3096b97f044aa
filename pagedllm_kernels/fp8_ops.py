"""FP8 linear layers' kernels, each beside its reference in ``reference.py``.

- ``quantize_rows`` (``quantize_rows_ref``): activations per token in one kernel: each row's
  largest magnitude sets its scale, then the row is divided, clamped to e4m3's range and stored as
  FP8. In torch this is five kernels per linear layer, each a pass over the activations.
- A few rows of FP8 activations times FP8 weights, each with its row scales, where
  ``torch._scaled_mm`` tiles poorly: ``few_rows.few_rows_matmul``, the kernel that bf16 layers use too."""

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
