"""FP8 (e4m3) linear layers: weights with one scale per output row, activations quantized per
token as they come (dynamic), the product on Hopper through ``torch._scaled_mm`` with both scales
applied in its epilogue, or for a few rows (a decode step of a few streams) through a Triton
kernel that reads the weights faster there; elsewhere their reference, which dequantizes and
multiplies in float32.

A bf16/fp16 checkpoint is quantized once its weights are loaded (``quantize_linears``); an FP8
checkpoint is dequantized by the loader as it is read (``models/fp8_checkpoint.py``) and quantized
again here, per row, whatever its own scale layout (per tensor, per row or in blocks)."""

import torch
import torch.nn as nn

from pagedllm.layers import triton_ops
from pagedllm_kernels.reference import fp8_weight_matmul_ref, quantize_rows_ref

FP8 = torch.float8_e4m3fn
FEW_ROWS = 16  # up to here fp8_weight_matmul beats torch._scaled_mm (H200, Llama-3-8B's layers)


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """What ``fp8_linear`` computes: x quantized per token, both operands dequantized, multiplied
    in float32, rounded to x's dtype."""
    x_q, x_scale = quantize_rows_ref(x.reshape(-1, x.shape[-1]))
    out = fp8_weight_matmul_ref(x_q, x_scale, weight, weight_scale, x.dtype).reshape(*x.shape[:-1], -1)
    return out if bias is None else out + bias


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with FP8 ``weight [out, in]`` and float32
    ``weight_scale [out, 1]``; on CUDA the activations are quantized in one kernel, then one
    ``torch._scaled_mm`` (row-wise scales need a bf16 output: an fp16 model's is converted after)
    or, for up to ``FEW_ROWS`` rows, ``fp8_weight_matmul``."""
    if not x.is_cuda:
        return fp8_linear_ref(x, weight, weight_scale, bias)
    rows = x.reshape(-1, x.shape[-1])
    fused = triton_ops.fused_on(x)
    x_q, x_scale = (triton_ops.quantize_rows if fused else quantize_rows_ref)(
        rows if rows.stride(-1) == 1 else rows.contiguous())
    if fused and len(rows) <= FEW_ROWS:
        out = triton_ops.fp8_weight_matmul(x_q, x_scale, weight, weight_scale, x.dtype)
    else:
        out = torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(),
                               out_dtype=torch.bfloat16).to(x.dtype)
    out = out.reshape(*x.shape[:-1], -1)
    return out if bias is None else out + bias


def quantize_linears(model: nn.Module) -> None:
    """Quantize every tensor-parallel linear layer's weight (this rank's slice) and every expert's
    to FP8 with a scale per output row, in place; embeddings, the LM head, norms and routers keep
    the dtype. Experts keep their activations in the dtype (their kernel widens the weights)."""
    from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear
    from pagedllm.layers.moe import SparseMoeBlock

    for module in model.modules():
        if isinstance(module, ColumnParallelLinear | RowParallelLinear):
            weight, module.weight_scale = quantize_rows_ref(module.weight.data)
            module.weight = nn.Parameter(weight, requires_grad=False)
        elif isinstance(module, SparseMoeBlock):
            for name in ("w13", "w2"):
                stacked = getattr(module, name).data
                weight, scale = quantize_rows_ref(stacked.reshape(-1, stacked.shape[-1]))
                setattr(module, name, nn.Parameter(weight.view(stacked.shape), requires_grad=False))
                setattr(module, f"{name}_scale", scale.view(*stacked.shape[:2], 1))
