"""Which class runs which HF ``architectures`` entry."""

import torch.nn as nn
from transformers import PretrainedConfig


def _registry() -> dict[str, type[nn.Module]]:
    from pagedllm.models.gemma import GemmaForCausalLM
    from pagedllm.models.gpt2 import GPT2LMHeadModel
    from pagedllm.models.llama import LlamaForCausalLM
    from pagedllm.models.opt import OPTForCausalLM

    return {
        "OPTForCausalLM": OPTForCausalLM,
        "GPT2LMHeadModel": GPT2LMHeadModel,
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": LlamaForCausalLM,
        "Qwen3ForCausalLM": LlamaForCausalLM,
        "Phi3ForCausalLM": LlamaForCausalLM,
        "GraniteForCausalLM": LlamaForCausalLM,
        "SmolLM3ForCausalLM": LlamaForCausalLM,
        "MixtralForCausalLM": LlamaForCausalLM,
        "Qwen3MoeForCausalLM": LlamaForCausalLM,
        "GptOssForCausalLM": LlamaForCausalLM,
        "Gemma2ForCausalLM": GemmaForCausalLM,
        "Gemma3ForCausalLM": GemmaForCausalLM,
        "Gemma3ForConditionalGeneration": GemmaForCausalLM,  # its language model, for text prompts
    }


def supported_architectures() -> list[str]:
    return sorted(_registry())


def get_model_class(hf_config: PretrainedConfig) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    registry = _registry()
    for arch in architectures:
        if arch in registry:
            return registry[arch]
    raise ValueError(
        f"architecture {architectures or '(none given in config.json)'} is not supported; "
        f"pagedllm runs {', '.join(supported_architectures())}"
    )
