"""gpt-oss's MXFP4 checkpoints (``quant_method: mxfp4``): each expert weight is saved as
``{name}_blocks`` ``[E, rows, cols / 32, 16]`` (two 4-bit e2m1 values a byte, the low nibble first)
and ``{name}_scales`` ``[E, rows, cols / 32]`` (a power of two per 32 values, biased by 127). They
are handed to the model dequantized, as HF's parameter ``{name}`` ``[E, cols, rows]``, one rank's
slice at a time; the experts then run in the model's dtype, or in FP8 with ``quantization="fp8"``."""

from collections.abc import Iterator

import torch
from transformers import PretrainedConfig

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_GROUP = 32  # values that share a scale


def mxfp4_checkpoint(hf_config: PretrainedConfig) -> bool:
    qc = getattr(hf_config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc.get("quant_method") == "mxfp4"


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[..., groups, 16]`` bytes and ``[..., groups]`` exponents to ``[..., groups * 32]`` float32."""
    table = torch.tensor(_E2M1, dtype=torch.float32)
    values = torch.stack((table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]), dim=-1)
    values = torch.ldexp(values.flatten(-2), scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2)


class Mxfp4Tensor:
    """One MXFP4 weight read as HF's ``[E, cols, rows]`` parameter, indexed like the loader's
    tensors (``t[:, a:b]``, ``t[:, :, a:b]``, ``t[:]``): only the groups a slice touches are read."""

    def __init__(self, blocks, scales):
        experts, rows, groups, width = blocks.shape
        if tuple(scales.shape) != (experts, rows, groups) or width * 2 != _GROUP:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match")
        self.blocks, self.scales, self.shape = blocks, scales, (experts, groups * _GROUP, rows)

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        experts, cols, rows = (list(index) + [slice(None)] * 3)[:3]
        c0, c1, step = cols.indices(self.shape[1])
        if step != 1 or not isinstance(experts, slice) or not isinstance(rows, slice):
            raise ValueError(f"an MXFP4 weight cannot be read at {index}")
        g0, g1 = c0 // _GROUP, -(-c1 // _GROUP)
        values = dequantize_mxfp4(self.blocks[experts, rows, g0:g1], self.scales[experts, rows, g0:g1])
        return values[..., c0 - g0 * _GROUP : c1 - g0 * _GROUP].transpose(1, 2)


def dequantize(weights: Iterator[tuple[str, object]]) -> Iterator[tuple[str, object]]:
    """The checkpoint's tensors with each ``{name}_blocks``/``{name}_scales`` pair as ``{name}``
    (whichever comes first waits for the other)."""
    waiting: dict[str, dict[str, object]] = {}
    for name, tensor in weights:
        part = next((p for p in ("blocks", "scales") if name.endswith("_" + p)), None)
        if part is None:
            yield name, tensor
            continue
        pair = waiting.setdefault(name[: -len(part) - 1], {})
        pair[part] = tensor
        if len(pair) == 2:
            base = name[: -len(part) - 1]
            yield base, Mxfp4Tensor(pair["blocks"], pair["scales"])
            del waiting[base]
    if waiting:
        raise ValueError(f"MXFP4 weights without their scales (or scales without their blocks): "
                         f"{', '.join(sorted(waiting)[:5])}")
