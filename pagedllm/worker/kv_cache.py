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


@dataclass(frozen=True)
class KVPools:
    """Which attention layers keep their K/V in which pool. One pool serves every layer; except
    where layers sliding over one window sit beside layers that see everything (Gemma 3): the
    sliding ones then get a pool of their own, whose blocks the engine releases as they slide out
    of the window, so that a long sequence holds only a window's worth of them."""

    layers: list[Attention]  # the main pool's: every layer, or the full-attention ones
    geometry: CacheGeometry
    window_layers: list[Attention]  # the sliding layers with a pool of their own; [] without one
    window_geometry: CacheGeometry | None
    sliding_window: int | None  # of the sliding pool's layers, or of every layer when all slide alike


def kv_pools(model: nn.Module, block_size: int, dtype: torch.dtype) -> KVPools:
    layers = attention_layers(model)
    shapes = {(a.num_kv_heads, a.head_dim) for a in layers}
    if len(shapes) != 1:
        raise ValueError(f"layers with different KV head shapes {shapes} are not supported")
    (num_kv_heads, head_dim), = shapes
    windows = {a.sliding_window for a in layers}
    sliding = [a for a in layers if a.sliding_window is not None]

    def geometry(num_layers: int) -> CacheGeometry:
        return CacheGeometry(num_layers, block_size, num_kv_heads, head_dim, dtype)

    if len(windows) == 2 and None in windows:  # one window beside full attention: a pool for each
        full = [a for a in layers if a.sliding_window is None]
        return KVPools(full, geometry(len(full)), sliding, geometry(len(sliding)), sliding[0].sliding_window)
    # every layer slides over one window (its blocks are released), or none does (or windows differ: kept)
    return KVPools(layers, geometry(len(layers)), [], None, windows.pop() if len(windows) == 1 else None)


def allocate_kv_cache(layers: list[Attention], geometry: CacheGeometry, num_blocks: int,
                      device: torch.device) -> torch.Tensor:
    """One tensor ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``; each of ``layers``
    gets views of its K and V planes."""
    g = geometry
    cache = torch.zeros(g.num_layers, 2, num_blocks, g.block_size, g.num_kv_heads, g.head_dim,
                        dtype=g.dtype, device=device)
    for layer, attn in enumerate(layers):
        attn.k_cache, attn.v_cache = cache[layer, 0], cache[layer, 1]
    return cache


def release_kv_cache(model: nn.Module) -> None:
    for attn in attention_layers(model):
        attn.k_cache = attn.v_cache = torch.empty(0)


def split_between_pools(budget_bytes: float, pools: KVPools, max_useful_blocks: int,
                        max_useful_window_blocks: int) -> tuple[int, int]:
    """Blocks of the main pool and of the sliding layers' pool from one budget: the sliding pool
    gets the most its requests can hold at once, the main pool the rest (up to what it can use);
    a budget too small for that gives both the same count."""
    if pools.window_geometry is None:
        return min(int(budget_bytes // pools.geometry.bytes_per_block), max_useful_blocks), 0
    main, window = pools.geometry.bytes_per_block, pools.window_geometry.bytes_per_block
    even = int(budget_bytes // (main + window))
    if max_useful_window_blocks >= even:
        return even, even
    rest = int((budget_bytes - max_useful_window_blocks * window) // main)
    return min(rest, max_useful_blocks), max_useful_window_blocks


def check_fixed_cache(num_blocks: int, num_window_blocks: int, pools: KVPools, device: torch.device) -> None:
    """A ValueError naming ``num_kv_blocks`` where the cache it fixes could never be allocated: more
    than the GPU has free after the weights, or than the host's memory (it failed as the allocator's
    error, or a size overflow, naming nothing)."""
    need = num_blocks * pools.geometry.bytes_per_block
    if pools.window_geometry is not None:
        need += num_window_blocks * pools.window_geometry.bytes_per_block
    if device.type == "cuda":
        have, what = torch.cuda.mem_get_info(device)[0], "free on the GPU after the weights"
    else:
        have, what = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of host memory"
    if need > have:
        raise ValueError(f"num_kv_blocks={num_blocks} is invalid: its KV cache would take {need / GiB:,.1f} GiB, "
                         f"more than the {have / GiB:,.1f} GiB {what}; leave it None to size the cache by profiling")


def cpu_kv_budget() -> tuple[float, str]:
    """Bytes for the KV cache on the CPU: PAGEDLLM_CPU_KVCACHE_SPACE GiB (default 4)."""
    space = float(os.environ.get(CPU_KV_CACHE_SPACE_ENV, "4")) * GiB
    return space, f"{space / GiB:.2f} GiB of host memory"


def gpu_kv_budget(gpu_memory_utilization: float, weight_bytes: int, activation_peak: int) -> tuple[float, str]:
    """Bytes that fill ``gpu_memory_utilization`` of the device after the weights, the activation
    peak of the profiling run, and memory held outside torch's allocator; and how that was decided."""
    free, total = torch.cuda.mem_get_info()
    outside_torch = max(total - free - torch.cuda.memory_reserved(), 0)
    allowed = total * gpu_memory_utilization
    budget = max(allowed - weight_bytes - activation_peak - outside_torch, 0)
    explained = (f"{total / GiB:.1f} GiB x gpu_memory_utilization {gpu_memory_utilization} = {allowed / GiB:.1f} GiB, "
                 f"less weights {weight_bytes / GiB:.2f} GiB, activation peak {activation_peak / GiB:.2f} GiB, "
                 f"outside torch {outside_torch / GiB:.2f} GiB = {budget / GiB:.2f} GiB")
    return budget, explained
