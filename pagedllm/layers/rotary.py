"""Rotary position embedding (rotate-half layout), with HF's rope_parameters types, partial rotary
(the first ``partial_rotary_factor`` of each head) and per-layer-type parameters (Gemma 3)."""

import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedllm.layers.triton_ops import fused_on, rotary
from pagedllm_kernels.cache_ops import KVWrite
from pagedllm_kernels.reference import rotary_ref


def rope_inv_freq(config: PretrainedConfig, head_dim: int, max_model_len: int,
                  layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale, as HF computes them for this config (for the
    layers of ``layer_type`` where the config keeps parameters per type).

    Tables are computed once, so the types HF recomputes as the sequence grows are taken at a
    fixed length: ``longrope`` uses its long factors if ``max_model_len`` passes the original
    context (as vLLM does; HF switches once a sequence passes it), ``dynamic`` is refused."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        # partial rotary: the first part of each head rotates (Phi-4-mini: three quarters)
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)), 1.0
    if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, "
                         f"{', '.join(t for t in ROPE_INIT_FUNCTIONS if t != 'dynamic')})")
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    if rope_type == "longrope":
        kwargs["seq_len"] = max_model_len
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **kwargs)
    return inv_freq.float(), float(scale)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q and k ``[num_tokens, heads, head_dim]`` at ``positions``; one
    instance serves every layer of its type (the tables span ``max_model_len`` positions)."""

    def __init__(self, config: PretrainedConfig, head_dim: int, max_model_len: int, layer_type: str | None = None):
        super().__init__()
        inv_freq, scale = rope_inv_freq(config, head_dim, max_model_len, layer_type)
        self.rotary_dim, self.head_dim = 2 * len(inv_freq), head_dim
        freqs = torch.outer(torch.arange(max_model_len, dtype=torch.float, device="cpu"), inv_freq)
        device = torch.get_default_device()
        self.register_buffer("cos", (freqs.cos() * scale).to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * scale).to(device), persistent=False)

    def one_kernel(self, q: torch.Tensor) -> bool:
        """Whether q and k rotate in one kernel over whole heads (on CUDA, where the whole head
        rotates): the kernel that also QK-normalizes them first and can write the KV cache."""
        return fused_on(q) and self.rotary_dim == self.head_dim

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, kv_write: KVWrite | None = None):
        """Rotated q and k (on CUDA rotated in place: they are this step's own projections). With
        ``q_norm``/``k_norm`` (QK-norm's RMSNorms over each head), normalized first: on CUDA in
        the same kernel, where the whole head rotates. With ``kv_write`` (where ``one_kernel``)
        the same kernel writes the rotated K and the step's V into the paged cache."""
        if kv_write is not None or (q_norm is not None and self.one_kernel(q)):
            norms = (q_norm.weight, k_norm.weight) if q_norm is not None else None
            return rotary(positions, q, k, self.cos, self.sin, norms, q_norm.eps if norms else 0.0,
                          q_norm.scale_in_float32 if norms else False, kv_write)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        apply = rotary if fused_on(q) else rotary_ref
        if self.rotary_dim == self.head_dim:
            return apply(positions, q, k, self.cos, self.sin)
        d = self.rotary_dim
        q_rot, k_rot = apply(positions, q[..., :d], k[..., :d], self.cos, self.sin)
        return torch.cat((q_rot, q[..., d:]), dim=-1), torch.cat((k_rot, k[..., d:]), dim=-1)
