"""Gemma 2 (``Gemma2ForCausalLM``) and Gemma 3's text model (``Gemma3ForCausalLM``, model_type
``gemma3_text``, and the language model of the image-and-text ``Gemma3ForConditionalGeneration``
checkpoints, 4B and up): Llama's attention and gated MLP with Gemma's changes: embeddings scaled by
sqrt(hidden_size), ``1 + weight`` RMSNorms (in float32) on both sides of attention and MLP,
``query_pre_attn_scalar``, GELU-tanh, sliding-window and global layers (``layer_types``), and the
attention scores and final logits soft-capped where the config says (Gemma 2 caps both). Gemma 3
adds q/k norms and gives each kind of layer its own rotary parameters."""

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from transformers import PretrainedConfig

from pagedllm.layers.norm import GemmaRMSNorm, add_and_norm
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from pagedllm.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, head_dim_of

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_type: str, rotary_emb: RotaryEmbedding):
        super().__init__()
        window = config.sliding_window if layer_type == "sliding_attention" else None
        self.self_attn = LlamaAttention(config, window, rotary_emb)
        self.mlp = LlamaMLP(config, config.hidden_activation)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """As Llama's layer: takes the previous layer's output and the residual stream before it,
        each residual add fused into the norm after it; the outputs of attention and MLP are
        normed before they are added."""
        hidden_states, residual = add_and_norm(self.input_layernorm, hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_model_len: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # HF multiplies by the scale rounded to the model's dtype
        self.embed_scale = torch.tensor(config.hidden_size**0.5, dtype=torch.get_default_dtype()).item()
        per_type = set(config.layer_types) <= set(config.rope_parameters)  # Gemma 3's: {layer type: parameters}
        rotary = {t: RotaryEmbedding(config, head_dim_of(config), max_model_len, t if per_type else None)
                  for t in set(config.layer_types)}
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, t, rotary[t]) for t in config.layer_types)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids) * self.embed_scale, None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class GemmaForCausalLM(LlamaForCausalLM):
    """Llama's head and checkpoint names, Gemma's body and soft-capped logits."""

    def __init__(self, engine_config: "EngineConfig"):
        nn.Module.__init__(self)
        config = engine_config.hf_config
        if config.model_type == "gemma3_text" and config.attn_logit_softcapping is not None:
            raise ValueError(f"attn_logit_softcapping={config.attn_logit_softcapping} in config.json is not "
                             "supported for Gemma 3 (its checkpoints leave it unset, and HF's Gemma 3 ignores it)")
        self.model = GemmaModel(config, engine_config.max_model_len)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = config.final_logit_softcapping

    def map_weight_name(self, name: str) -> tuple[str, int | None]:
        """Also the language model's tensors of an image-and-text checkpoint (its vision tower's
        are left out: they name no parameter)."""
        for prefix in ("language_model.", "model.language_model."):  # as saved by transformers 4, and 5
            if name.startswith(prefix):
                rest = name[len(prefix):]
                name = rest if rest.startswith(("model.", "lm_head.")) else f"model.{rest}"
        return super().map_weight_name(name)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        cap = self.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
