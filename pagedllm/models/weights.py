"""Build a model on its device and fill its parameters (this rank's slices) from the checkpoint,
or at random."""

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn as nn

from pagedllm.config import EngineConfig
from pagedllm.distributed import sharded_as
from pagedllm.layers.linear import copy_checked
from pagedllm.layers.quantization import quantize_linears
from pagedllm.models.fp8_checkpoint import dequantize, fp8_checkpoint, set_kv_scales
from pagedllm.models.loader import CheckpointTensor, iter_checkpoint
from pagedllm.models.mxfp4_checkpoint import dequantize as dequantize_mxfp4
from pagedllm.models.mxfp4_checkpoint import mxfp4_checkpoint
from pagedllm.models.registry import get_model_class


def build_model(config: EngineConfig, device: torch.device, rank: int) -> tuple[nn.Module, int]:
    """Rank ``rank``'s shard of the model in ``config.dtype`` on ``device``, weights loaded, in eval
    mode; and the bytes of checkpoint it read (only its slices)."""
    model_class = get_model_class(config.hf_config)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.dtype)
    try:
        with device, sharded_as(rank, config.tensor_parallel_size):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)
    reads = [0]
    if config.load_format == "dummy":
        init_dummy_weights(model, config.seed or 0)
    else:
        weights = iter_checkpoint(config.model_path, config.load_format, reads)
        fp8, kv_scales = fp8_checkpoint(config.hf_config), {}
        if mxfp4_checkpoint(config.hf_config):
            weights = dequantize_mxfp4(weights)
        load_weights(model, dequantize(weights, fp8, kv_scales) if fp8 else weights)
        if config.kv_cache_dtype != "auto":  # an FP8 cache, with the checkpoint's calibrated scales if any
            set_kv_scales(model, kv_scales)
    if config.quantization == "fp8":
        quantize_linears(model)
    return model.eval().requires_grad_(False), reads[0]


def _weight_loader(param: nn.Parameter):
    """The parameter's own loader (a sharded layer's: it reads its slice), else a whole copy."""
    return getattr(param, "weight_loader", lambda p, loaded, part: copy_checked(p, loaded[:]))


def load_weights(model: nn.Module, weights: Iterable[tuple[str, CheckpointTensor]]) -> None:
    """Hand each checkpoint tensor to the loader of the parameter ``model.map_weight_name`` names,
    which reads this rank's slice of it.

    Checkpoint entries the model has no parameter for (HF buffers such as rotary tables,
    a tied lm_head) are skipped; a parameter the checkpoint leaves unset is an error.
    """
    params = dict(model.named_parameters())
    loaded: dict[str, set[int | None]] = defaultdict(set)
    for hf_name, tensor in weights:
        name, part = model.map_weight_name(hf_name)
        param = params.get(name)
        if param is None:
            continue
        try:
            _weight_loader(param)(param, tensor, part)
        except ValueError as err:
            raise ValueError(f"checkpoint weight {hf_name}: {err}") from None
        loaded[name].add(part)
    missing = [name for name, p in params.items()
               if None not in loaded[name] and len(loaded[name]) < getattr(p, "num_parts", 1)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"the checkpoint lacks weights the model needs: {shown}")


class _RandomTensor:
    """A random "checkpoint tensor" of a parameter's full, unsharded shape: every rank draws the
    same values from the same seed and keeps its slice, so dummy weights do not depend on
    tensor_parallel_size."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, seed: int):
        self.shape = shape
        generator = torch.Generator(device=device).manual_seed(seed)
        self._values = torch.empty(shape, device=device).uniform_(-1e-3, 1e-3, generator=generator)

    def __getitem__(self, index) -> torch.Tensor:
        return self._values[index]


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Small random values from the config alone, for speed, which would not depend on the weights,
    but for a mixture of experts' routing: random biases, the same for every token, add up over the
    layers until they outweigh what differs between tokens, and send every token to the same few
    experts (a random gpt-oss's whole batch to 4 of 32 in its deep layers), which no trained router
    does. So biases (every ``*bias`` parameter) are zero."""
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("bias"):
            param.data.zero_()
            continue
        full_shape = getattr(param, "full_shape", tuple(param.shape))
        _weight_loader(param)(param, _RandomTensor(full_shape, param.device, seed * 100003 + index), None)
