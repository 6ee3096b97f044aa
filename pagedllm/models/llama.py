"""Llama and its close kin: Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm), Phi-3
and Phi-4-mini (q/k/v and gate/up saved fused, partial rotary, LongRoPE), Granite (multipliers on
the embeddings, attention scores, residual branches and logits), SmolLM3 (layers without rotary,
"NoPE"), and the mixtures of experts Mixtral, Qwen3-MoE and gpt-oss (a sparse MoE block in place of the
MLP; gpt-oss's attention has sinks and biases, its norms run in float32)."""

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from pagedllm.layers.attention import Attention
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear, shard_units
from pagedllm.layers.moe import GptOssMoeBlock, SparseMoeBlock
from pagedllm.layers.norm import Float32RMSNorm, GemmaRMSNorm, RMSNorm, add_and_norm
from pagedllm.layers.quantization import FP8Rows
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.triton_ops import fused_on, silu_and_mul
from pagedllm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from pagedllm_kernels.reference import silu_and_mul_ref

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

# HF projections we run merged: checkpoint name -> (our merged module, part).
_MERGED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
# An expert's projection (Mixtral's names, Qwen3-MoE's) -> (our stacked weight, part of expert e: a * e + b).
_EXPERT_PARTS = {"w1": ("w13", 2, 0), "gate_proj": ("w13", 2, 0), "w3": ("w13", 2, 1), "up_proj": ("w13", 2, 1),
                 "w2": ("w2", 1, 0), "down_proj": ("w2", 1, 0)}
# gpt-oss's names: all experts in one tensor each (mlp.experts.{name}), the router, the sinks.
_GPT_OSS_EXPERTS = {"gate_up_proj": "w13", "gate_up_proj_bias": "w13_bias", "down_proj": "w2",
                    "down_proj_bias": "w2_bias"}
_GPT_OSS_RENAMED = {"router": "gate", "sinks": "attn.sinks"}


def moe_block(config: PretrainedConfig, layer_index: int) -> SparseMoeBlock | None:
    """The layer's mixture of experts, or None for a dense MLP (Qwen3-MoE's ``mlp_only_layers``
    and the layers ``decoder_sparse_step`` skips)."""
    if config.model_type == "gpt_oss":
        return GptOssMoeBlock(config)
    if config.model_type == "mixtral":  # every layer
        return SparseMoeBlock(config.hidden_size, config.intermediate_size, config.num_local_experts,
                              config.num_experts_per_tok, True, config.hidden_act)
    num_experts = getattr(config, "num_experts", None) if config.model_type == "qwen3_moe" else None
    if not num_experts or layer_index in config.mlp_only_layers or (layer_index + 1) % config.decoder_sparse_step:
        return None
    return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, num_experts, config.num_experts_per_tok,
                          config.norm_topk_prob, config.hidden_act)


def sliding_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's window: Mistral windows every layer; Qwen2/3 only their "sliding_attention" layers."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return [None] * config.num_hidden_layers
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window] * config.num_hidden_layers


