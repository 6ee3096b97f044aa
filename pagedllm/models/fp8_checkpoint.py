"""FP8 checkpoints as saved by llm-compressor (``quant_method: compressed-tensors``, float 8-bit
weights) or with ``quant_method: fp8`` (per tensor, or in blocks with ``weight_block_size`` and
``weight_scale_inv``, as Qwen3's and DeepSeek's FP8 releases): each FP8 weight is read with its
scale and handed to the model dequantized, slice by slice (a tensor-parallel rank reads only its
rows); ``quantize_linears`` then quantizes the linear layers again, per row."""

import math
from collections.abc import Iterator

import torch
from transformers import PretrainedConfig

_SCALES = (".weight_scale", ".weight_scale_inv")  # a weight's dequantizing factor, whatever its name
# a layer's calibrated KV cache scales: llm-compressor's names, and AutoFP8's on the projections
_KV_SCALES = {".self_attn.k_scale": "k_scale", ".self_attn.v_scale": "v_scale",
              ".self_attn.k_proj.output_scale": "k_scale", ".self_attn.v_proj.output_scale": "v_scale"}


def fp8_checkpoint(hf_config: PretrainedConfig) -> dict | None:
    """The checkpoint's quantization_config if it holds FP8 weights, None for an unquantized one;
    a ValueError for any other quantization."""
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8":
        return qc
    if method == "mxfp4":  # gpt-oss's experts: dequantized as they load (mxfp4_checkpoint)
        return None
    if method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
        if weights and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights):
            return qc
        raise ValueError("config.json's compressed-tensors quantization is not FP8 weights (supported: FP8 "
                         f"weights, per tensor, channel or block): {weights}")
    raise ValueError(f"config.json's quantization_config quant_method={method!r} is not supported "
                     "(supported: FP8 checkpoints, quant_method 'fp8' or FP8 'compressed-tensors', and gpt-oss's "
                     "'mxfp4')")


def block_size(qc: dict) -> tuple[int, int] | None:
    """The [rows, cols] of a weight scale's block, for block-wise checkpoints."""
    block = qc.get("weight_block_size")
    for group in (qc.get("config_groups") or {}).values():
        block = block or (group.get("weights") or {}).get("block_structure")
    return tuple(block) if block else None


class DequantizedTensor:
    """An FP8 checkpoint weight read as ``weight * scale``, where the scale is one number, one per
    row, or one per block; indexed like the loader's tensors (``t[a:b]``, ``t[:, a:b]``, ``t[:]``)."""

    def __init__(self, weight, scale: torch.Tensor, block: tuple[int, int] | None):
        self.weight, self.scale, self.block, self.shape = weight, scale.float(), block, tuple(weight.shape)

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        rows, cols = (list(index) + [slice(None)] * 2)[:2]
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        values = self.weight[rows, cols].float()
        if self.scale.numel() == 1:
            return values * self.scale.reshape(())
        if self.block is None:  # one scale per row
            return values * self.scale.reshape(-1, 1)[r0:r1]
        b0, b1 = self.block
        scale = self.scale[r0 // b0 : -(-r1 // b0), c0 // b1 : -(-c1 // b1)]
        scale = scale.repeat_interleave(b0, dim=0).repeat_interleave(b1, dim=1)
        return values * scale[r0 % b0 : r0 % b0 + r1 - r0, c0 % b1 : c0 % b1 + c1 - c0]


def dequantize(weights: Iterator[tuple[str, object]], qc: dict,
               kv_scales: dict[str, dict[str, float]]) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors with each FP8 weight paired with its scale (whichever comes first
    waits for the other: a weight is read whole then, which happens when a scale sorts into
    another file); input scales (static activation scales) are dropped: activations are
    quantized per token as they come. Calibrated KV cache scales go into ``kv_scales``
    (``{"<layer>.self_attn": {"k_scale": s, "v_scale": s}}``) instead."""
    block = block_size(qc)
    weights_waiting: dict[str, torch.Tensor] = {}
    scales_waiting: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        scaled = next((name[: -len(s)] + ".weight" for s in _SCALES if name.endswith(s)), None)
        if scaled is not None:
            if scaled in weights_waiting:
                yield scaled, DequantizedTensor(weights_waiting.pop(scaled), tensor[...], block)
            else:
                scales_waiting[scaled] = tensor[...]
        elif name.endswith(".input_scale"):
            continue
        elif kv := next(((suffix, which) for suffix, which in _KV_SCALES.items() if name.endswith(suffix)), None):
            layer = name[: -len(kv[0])] + ".self_attn"
            kv_scales.setdefault(layer, {})[kv[1]] = float(tensor[...].float().reshape(-1)[0])
        elif not tensor.is_fp8:
            yield name, tensor
        elif name in scales_waiting:
            yield name, DequantizedTensor(tensor, scales_waiting.pop(name), block)
        else:
            weights_waiting[name] = tensor[:]
    if weights_waiting or scales_waiting:
        names = sorted(weights_waiting) + sorted(f"the scale of {n}" for n in scales_waiting)
        raise ValueError(f"FP8 checkpoint weights without their scale (or scales without their weight): "
                         f"{', '.join(names[:5])}")


def set_kv_scales(model: torch.nn.Module, kv_scales: dict[str, dict[str, float]]) -> None:
    """Give each attention layer its checkpoint's KV cache scales (an FP8 cache divides by them).
    A scale that is not a positive finite number is refused by name: dividing by it would fill
    the cache with NaN or the range's ends, and every request's answer with noise."""
    from pagedllm.layers.attention import Attention

    for layer, scales in kv_scales.items():
        module = model.get_submodule(model.map_weight_name(f"{layer}.weight")[0].rsplit(".", 1)[0])
        attention = next(m for m in module.modules() if isinstance(m, Attention))
        for which, value in scales.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"the checkpoint's {layer}.{which}={value!r} is invalid: a KV cache scale must be "
                                 "a positive finite number (or leave kv_cache_dtype='auto', which does not use it)")
            setattr(attention, which, value)
