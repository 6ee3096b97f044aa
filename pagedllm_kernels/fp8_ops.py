"""FP8 activations, per token, in one kernel (reference: quantize_rows_ref):
each row's largest magnitude sets its scale, then the row is divided, clamped to e4m3's range and
stored as FP8. In torch this is five kernels per linear layer, each a pass over the activations."""

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


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, cols]`` (each row dense) as FP8 and one float32 scale per row ``[rows, 1]``."""
    rows, n = x.shape
    q = torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        _quantize_rows_kernel[(rows,)](x, q, scale, n, x.stride(0), q.stride(0),
                                       FP8_MAX=FP8_MAX,
                                       BLOCK=min(1024, triton.next_power_of_2(n)))
    return q, scale
