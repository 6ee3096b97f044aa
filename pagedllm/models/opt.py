"""OPT: learned positions (offset 2), pre- or post-LayerNorm, optional input/output projections."""

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from pagedllm.layers.attention import Attention
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear, shard_units
from pagedllm.layers.norm import LayerNorm, add_and_norm
from pagedllm.layers.vocab import ParallelLMHead, VocabParallelEmbedding

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_POSITION_OFFSET = 2  # OPT's position table starts with two unused rows


def _layer_norm(config: PretrainedConfig) -> LayerNorm:
    return LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        num_heads = config.num_attention_heads
        head_dim = config.hidden_size // num_heads
        shard = shard_units(num_heads, head_dim)
        self.local_size = shard.size
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [shard] * 3, config.enable_bias)
        self.out_proj = RowParallelLinear(config.hidden_size, config.hidden_size, config.enable_bias,
                                          unit_size=head_dim)
        self.attn = Attention(shard.size // head_dim, shard.size // head_dim, head_dim, head_dim**-0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split(self.local_size, dim=-1)
        return self.out_proj(self.attn(q, k, v))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = _layer_norm(config)
        relu = config.activation_function == "relu"  # then fc1 applies it (fused into its product on CUDA)
        self.fc1 = ColumnParallelLinear(config.hidden_size, [shard_units(config.ffn_dim)], config.enable_bias,
                                        relu=relu)
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, config.enable_bias)
        self.activation_fn = nn.Identity() if relu else ACT2FN[config.activation_function]
        self.final_layer_norm = _layer_norm(config)

    def forward(self, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As Llama's layer: takes the previous layer's output and the residual stream before it,
        each residual add fused into the LayerNorm after it. Post-LayerNorm (opt-350m) norms each
        sum, which is then the stream itself (no residual is carried)."""
        if not self.pre_norm:
            hidden_states = self.self_attn_layer_norm(self.self_attn(hidden_states), hidden_states)[0]
            return self.final_layer_norm(self._mlp(hidden_states), hidden_states)[0], None
        hidden_states, residual = add_and_norm(self.self_attn_layer_norm, hidden_states, residual)
        hidden_states, residual = self.final_layer_norm(self.self_attn(hidden_states), residual)
        return self._mlp(hidden_states), residual

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class OPTDecoder(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        proj_dim = config.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + _POSITION_OFFSET, config.hidden_size)
        projected = proj_dim != config.hidden_size
        self.project_in = nn.Linear(proj_dim, config.hidden_size, bias=False) if projected else None
        self.project_out = nn.Linear(config.hidden_size, proj_dim, bias=False) if projected else None
        keep_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = _layer_norm(config) if keep_final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if self.project_in is not None:
            hidden_states = self.project_in(hidden_states)
        hidden_states, residual = hidden_states + self.embed_positions(positions + _POSITION_OFFSET), None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states, residual)[0]
        elif residual is not None:  # pre-LayerNorm without a final norm
            hidden_states = hidden_states + residual
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states


class OPTModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    def __init__(self, engine_config: "EngineConfig"):
        super().__init__()
        config = engine_config.hf_config
        self.model = OPTModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.word_embed_proj_dim)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def map_weight_name(self, name: str) -> tuple[str, int | None]:
        if name.startswith("decoder."):  # the original facebook/opt-* files have no "model." prefix
            name = "model." + name
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _QKV:
            return ".".join(parts[:-2] + ["qkv_proj", parts[-1]]), _QKV[parts[-2]]
        return name, None
