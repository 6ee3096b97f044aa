"""RMSNorm computed as HF's Llama does, optionally fused with the residual add before it."""

import torch
import torch.nn as nn

from pagedllm.layers.triton_ops import fused_on, rms_norm
from pagedllm_kernels.reference import rms_norm_ref


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``."""
        return (rms_norm if fused_on(x) else rms_norm_ref)(x, self.weight, self.eps, residual)