def norm_class(config: PretrainedConfig) -> type[RMSNorm]:
    return Float32RMSNorm if config.model_type == "gpt_oss" else RMSNorm


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, sliding_window: int | None, rotary_emb: RotaryEmbedding | None):
        super().__init__()
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        self.head_dim = head_dim_of(config)
        qwen2 = config.model_type == "qwen2"
        bias = bool(getattr(config, "attention_bias", False))
        # This rank's heads: query heads split evenly, KV heads split or, when fewer than the
        # ranks, shared by neighbouring ranks (whose query heads are all in that KV head's group).
        q_shard, kv_shard = shard_units(num_heads, self.head_dim), shard_units(num_kv_heads, self.head_dim)
        self.q_size, self.kv_size = q_shard.size, kv_shard.size
        self.num_heads, self.num_kv_heads = self.q_size // self.head_dim, self.kv_size // self.head_dim
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [q_shard, kv_shard, kv_shard], bias or qwen2)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias, unit_size=self.head_dim)
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe", "gemma3_text")
        if self.qk_norm:
            norm = GemmaRMSNorm if config.model_type == "gemma3_text" else RMSNorm
            self.q_norm = norm(self.head_dim, config.rms_norm_eps)
            self.k_norm = norm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5  # Gemma's own
        if config.model_type == "granite":
            scale = config.attention_multiplier
        softcap = config.attn_logit_softcapping if config.model_type == "gemma2" else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window, softcap,
                              sinks=config.model_type == "gpt_oss")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb, *norms))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, activation: str):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        shard = shard_units(config.intermediate_size)
        self.intermediate_size = shard.size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [shard, shard], bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias)
        self.silu = activation == "silu"
        self.act_fn = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.silu:
            fp8 = self.down_proj.weight_scale is not None  # then the activation comes quantized
            act = (silu_and_mul if fused_on(gate_up) else silu_and_mul_ref)(gate_up, fp8)
            return self.down_proj(FP8Rows(*act, gate_up.dtype) if fp8 else act)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, sliding_window: int | None, rotary_emb: RotaryEmbedding | None,
                 layer_index: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, sliding_window, rotary_emb)
        self.mlp = moe_block(config, layer_index) or LlamaMLP(config, config.hidden_act)
        norm = norm_class(config)
        self.input_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.residual_multiplier = getattr(config, "residual_multiplier", 1.0)  # Granite's, on both branches

    def hand_fp8_to_linears(self) -> None:
        """Called once the linear layers are FP8: the norms whose output only one of them reads
        quantize it (a MoE block's router reads its input in the dtype)."""
        self.input_layernorm.fp8_out = True
        self.post_attention_layernorm.fp8_out = isinstance(self.mlp, LlamaMLP)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the previous layer's output and the residual stream before it; each residual add
        is fused into the RMSNorm that follows it."""
        hidden_states, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        if self.residual_multiplier != 1.0:
            hidden_states = hidden_states * self.residual_multiplier
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        if self.residual_multiplier != 1.0:
            hidden_states = hidden_states * self.residual_multiplier
        return hidden_states, residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_model_len: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = RotaryEmbedding(config, head_dim_of(config), max_model_len)  # one table for every layer
        rotary = getattr(config, "no_rope_layers", None) or [1] * config.num_hidden_layers  # SmolLM3's: 0 for NoPE
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, window, rotary_emb if rotary[i] else None, i)
                                    for i, window in enumerate(sliding_windows(config)))
        self.norm = norm_class(config)(config.hidden_size, config.rms_norm_eps)
        self.embedding_multiplier = getattr(config, "embedding_multiplier", 1.0)  # Granite's

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        if self.embedding_multiplier != 1.0:
            hidden_states = hidden_states * self.embedding_multiplier
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, engine_config: "EngineConfig"):
        super().__init__()
        config = engine_config.hf_config
        self.model = LlamaModel(config, engine_config.max_model_len)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_scaling = getattr(config, "logits_scaling", 1.0)  # Granite's: logits divided by it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        return logits if self.logits_scaling == 1.0 else logits / self.logits_scaling

    def map_weight_name(self, name: str) -> tuple[str, int | None]:
        parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")  # Mixtral's name for the MoE block
        if len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in _GPT_OSS_EXPERTS:
            return ".".join(parts[:-2] + [_GPT_OSS_EXPERTS[parts[-1]]]), None
        parts = [_GPT_OSS_RENAMED.get(p, p) for p in parts]
        if len(parts) >= 4 and parts[-4] == "experts" and parts[-2] in _EXPERT_PARTS:  # experts.{e}.{proj}.weight
            stacked, a, b = _EXPERT_PARTS[parts[-2]]
            return ".".join(parts[:-4] + [stacked]), a * int(parts[-3]) + b
        if len(parts) >= 2 and parts[-2] in _MERGED:
            merged, part = _MERGED[parts[-2]]
            return ".".join(parts[:-2] + [merged, parts[-1]]), part
        return ".".join(parts), None
