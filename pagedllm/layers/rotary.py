"""Rotary position embedding (rotate-half layout), with HF's rope_parameters types."""

import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedllm.layers.triton_ops import fused_on, rotary
from pagedllm_kernels.reference import rotary_ref

# Types whose frequencies depend on the running sequence length; we precompute one table.
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale, as HF computes them for this config."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))
        return inv_freq, 1.0
    if rope_type in _LENGTH_DEPENDENT or rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, "
                         f"{', '.join(t for t in ROPE_INIT_FUNCTIONS if t not in _LENGTH_DEPENDENT)})")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q and k ``[num_tokens, heads, head_dim]`` at ``positions``."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_position: int):
        super().__init__()
        inv_freq, scale = rope_inv_freq(config, head_dim)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float, device="cpu"), inv_freq)
        device = torch.get_default_device()
        self.register_buffer("cos", (freqs.cos() * scale).to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scale).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotated q and k (on CUDA rotated in place: they are this step's own projections)."""
        return (rotary if fused_on(q) else rotary_ref)(positions, q, k, self.cos, self.sin)
