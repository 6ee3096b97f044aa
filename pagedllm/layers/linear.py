"""Linear layers split across tensor-parallel ranks, Megatron-style, loading their slices from HF
checkpoints as they are.

A column-parallel layer keeps some output rows on each rank (q/k/v heads, MLP columns) and needs
no communication; the row-parallel layer after it holds the matching input columns and sums the
ranks' partial outputs with one all-reduce. With one rank both are plain linear layers.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pagedllm.distributed import all_reduce, tp_rank, tp_world_size
from pagedllm.layers import triton_ops
from pagedllm.layers.quantization import FEW_ROWS, fp8_linear


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, start + size)`` of a projection of ``full_size`` rows: this rank's part."""

    full_size: int
    start: int
    size: int


def shard_units(num_units: int, unit_size: int = 1) -> Shard:
    """This rank's share of ``num_units`` units (attention heads, or single rows) of ``unit_size``
    rows: an even split, or, with fewer units than ranks (KV heads under GQA), one unit shared by
    ``world_size / num_units`` neighbouring ranks."""
    rank, world = tp_rank(), tp_world_size()
    if num_units >= world:
        if num_units % world:
            raise ValueError(f"{num_units} cannot be split evenly over tensor_parallel_size={world}")
        per_rank = num_units // world
        return Shard(num_units * unit_size, rank * per_rank * unit_size, per_rank * unit_size)
    if world % num_units:
        raise ValueError(f"{num_units} heads cannot be shared evenly by tensor_parallel_size={world}")
    return Shard(num_units * unit_size, rank * num_units // world * unit_size, unit_size)


def _rows(loaded, start: int, size: int, transposed: bool) -> torch.Tensor:
    """Output rows ``[start, start + size)`` of a checkpoint weight or bias, reading only them.
    ``transposed``: the checkpoint stores the weight ``[in, out]`` (GPT-2's Conv1D)."""
    if len(loaded.shape) == 1:
        return loaded[start : start + size]
    return loaded[:, start : start + size].t() if transposed else loaded[start : start + size]


def check_full_shape(loaded, expected: tuple[int, ...], what: str = "") -> None:
    """A rank reads only a slice, so a checkpoint tensor of the wrong size would go unnoticed
    unless its whole shape is checked first."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"{what}has shape {tuple(loaded.shape)}, but config.json implies {tuple(expected)}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           weight_scale: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``F.linear`` (then ReLU with ``relu``), or its FP8 form once ``quantize_linears`` gave the
    layer a weight scale. On CUDA a step of up to ``FEW_ROWS`` tokens in bf16/fp16 goes through
    ``few_rows_matmul`` where it reads the weight faster than cuBLAS (H200: Qwen3-0.6B's four
    layers at one row 19.9 us against 30.4); other CUDA products with a bias take the ReLU in
    cuBLASLt's epilogue (H100, OPT-1.3B's fc1 at 8,192 rows 512 -> 438 us, at 256 rows 21.8 -> 18.3)."""
    if weight_scale is not None:  # (x may come quantized: FP8Rows)
        out = fp8_linear(x, weight, weight_scale, bias)
        return F.relu(out) if relu else out
    rows = x.reshape(-1, x.shape[-1])
    if (len(rows) <= FEW_ROWS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and triton_ops.few_rows_matmul is not None and triton_ops.reads_faster(weight)):
        rows = rows if rows.stride(-1) == 1 else rows.contiguous()
        out = triton_ops.few_rows_matmul(rows, weight, x.dtype, bias).reshape(*x.shape[:-1], -1)
    elif relu and x.is_cuda and bias is not None:
        return torch._addmm_activation(bias, rows, weight.t()).reshape(*x.shape[:-1], -1)
    else:
        out = F.linear(x, weight, bias)
    return F.relu(out) if relu else out


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str = "") -> None:
    """Copy checkpoint values into a parameter (or rows of it) of the same shape; the ValueError
    names ``what`` part of the checkpoint tensor did not fit."""
    if param.shape != loaded.shape:
        raise ValueError(f"{what}has shape {tuple(loaded.shape)}, but config.json implies {tuple(param.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """One or more HF projections sharing an input (q/k/v, gate/up), stacked along the output and
    each cut to this rank's ``shards``. The checkpoint keeps them apart (``part`` = their index)
    or already stacked (``part`` None, GPT-2's c_attn, Phi-3's qkv_proj)."""

    weight_scale: torch.Tensor | None = None  # [out, 1] once quantized to FP8

    def __init__(self, in_features: int, shards: list[Shard], bias: bool, transposed: bool = False,
                 relu: bool = False):
        super().__init__()
        self.shards, self.transposed = shards, transposed
        self.relu = relu  # the output goes through ReLU, fused into the product where cuBLASLt can
        out_features = sum(s.size for s in shards)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        full_size = sum(s.full_size for s in shards)
        for param in self.parameters():
            param.weight_loader = self._load
            param.num_parts = len(shards)
        self.weight.full_shape = (in_features, full_size) if transposed else (full_size, in_features)
        if bias:
            self.bias.full_shape = (full_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.weight_scale, self.relu)

    def _load(self, param: nn.Parameter, loaded, part: int | None) -> None:
        parts = range(len(self.shards)) if part is None else [part]
        rows = sum(self.shards[i].full_size for i in parts)
        in_features = self.weight.shape[1]
        expected = (rows,) if param.dim() == 1 else (in_features, rows) if self.transposed else (rows, in_features)
        check_full_shape(loaded, expected, "" if part is None else f"part {part} ")
        for i in parts:
            shard = self.shards[i]
            offset = sum(s.full_size for s in self.shards[:i]) if part is None else 0
            local = sum(s.size for s in self.shards[:i])
            rows = _rows(loaded, offset + shard.start, shard.size, self.transposed)
            copy_checked(param[local : local + shard.size], rows, f"part {i} ")


class RowParallelLinear(nn.Module):
    """A projection whose input columns are split across ranks (attention output, MLP down):
    each rank multiplies its slice, one all-reduce sums them, then the bias is added once."""

    weight_scale: torch.Tensor | None = None  # [out, 1] once quantized to FP8

    def __init__(self, in_features: int, out_features: int, bias: bool, transposed: bool = False,
                 unit_size: int = 1):
        super().__init__()
        self.shard = shard_units(in_features // unit_size, unit_size)
        self.tp_size = tp_world_size()
        self.transposed = transposed
        self.weight = nn.Parameter(torch.empty(out_features, self.shard.size))
        self.weight.weight_loader = self._load_weight
        self.weight.full_shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias, self.weight_scale)
        out = all_reduce(linear(x, self.weight, None, self.weight_scale))
        return out + self.bias if self.bias is not None else out

    def _load_weight(self, param: nn.Parameter, loaded, part: int | None) -> None:
        check_full_shape(loaded, param.full_shape)
        s = self.shard
        cols = loaded[s.start : s.start + s.size].t() if self.transposed else loaded[:, s.start : s.start + s.size]
        copy_checked(param, cols)
