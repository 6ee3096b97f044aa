"""Tiny random HF checkpoints of every supported architecture, built offline.

No model hub is reachable in CI, so tests (and, until a trained demo model ships, the demo)
make their checkpoints with transformers itself: ``from_config`` + ``save_pretrained``, and a
byte-level BPE tokenizer trained with ``tokenizers`` on text from Python's own library.
"""

import os
import sysconfig

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GptOssConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
)

VOCAB_SIZE = 512
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_COMMON = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=256, initializer_range=0.2, **_COMMON)

# A large initializer range gives clear argmaxes, so greedy comparisons do not flip on rounding.
TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "opt": OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                     max_position_embeddings=256, word_embed_proj_dim=64, init_std=0.2, **_COMMON),
    "opt-project": OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=32, init_std=0.2, **_COMMON),
    "opt-post-ln": OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=False,
                             init_std=0.2, **_COMMON),
    "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, **_COMMON),
    "llama": LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64},
                         **_LLAMA_LIKE),
    "mistral": MistralConfig(num_key_value_heads=1, sliding_window=48, **_LLAMA_LIKE),
    "qwen2": Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **_LLAMA_LIKE),
    "qwen3": Qwen3Config(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, **_LLAMA_LIKE),
    # Phi-3.5/Phi-4-mini-like: fused q/k/v and gate/up, three quarters of each head rotating, LongRoPE
    # (its short factors here: no context passes the original length; the long ones: test_models_match_hf)
    "phi3": Phi3Config(num_key_value_heads=2, original_max_position_embeddings=256, sliding_window=48,
                       rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                        "short_factor": [1.0 + i / 16 for i in range(6)],
                                        "long_factor": [2.0 + i for i in range(6)]},
                       **_LLAMA_LIKE),
    # Granite: multipliers on the embeddings, scores (in place of 1/sqrt(head_dim)), residual branches, logits
    "granite": GraniteConfig(num_key_value_heads=2, embedding_multiplier=6.0, attention_multiplier=0.5,
                             residual_multiplier=0.4, logits_scaling=1.5, **_LLAMA_LIKE),
    # SmolLM3: every third layer without rotary (NoPE), tied embeddings
    "smollm3": SmolLM3Config(num_key_value_heads=2, no_rope_layers=[1, 1, 0], tie_word_embeddings=True,
                             **{**_LLAMA_LIKE, "num_hidden_layers": 3}),
    # mixtures of experts: Mixtral (every layer, top-2 renormalised), Qwen3-MoE (a dense layer among
    # sparse ones, top-3 of 6 without renormalising)
    "mixtral": MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **_LLAMA_LIKE),
    "qwen3-moe": Qwen3MoeConfig(num_key_value_heads=2, head_dim=32, num_experts=6, num_experts_per_tok=3,
                                moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1],
                                **{**_LLAMA_LIKE, "num_hidden_layers": 3}),
    # Gemma 3: two sliding layers then a global one, local and global rotary (global scaled as 4B+'s),
    # query_pre_attn_scalar apart from head_dim, soft-capped logits
    "gemma3": Gemma3TextConfig(num_key_value_heads=2, head_dim=32, sliding_window=24,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                               rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 1000000.0}},
                               **{**_LLAMA_LIKE, "num_hidden_layers": 3}),
    # Gemma 2: sliding and global layers in turn, one rotary, no q/k norms, attention scores and logits
    # soft-capped (caps low enough that they change what random weights pick)
    "gemma2": Gemma2Config(num_key_value_heads=2, head_dim=32, sliding_window=24, query_pre_attn_scalar=24,
                           attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                           **{**_LLAMA_LIKE, "num_hidden_layers": 3}),
    # gpt-oss: sliding and full layers in turn, YaRN rotary, attention sinks, biases everywhere, 4 experts
    # top-2 with biases and the clamp of its activation at 7 (fixed at 7 in transformers before 5.25: the
    # experts' gate/up weights are drawn large enough to pass it, as are both kinds of bias and the sinks,
    # in build_tiny_checkpoint: HF starts them at zero or near it)
    "gpt-oss": GptOssConfig(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                            sliding_window=24,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                             "original_max_position_embeddings": 64},
                            **_LLAMA_LIKE),
}
# Parameters HF initializes at zero or small that a tiny model draws at random, so that a model that
# drops them cannot pass for one that applies them.
_DRAWN = {"gpt-oss": ("_bias", "sinks", "experts.gate_up_proj")}


def _corpus() -> list[str]:
    """Text that every Python installation has: a few modules of its standard library."""
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = []
    for name in ("textwrap.py", "string.py", "random.py", "fractions.py", "this.py"):
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            texts.append(f.read())
    return texts


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_tiny_checkpoint(kind: str, path: str, seed: int = 0,
                          tokenizer: PreTrainedTokenizerFast | None = None) -> str:
    """Save a tiny random model of ``kind`` (a key of TINY_CONFIGS) and a tokenizer in ``path``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[kind])
    for name, param in model.named_parameters():
        if name.endswith(_DRAWN.get(kind, ())):
            param.data.normal_(0.0, 1.0)
    model.save_pretrained(path)
    (tokenizer or build_tokenizer()).save_pretrained(path)
    return path


def held_out_loss(llm, text_path: str, num_tokens: int = 400) -> float:
    """Mean negative log-likelihood of the first ``num_tokens`` tokens of a text file, under an
    ``LLM`` (its prompt logprobs): how much a change of precision costs a trained model."""
    from pagedllm import SamplingParams

    with open(text_path) as f:
        ids = llm.get_tokenizer()(f.read())["input_ids"][:num_tokens]
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return -sum(entry[t].logprob for t, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True)) / (len(ids) - 1)

