"""RMSNorm computed as HF's Llama does, optionally fused with the residual add before it; in float32
(gpt-oss's) and Gemma's, which scales by ``1 + weight`` in float32 before rounding; and LayerNorm
(OPT, GPT-2), fused the same way."""

import torch
import torch.nn as nn

from pagedllm.layers.linear import copy_checked
from pagedllm.layers.quantization import FP8Rows
from pagedllm.layers.triton_ops import fused_on, layer_norm, rms_norm
from pagedllm_kernels.reference import layer_norm_ref, rms_norm_ref


class RMSNorm(nn.Module):
    scale_in_float32 = False
    fp8_out = False  # set when the one layer that reads the output is FP8: it comes quantized (FP8Rows)

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``."""
        out = (rms_norm if fused_on(x) else rms_norm_ref)(x, self.weight, self.eps, residual, self.scale_in_float32,
                                                          self.fp8_out)
        if not self.fp8_out:
            return out
        return FP8Rows(*out, x.dtype) if residual is None else (FP8Rows(*out[0], x.dtype), out[1])


class Float32RMSNorm(RMSNorm):
    """A float32 weight, scaling before the output is rounded (gpt-oss keeps its norms in float32)."""

    scale_in_float32 = True

    def __init__(self, size: int, eps: float):
        super().__init__(size, eps)
        self.weight = nn.Parameter(torch.ones(size, dtype=torch.float32))


class GemmaRMSNorm(Float32RMSNorm):
    """Gemma's checkpoints hold ``weight`` for a scale of ``1 + weight``: the 1 is added once, at
    load, into the float32 parameter (in bfloat16 the sum would lose the weight's low bits)."""

    def __init__(self, size: int, eps: float):
        super().__init__(size, eps)
        self.weight.weight_loader = lambda param, loaded, part: copy_checked(param, loaded[:].float() + 1)


class LayerNorm(nn.Module):
    """HF's ``nn.LayerNorm`` (same parameter names), optionally fused with the residual add before
    it: ``(norm(x + residual), x + residual)``."""

    def __init__(self, size: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if elementwise_affine else None
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return (layer_norm if fused_on(x) else layer_norm_ref)(x, self.weight, self.bias, self.eps, residual)


def add_and_norm(norm: nn.Module, hidden_states: torch.Tensor,
                 residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's first norm and the residual stream after it: the first layer's input starts the
    stream; later layers add the previous layer's output to it, fused into the norm."""
    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)
