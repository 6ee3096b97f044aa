"""GPT-2: learned positions, pre-LayerNorm, HF's Conv1D weights (stored ``[in, out]``, and q/k/v as one)."""

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


class GPT2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        shard = shard_units(config.num_attention_heads, head_dim)
        self.local_size = shard.size
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.c_attn = ColumnParallelLinear(config.hidden_size, [shard] * 3, bias=True, transposed=True)
        self.c_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=True, transposed=True,
                                        unit_size=head_dim)
        self.attn = Attention(shard.size // head_dim, shard.size // head_dim, head_dim, scale)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(hidden_states).split(self.local_size, dim=-1)
        return self.c_proj(self.attn(q, k, v))


class GPT2MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, [shard_units(inner)], bias=True, transposed=True)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True, transposed=True)
        self.act = ACT2FN[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the previous block's output and the residual stream before it; each residual add
        is fused into the LayerNorm after it."""
        hidden_states, residual = add_and_norm(self.ln_1, hidden_states, residual)
        hidden_states, residual = self.ln_2(self.attn(hidden_states), residual)
        return self.mlp(hidden_states), residual


class GPT2Model(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.wte(input_ids) + self.wpe(positions), None
        for block in self.h:
            hidden_states, residual = block(hidden_states, residual)
        return self.ln_f(hidden_states, residual)[0]


class GPT2LMHeadModel(nn.Module):
    def __init__(self, engine_config: "EngineConfig"):
        super().__init__()
        config = engine_config.hf_config
        self.transformer = GPT2Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def map_weight_name(self, name: str) -> tuple[str, int | None]:
        if not name.startswith(("transformer.", "lm_head.")):  # the original gpt2 files have no prefix
            name = "transformer." + name
        return name, None
