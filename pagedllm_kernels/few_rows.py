"""A few rows times a weight matrix, beside its reference (``few_rows_matmul_ref`` in
``reference.py``): the linear layers of a decode step of one to a few streams, where the product
is a read of the weights. cuBLAS and ``torch._scaled_mm`` tile it for many rows and, on a narrow
layer, leave most SMs idle: on an H200 Qwen3-0.6B's 1,024 x 2,048 output projection took 12.6 us
at one row through cuBLAS against 4.1 us here (split-K over 256 programs).

Weights in bf16/fp16 (x in the same dtype) or FP8 with one scale per output row (x in FP8 with one
scale per row). Each program reads ``block_n`` weight rows over ``k / split_k`` columns; split-K's
partial sums are added by the last program of each tile to arrive, in split order (no kernel after
it, and results that do not vary from run to run).

Under dependent launch (``pdl.py``) the weights are the one input the kernel before does not
write: each program asks L2 for its first lines of them before it waits, and lets the next kernel
be scheduled only after its loop, so that a kernel's prefetch overlaps the one-row kernel before it
(a norm, the activation) and the product's epilogue, not another product's reads."""

import torch
import triton
import triton.language as tl

from pagedllm_kernels.paged_attention import num_sms
from pagedllm_kernels.pdl import let_next_start, pdl, wait_for_previous

HOPPER_SMS = 132
MAX_ROWS = 16  # tl.dot's least row tile: up to here one program's rows cover x, and the weights are read once
# Under dependent launch, the weight bytes (over the grid) asked of L2 before the kernel before has
# ended: H200, one stream, 4 MiB took Llama-3-8B's FP8 step 2.95 -> 2.89 ms and Qwen3-0.6B's 1.01 ->
# 0.97; 16 MiB gained nothing and 64 MiB lost 5% (prefetched lines evicted before they are read).
PREFETCH_BYTES = 4 << 20


