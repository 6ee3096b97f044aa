"""Mixture of experts in two grouped GEMMs (reference: fused_moe_ref). The (token, expert) pairs
are sorted by expert and each expert's group padded to whole blocks of rows, so that one program
multiplies a block of rows by one expert's weights: the gate/up projection of every pair, the
activation, then the down projection scaled by the routing weight, and each token's top_k rows
summed. The sort is done with fixed-shape torch ops (no host sync), so decode steps can run in
CUDA graphs."""

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from pagedllm_kernels.pdl import pdl, wait_for_previous


@triton.jit(do_not_specialize=["num_pairs"])  # num_pairs varies by step: one compiled kernel for all
def _grouped_gemm_kernel(a_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, weights_ptr, sorted_pairs_ptr,
                         block_experts_ptr, num_pairs, n, k, top_k, stride_a, stride_we, stride_wn, stride_out,
                         ROW_PER_PAIR: tl.constexpr, MUL_WEIGHTS: tl.constexpr, W_SCALED: tl.constexpr,
                         BIAS: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    block = tl.program_id(0)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    if expert < 0:  # a block past the last expert's rows
        return
    pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs  # the rest pads the expert's group to whole blocks
    rows = (pairs if ROW_PER_PAIR else pairs // top_k).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, k, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * stride_a + offs_k[None, :], mask=valid[:, None] & (offs_k[None, :] < k),
                    other=0.0)
        w = tl.load(w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                    mask=(cols[None, :] < n) & (offs_k[:, None] < k), other=0.0)
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)  # FP8 weights widen to a's dtype
    if W_SCALED:  # one scale per expert and output row
        acc *= tl.load(w_scale_ptr + expert * n + cols, mask=cols < n, other=0.0)[None, :]
    if BIAS:  # one per expert and output column (gpt-oss), rounded to the output's dtype as HF adds it
        b = tl.load(bias_ptr + expert * n + cols, mask=cols < n, other=0.0)
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) + b.to(tl.float32)[None, :]
    if MUL_WEIGHTS:
        acc *= tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    tl.store(out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (cols[None, :] < n))


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (flat indices into ``topk_ids``) grouped by expert, each group padded with
    ``num_pairs`` to a multiple of ``block_m``, in a buffer of the largest size any routing
    needs; and each block's expert (-1 past the last group)."""
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (bincount would read its size back from the device)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = flat.argsort(stable=True)
    experts = flat[order]
    rank_in_group = torch.arange(num_pairs, device=flat.device) - (counts.cumsum(0) - counts)[experts]
    num_slots = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_pairs = torch.full((num_slots,), num_pairs, dtype=torch.int64, device=flat.device)
    sorted_pairs[(ends - padded)[experts] + rank_in_group] = order
    block_experts = torch.searchsorted(ends, torch.arange(0, num_slots, block_m, device=flat.device), right=True)
    return sorted_pairs, torch.where(block_experts < num_experts, block_experts, -1)


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
                  out: torch.Tensor, sorted_pairs: torch.Tensor, block_experts: torch.Tensor, top_k: int,
                  block_m: int, row_per_pair: bool, weights: torch.Tensor | None = None) -> None:
    """``out[pair] = a[row] @ (w[expert] * w_scale[expert]).T + bias[expert]`` (times the pair's
    weight), where row is the pair's token, or with ``row_per_pair`` the pair itself."""
    num_pairs, (n, k) = out.shape[0], w.shape[1:]
    block_n, block_k, num_warps, num_stages = _tile(block_m, row_per_pair, a.element_size(), a.device)
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    grid = (len(block_experts), triton.cdiv(n, block_n))
    assert bias is None or bias.is_contiguous()
    _grouped_gemm_kernel[grid](a, w, w_scale if w_scale is not None else out, bias if bias is not None else out, out,
                               weights if weights is not None else out, sorted_pairs, block_experts,
                               num_pairs, n, k, top_k, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
                               ROW_PER_PAIR=row_per_pair, MUL_WEIGHTS=weights is not None,
                               W_SCALED=w_scale is not None, BIAS=bias is not None,
                               # float32 stays float32 (no TF32)
                               PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                               num_stages=num_stages, **pdl(a))


@functools.cache  # (called for each MoE layer of each step: the device's shared memory is asked once)
def _tile(block_m: int, down: bool, element_size: int, device: torch.device) -> tuple[int, int, int, int]:
    """(block_n, block_k, warps, stages) for a block height: the best of 20 tilings each at
    Qwen3-30B-A3B's and Mixtral's layers at 256 and 2,048 tokens on an H200 (``down``: the second
    product, whose N is the hidden size), with as many stages as the GPU's shared memory holds."""
    if block_m >= 128:
        block_n, block_k, num_warps, num_stages = 256, 64, 8, 4
    elif block_m == 64:
        block_n, block_k, num_warps, num_stages = (128, 64, 4, 3) if down else (256, 64, 8, 4)
    elif block_m == 32:
        block_n, block_k, num_warps, num_stages = 128, 128, 4, 3
    else:
        block_n, block_k, num_warps, num_stages = 64, 64, 4, 3
    if device.type == "cuda":  # (an A100 holds 164 KB a block, an L4 100 KB: fewer stages, then narrower tiles)
        room = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        while num_stages > 2 and num_stages * (block_m + block_n) * block_k * element_size > room:
            num_stages -= 1
        while block_n > 64 and num_stages * (block_m + block_n) * block_k * element_size > room:
            block_n //= 2
    return block_n, block_k, num_warps, num_stages


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation_and_mul: Callable[[torch.Tensor], torch.Tensor],
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as ``fused_moe_ref`` (``activation_and_mul`` maps ``[rows, 2I]`` gate|up to
    ``[rows, I]``; biases ``b13``/``b2`` optional), with x ``[tokens, H]`` contiguous in its last
    dimension. FP8 weights come with float32 scales per expert and row (``[E, 2I, 1]``,
    ``[E, H, 1]``): they are read as FP8 (half the bytes, which decode batches are bound by) and
    widened to x's dtype for the products."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    num_pairs = num_tokens * top_k
    # rows per expert on average decide the block height: 16 for decode batches, more for prefill
    per_expert = num_pairs / num_experts
    # (a block twice the rows an expert averages, up to 128, was fastest in the sweep ``_tile`` describes)
    block_m = 16 if per_expert <= 8 else 32 if per_expert <= 16 else 64 if per_expert <= 64 else 128
    sorted_pairs, block_experts = sort_by_expert(topk_ids, num_experts, block_m)
    gate_up = torch.empty(num_pairs, w13.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, w13_scale, b13, gate_up, sorted_pairs, block_experts, top_k, block_m, row_per_pair=False)
    hidden = activation_and_mul(gate_up)
    down = torch.empty(num_pairs, w2.shape[1], dtype=x.dtype, device=x.device)
    _grouped_gemm(hidden, w2, w2_scale, b2, down, sorted_pairs, block_experts, top_k, block_m, row_per_pair=True,
                  weights=topk_weights.flatten())
    return down.view(num_tokens, top_k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)
