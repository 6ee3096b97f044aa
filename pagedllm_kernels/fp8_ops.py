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

from pagedllm_kernels.reference import FP8_MAX


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, n, stride_x, stride_q, FP8_MAX: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    largest = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
        largest = tl.maximum(largest, tl.abs(x))
    scale = tl.math.div_rn(tl.maximum(tl.max(largest, axis=0), 1e-12), FP8_MAX)  # IEEE, as torch: `/` is approximate
    tl.store(scale_ptr + row, scale)
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < n)


_WIDEST_BLOCK = 16384  # a row up to this wide (every hidden and MLP width of the supported models) in one block


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, cols]`` (each row dense) as FP8 and one float32 scale per row ``[rows, 1]``."""
    rows, n = x.shape
    q = torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = min(_WIDEST_BLOCK, triton.next_power_of_2(n))
        _quantize_rows_kernel[(rows,)](x, q, scale, n, x.stride(0), q.stride(0), FP8_MAX=FP8_MAX, BLOCK=block,
                                       num_warps=min(16, max(4, block // 1024)))
    return q, scale


@triton.jit
def _fp8_weight_matmul_kernel(x_ptr, x_scale_ptr, w_ptr, scale_ptr, out_ptr, m, n, k, stride_xm, stride_wn,
                              stride_os, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr):
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
    acc = acc * tl.load(scale_ptr + cols, mask=cols < n, other=0.0)[None, :]
    acc = acc * tl.load(x_scale_ptr + rows, mask=rows < m, other=0.0)[:, None]
    out = out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows < m)[:, None] & (cols < n)[None, :])


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
    ``k / split_k`` columns (by default ``few_rows_config``'s); split-K's partial sums are added in
    a fixed order, so results do not vary from run to run."""
    m, k = x.shape
    n = weight.shape[0]
    tiles = few_rows_config(n, k)
    block_n, block_k = block_n or tiles["block_n"], block_k or tiles["block_k"]
    split_k, num_stages = split_k or tiles["split_k"], num_stages or tiles["num_stages"]
    block_m = 16  # tl.dot's least; a single row pads to it in registers, costing no reads
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(split_k, m, n, dtype=out_dtype if split_k == 1 else torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
        _fp8_weight_matmul_kernel[grid](x, x_scale, weight, weight_scale, out,
                                        m, n, k, x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
                                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k_per_split,
                                        num_warps=num_warps, num_stages=num_stages)
    return out[0] if split_k == 1 else out.sum(0).to(out_dtype)
