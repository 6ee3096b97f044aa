"""The paged KV cache: its geometry, its size, and binding its per-layer views to the layers."""

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from pagedllm.layers.attention import Attention

GiB = 1 << 30
# KV cache memory on the CPU, in GiB (vLLM calls it VLLM_CPU_KVCACHE_SPACE).
CPU_KV_CACHE_SPACE_ENV = "PAGEDLLM_CPU_KVCACHE_SPACE"


@dataclass(frozen=True)
class CacheGeometry:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def cache_geometry(model: nn.Module, block_size: int, dtype: torch.dtype) -> CacheGeometry:
    layers = attention_layers(model)
    shapes = {(a.num_kv_heads, a.head_dim) for a in layers}
    if len(shapes) != 1:
        raise ValueError(f"layers with different KV head shapes {shapes} are not supported")
    (num_kv_heads, head_dim), = shapes
    return CacheGeometry(len(layers), block_size, num_kv_heads, head_dim, dtype)


def allocate_kv_cache(model: nn.Module, geometry: CacheGeometry, num_blocks: int,
                      device: torch.device) -> torch.Tensor:
    """One tensor ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``; each attention
    layer gets views of its K and V planes."""
    g = geometry
    cache = torch.zeros(g.num_layers, 2, num_blocks, g.block_size, g.num_kv_heads, g.head_dim,
                        dtype=g.dtype, device=device)
    for layer, attn in enumerate(attention_layers(model)):
        attn.k_cache, attn.v_cache = cache[layer, 0], cache[layer, 1]
    return cache


def release_kv_cache(model: nn.Module) -> None:
    for attn in attention_layers(model):
        attn.k_cache = attn.v_cache = torch.empty(0)


def cpu_num_blocks(geometry: CacheGeometry, max_useful_blocks: int) -> int:
    """Blocks that fit in PAGEDLLM_CPU_KVCACHE_SPACE GiB (default 4), but no more than can ever be used."""
    space = float(os.environ.get(CPU_KV_CACHE_SPACE_ENV, "4")) * GiB
    return max(1, min(int(space // geometry.bytes_per_block), max_useful_blocks))


def gpu_num_blocks(geometry: CacheGeometry, gpu_memory_utilization: float, weight_bytes: int,
                   activation_peak: int) -> tuple[int, str]:
    """Blocks that fill ``gpu_memory_utilization`` of the device after the weights, the activation
    peak of the profiling run, and memory held outside torch's allocator; and how that was decided."""
    free, total = torch.cuda.mem_get_info()
    outside_torch = max(total - free - torch.cuda.memory_reserved(), 0)
    allowed = total * gpu_memory_utilization
    budget = allowed - weight_bytes - activation_peak - outside_torch
    explained = (f"{total / GiB:.1f} GiB x gpu_memory_utilization {gpu_memory_utilization} = {allowed / GiB:.1f} GiB, "
                 f"less weights {weight_bytes / GiB:.2f} GiB, activation peak {activation_peak / GiB:.2f} GiB, "
                 f"outside torch {outside_torch / GiB:.2f} GiB = {max(budget, 0) / GiB:.2f} GiB")
    return max(int(budget // geometry.bytes_per_block), 0), explained