@triton.jit
def _few_rows_matmul_kernel(x_ptr, x_scale_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr, arrivals_ptr,
                            m, n, k, stride_xm, stride_wn, SCALED: tl.constexpr, BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH_K: tl.constexpr,
                            LINE: tl.constexpr, PDL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    if PDL and PREFETCH_K > 0:  # the weights do not depend on the kernel before: read them into L2 while it ends
        _prefetch_l2(w_ptr, cols, n, k, stride_wn, split * K_PER_SPLIT, PREFETCH_K, LINE)
    wait_for_previous(PDL, LET_NEXT_START=False)  # the next kernel starts after this one's reads (below)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(split * K_PER_SPLIT, tl.minimum(k, (split + 1) * K_PER_SPLIT), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=(rows < m)[:, None] & (ks < k)[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=(cols < n)[:, None] & (ks < k)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    let_next_start(PDL)  # its weight prefetch then meets this kernel's epilogue, not its reads
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    if SPLIT_K > 1:  # each split leaves its partial sum; the last to arrive adds them up, in split order
        tile = rows[:, None] * n + cols[None, :]
        tl.store(partial_ptr + split * m * n + tile, acc, mask=mask)
        counter = arrivals_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(counter, 1) == SPLIT_K - 1:  # (acq_rel: the other splits' stores are seen)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for other in range(SPLIT_K):
                acc += tl.load(partial_ptr + other * m * n + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(counter, 0)  # ready for the next call
        else:
            return
    if SCALED:
        acc = acc * tl.load(scale_ptr + cols, mask=cols < n, other=0.0)[None, :]
        acc = acc * tl.load(x_scale_ptr + rows, mask=rows < m, other=0.0)[:, None]
    if BIAS:  # rounded to the output's dtype first, as a product and then a bias added in torch would be
        acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.load(bias_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prefetch_l2(w_ptr, cols, n, k, stride_wn, k_start, PREFETCH_K: tl.constexpr, LINE: tl.constexpr):
    """Ask L2 for the first ``PREFETCH_K`` columns of this program's weight rows, a 128-byte line
    (``LINE`` elements) an address; nothing waits for them."""
    ks = k_start + tl.arange(0, PREFETCH_K // LINE) * LINE
    inside = (cols < n)[:, None] & (ks < k)[None, :]
    lines = w_ptr + tl.where(inside, cols[:, None].to(tl.int64) * stride_wn + ks[None, :], 0)
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [lines], dtype=tl.int32,
                              is_pure=False, pack=1)


_arrivals: dict[torch.device, torch.Tensor] = {}  # per device: split-K's arrival counters, zero between calls


def _arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Counters that every call leaves at zero, so one set serves every layer (their kernels run one
    after another); made once, before any CUDA graph captures the kernel (the warm-up runs first)."""
    counters = _arrivals.get(device)
    if counters is None or len(counters) < tiles:
        counters = _arrivals[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return counters


def few_rows_config(n: int, k: int, element_size: int, sms: int = HOPPER_SMS) -> dict:
    """Tiles for an ``[n, k]`` weight of ``element_size`` bytes, from sweeps on an H200 at 1-16 rows
    (each product after a one-row kernel, as in a model, under dependent launch). FP8 (Llama-3-8B's
    layers): 64 rows of 128 bytes a step (128 rows where 64-row tiles would be over three an SM),
    split-K while the programs stay within three an SM: each layer within 2% of its best of 192
    tilings. bf16/fp16 (Qwen3-0.6B's, Llama-3-8B's and OPT-1.3B's layers): 64 rows of 256 bytes a
    step (128 rows from 8,192 deep), split-K while the programs still fit the SMs at once: each of
    those layers within 7% of its best tiling."""
    if element_size == 1:
        block_n = 128 if triton.cdiv(n, 64) > 3 * sms else 64
        programs = 3 * sms
    else:
        block_n = 128 if k >= 8192 else 64
        programs = sms
    split_k = 1
    while split_k < 8 and triton.cdiv(n, block_n) * split_k * 2 <= programs:
        split_k *= 2
    return dict(block_n=block_n, block_k=128, split_k=split_k, num_stages=5 if element_size == 1 and split_k > 1 else 4)


def reads_faster(weight: torch.Tensor) -> bool:
    """Whether ``few_rows_matmul`` reads this weight faster than cuBLAS or ``torch._scaled_mm`` at
    1-16 rows, as measured end to end on an H200. An FP8 weight always. A bf16/fp16 one where it is
    narrow, its 64-row tiles fewer than the SMs (cuBLAS leaves SMs idle there: Qwen3-0.6B's 1,024 x
    2,048 projection took 13.0 us against 4.2), and its rows shorter than 4,096: cuBLAS reads a
    larger model's weights at 3-4 TB/s, and Llama-3-8B's one stream was 2.6% slower with its
    attention and MLP output layers here, though each alone was faster."""
    if weight.element_size() == 1:
        return True
    return triton.cdiv(weight.shape[0], 64) < _sms(weight.device) and weight.shape[1] < 4096


def few_rows_matmul(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                    x_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None, *,
                    block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                    num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """``x [m, k] @ weight [n, k].T + bias`` in ``out_dtype`` for m up to ``MAX_ROWS`` (more rows read
    the weights again per 16), x's rows dense; with FP8 operands each times its row scales
    (``x_scale [m, 1]``, ``weight_scale [n, 1]``). Tiles by default ``few_rows_config``'s."""
    m, k = x.shape
    n = weight.shape[0]
    tiles = few_rows_config(n, k, weight.element_size(), _sms(x.device))
    block_n, block_k = block_n or tiles["block_n"], block_k or tiles["block_k"]
    split_k, num_stages = split_k or tiles["split_k"], num_stages or tiles["num_stages"]
    block_m = MAX_ROWS  # a single row pads to it in registers, costing no reads
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m:
        grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
        partial = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
        arrivals = _arrival_counters(x.device, grid[0] * grid[1]) if split_k > 1 else out
        scaled = x_scale is not None
        prefetch_k = _prefetch_columns(grid[0] * grid[2] * block_n * weight.element_size(), k_per_split,
                                       weight.element_size())
        _few_rows_matmul_kernel[grid](x, x_scale if scaled else x, weight, weight_scale if scaled else weight,
                                      out if bias is None else bias, out, partial, arrivals, m, n, k, x.stride(0),
                                      weight.stride(0), SCALED=scaled, BIAS=bias is not None,
                                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k_per_split,
                                      SPLIT_K=split_k, PREFETCH_K=prefetch_k, LINE=128 // weight.element_size(),
                                      num_warps=num_warps, num_stages=num_stages, **pdl(x))
    return out


def _prefetch_columns(bytes_per_column: int, k_per_split: int, element_size: int) -> int:
    """Columns of each program's weight rows to prefetch: a power of two (the lines' arange) of
    whole 128-byte lines, the grid's total within ``PREFETCH_BYTES``; 0 where not even a line fits."""
    line = 128 // element_size
    columns = min(PREFETCH_BYTES // bytes_per_column, k_per_split)
    return 0 if columns < line else 1 << (columns.bit_length() - 1)


def _sms(device: torch.device) -> int:
    """The device's SMs, or an H100's and H200's where tiles are chosen off a GPU (the interpreter)."""
    return num_sms(device) if device.type == "cuda" else HOPPER_SMS
