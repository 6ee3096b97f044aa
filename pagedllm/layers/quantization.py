"""FP8 (e4m3) linear layers: weights with one scale per output row, activations quantized per
token as they come (dynamic), the product on Hopper through ``torch._scaled_mm`` with both scales
applied in its epilogue, or for a few rows (a decode step of a few streams) through the Triton
kernel that reads the weights faster there (``few_rows_matmul``, as bf16 layers do); elsewhere
their reference, which dequantizes and multiplies in float32.

A bf16/fp16 checkpoint is quantized once its weights are loaded (``quantize_linears``); an FP8
checkpoint is dequantized by the loader as it is read (``models/fp8_checkpoint.py``) and quantized
again here, per row, whatever its own scale layout (per tensor, per row or in blocks)."""

from dataclasses import dataclass

import torch
import torch.nn as nn

from pagedllm.layers import triton_ops
from pagedllm_kernels.reference import fp8_weight_matmul_ref, quantize_rows_ref

FP8 = torch.float8_e4m3fn
FEW_ROWS = 16  # up to here few_rows_matmul reads the weights faster than cuBLAS or torch._scaled_mm (H200)


@dataclass
class FP8Rows:
    """Activations quantized per token by the kernel that made them (a norm, the MLP's activation),
    for the one FP8 linear layer that reads them: a kernel less per layer, and at one stream a
    launch costs about what the quantizing itself does."""

    q: torch.Tensor  # [tokens, in] e4m3
    scale: torch.Tensor  # [tokens, 1] float32
    dtype: torch.dtype  # the model's: the product's


def quantized_rows(x: torch.Tensor | FP8Rows) -> FP8Rows:
    """x's rows quantized per token (in one kernel on CUDA), or x as it came if it already is."""
    if isinstance(x, FP8Rows):
        return x
    rows = x.reshape(-1, x.shape[-1])
    quantize = triton_ops.quantize_rows if triton_ops.fused_on(x) else quantize_rows_ref
    return FP8Rows(*quantize(rows if rows.stride(-1) == 1 else rows.contiguous()), x.dtype)


def fp8_linear(x: torch.Tensor | FP8Rows, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (weight * weight_scale).T + bias`` with FP8 ``weight [out, in]`` and float32
    ``weight_scale [out, 1]``, x quantized per token (``quantized_rows``). On CUDA one
    ``torch._scaled_mm`` (row-wise scales need a bf16 output: an fp16 model's is converted after)
    or, for up to ``FEW_ROWS`` rows, ``few_rows_matmul`` (which beats it there: H200, Llama-3-8B's
    layers); elsewhere both operands dequantized and multiplied in float32 (``fp8_weight_matmul_ref``)."""
    rows = quantized_rows(x)
    if rows.q.is_cuda and triton_ops.few_rows_matmul is not None and len(rows.q) <= FEW_ROWS:
        out = triton_ops.few_rows_matmul(rows.q, weight, rows.dtype, bias, rows.scale, weight_scale)
    else:
        if rows.q.is_cuda:
            out = torch._scaled_mm(rows.q, weight.t(), scale_a=rows.scale, scale_b=weight_scale.t(),
                                   out_dtype=torch.bfloat16).to(rows.dtype)
        else:
            out = fp8_weight_matmul_ref(rows.q, rows.scale, weight, weight_scale, rows.dtype)
        out = out if bias is None else out + bias
    return out.reshape(*x.shape[:-1], -1) if isinstance(x, torch.Tensor) else out


def quantize_linears(model: nn.Module) -> None:
    """Quantize every tensor-parallel linear layer's weight (this rank's slice) and every expert's
    to FP8 with a scale per output row, in place; embeddings, the LM head, norms and routers keep
    the dtype. Experts keep their activations in the dtype (their kernel widens the weights).
    A layer that knows which norms feed only its linear layers has them quantize their outputs
    (``hand_fp8_to_linears``)."""
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
        if hasattr(module, "hand_fp8_to_linears"):
            module.hand_fp8_to_linears()
