"""Build a model on its device and fill its parameters from the checkpoint (or at random)."""

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn as nn

from pagedllm.config import EngineConfig
from pagedllm.models.loader import iter_checkpoint
from pagedllm.models.registry import get_model_class


def build_model(config: EngineConfig) -> nn.Module:
    """The model in ``config.dtype`` on ``config.device``, weights loaded, in eval mode."""
    model_class = get_model_class(config.hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with torch.device(config.device):
            model = model_class(config.hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed)
    else:
        load_weights(model, iter_checkpoint(config.model_path, config.load_format))
    return model.eval().requires_grad_(False)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each checkpoint tensor into the parameter ``model.map_weight_name`` names.

    Checkpoint entries the model has no parameter for (HF buffers such as rotary tables,
    a tied lm_head) are skipped; a parameter the checkpoint leaves unset is an error.
    """
    params = dict(model.named_parameters())
    loaded: dict[str, int] = defaultdict(int)
    for hf_name, tensor in weights:
        name, part = model.map_weight_name(hf_name)
        param = params.get(name)
        if param is None:
            continue
        if part is None:
            if param.shape != tensor.shape:
                raise ValueError(f"checkpoint weight {hf_name} has shape {tuple(tensor.shape)}, "
                                 f"but config.json implies {tuple(param.shape)}")
            param.data.copy_(tensor)
        else:
            param.weight_loader(param, tensor, part)
        loaded[name] += 1
    missing = [name for name, p in params.items() if loaded[name] < getattr(p, "num_shards", 1)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the checkpoint lacks weights the model needs: {shown}")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Small random values from the config alone: speed does not depend on the weights."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for param in model.parameters():
        param.data.uniform_(-1e-3, 1e-3, generator=generator)
