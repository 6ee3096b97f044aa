"""Triton PagedAttention: K/V read through block tables (reference: paged_attention_ref).

Two kernels share one layout and one online softmax (in base 2):

- decode (every sequence has one new token): a program per (sequence, KV head, split), a
  sequence's heads side by side. The query heads of one KV head are the rows of one ``tl.dot``
  (padded to 16), so each K/V byte is read once for the whole group. Long contexts with few
  sequences are cut into splits (flash-decoding); a reduce kernel merges the splits' partial results.
- prefill (any mix of query lengths: prompt chunks over a cached prefix, and decodes): a
  program per (block of BLOCK_Q query tokens of one sequence, KV head), a block's heads side by
  side; its rows are those tokens times the group's heads. A program finds its sequence by
  binary search over ``cu_seqlens_q``, so the host builds no per-program tables.
"""

import functools

import torch
import triton
import triton.language as tl

from pagedllm_kernels.pdl import pdl, wait_for_previous

_LOG2E = 1.4426950408889634
# Decode split-K settings, best of a sweep on an H100 (Llama-3-8B layout, batch 1-256, context 512-32k).
_MIN_TOKENS_PER_SPLIT = 128
_MAX_SPLITS = 128
_PROGRAMS_PER_SM = 4


@triton.jit
def _token_rows(block_tables_ptr, seq, kv_head, tok, tok_mask, stride_bt, stride_cb, stride_cs, stride_ch,
                BLOCK_SIZE: tl.constexpr, ALL_TOKENS: tl.constexpr = False, PTX_PAGES: tl.constexpr = False):
    """Where each of tokens ``tok`` of sequence ``seq`` keeps its row for ``kv_head`` in the cache
    (in elements): its block from the block table, then its slot there.

    ``PTX_PAGES`` reads the block numbers with a PTX load, which Triton's software pipeliner does
    not see. Seen by it (a ``tl.load``), they take a pipeline stage of their own, since the K/V
    addresses depend on them, and K/V get one buffer whatever ``num_stages`` says: each tile's
    copy is issued after the last tile's compute and waited for at once (compiled for sm_90).
    Unseen, ``num_stages`` 3 gives K/V two buffers (H100: FP8 decode 224 -> 200 us at 32 x 8,448,
    the 8k prefill 1,481 -> 1,376 us)."""
    ptrs = block_tables_ptr + seq * stride_bt + tok // BLOCK_SIZE
    if PTX_PAGES:
        page = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l",
                                         [tl.where(tok_mask, ptrs, block_tables_ptr)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    elif ALL_TOKENS:
        page = tl.load(ptrs)
    else:
        page = tl.load(ptrs, mask=tok_mask, other=0)
    return page.to(tl.int64) * stride_cb + (tok % BLOCK_SIZE) * stride_cs + kv_head * stride_ch


@triton.jit
def _load_kv_tile(cache_ptr, block_tables_ptr, seq, kv_head, tok, tok_mask, d, d_mask,
                  stride_bt, stride_cb, stride_cs, stride_ch, out_ty: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  ALL_TOKENS: tl.constexpr = False, FULL_D: tl.constexpr = False, PTX_PAGES: tl.constexpr = False):
    """``[BLOCK_N, BLOCK_D]`` of K or V for token positions ``tok`` of sequence ``seq``, in
    ``out_ty``. An FP8 cache's values convert exactly, unscaled: the callers apply the layer's
    K scale to the scores and its V scale to the output, one multiply per row, not per element.
    ``ALL_TOKENS`` (every token of the tile exists) and ``FULL_D`` (no padded dims) drop the
    loads' predicates, as the prefill kernel's fully visible tiles allow."""
    rows = _token_rows(block_tables_ptr, seq, kv_head, tok, tok_mask, stride_bt, stride_cb, stride_cs, stride_ch,
                       BLOCK_SIZE, ALL_TOKENS, PTX_PAGES)
    ptrs = cache_ptr + rows[:, None] + d[None, :]
    if ALL_TOKENS and FULL_D:
        x = tl.load(ptrs)
    elif ALL_TOKENS:
        x = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=tok_mask[:, None] & d_mask[None, :], other=0.0)
    return x.to(out_ty)


@triton.jit
def _load_fp8_words(cache_ptr, block_tables_ptr, seq, kv_head, tok, tok_mask, stride_bt, stride_cb, stride_cs,
                    stride_ch, out_ty: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, PTX: tl.constexpr, PTX_PAGES: tl.constexpr):
    """``_load_kv_tile`` for V in the decode kernel's P.V over an FP8 cache, read as 32-bit words
    of four values along d. Loaded as FP8 the tile went into the product's operand layout
    straight from shared memory, and since that product sums over tokens, which lie a row apart,
    each thread read its bytes one load at a time (128 ``LDS.U8`` a tile): widened along d
    first, it goes through shared memory in fp16 and ``ldmatrix.trans``. On NVIDIA GPUs the
    words convert two values an instruction (``cvt.rn.f16x2.e4m3x2``). A quarter of the loop's
    instructions went, and on an H200 its time stayed (214.1 -> 214.7 us at 32 x 8,448, 207-210 at
    8 x 32k, 103.5 against 109.4 at 256 x 512): the kernel is not bound by its instructions."""
    row = _token_rows(block_tables_ptr, seq, kv_head, tok, tok_mask, stride_bt, stride_cb, stride_cs, stride_ch,
                      BLOCK_SIZE, False, PTX_PAGES) // 4
    w = tl.arange(0, BLOCK_D // 4)
    words = tl.load(cache_ptr.to(tl.pointer_type(tl.int32)) + tl.multiple_of(row, 4)[:, None] + w[None, :],  # 16 B rows
                    mask=tok_mask[:, None] & (w < HEAD_DIM // 4)[None, :], other=0)
    if PTX:
        v0, v1, v2, v3 = tl.inline_asm_elementwise(
            """{ .reg .b16 l, h; .reg .b32 a, b;
            mov.b32 {l, h}, $4; cvt.rn.f16x2.e4m3x2 a, l; cvt.rn.f16x2.e4m3x2 b, h;
            mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }""",
            "=h,=h,=h,=h,r", [words], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        v0, v1, v2, v3 = (_e4m3_byte(words, 0), _e4m3_byte(words, 8), _e4m3_byte(words, 16),
                          _e4m3_byte(words, 24))
    v = tl.join(tl.join(v0, v2), tl.join(v1, v3))  # [n, w, a, b] holds value 4w + 2a + b
    return tl.reshape(v, (tok.shape[0], BLOCK_D)).to(out_ty)


@triton.jit
def _e4m3_byte(words, shift: tl.constexpr):
    """The e4m3 byte at ``shift`` of each word, as fp16 (Triton's conversion, for the interpreter)."""
    return ((words >> shift) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def _in_compute_dtype(q, cache_ptr):
    """Queries in the dtype the products run in: theirs, except bf16 over an FP8 cache, which runs
    in fp16: e4m3 widens to fp16 in one instruction per pair (to bf16 it takes four), exactly, and
    queries past fp16's range (none a real model makes) are clamped rather than made infinite."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv and q.dtype == tl.bfloat16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def _scores(qk, scale_log2, softcap_log2, SOFTCAP: tl.constexpr):
    """Scores in base 2 from ``q.k^T``: times the scale, or soft-capped as Gemma 2 caps them,
    ``softcap * tanh(q.k^T * scale / softcap)`` (tanh from one exp2: it saturates to +-1 at the ends)."""
    if SOFTCAP:
        e = tl.exp2(qk * (scale_log2 / softcap_log2) * 2.8853900817779268)  # exp(2x): 2 * log2(e)
        return softcap_log2 * (1.0 - 2.0 / (e + 1.0))
    return qk * scale_log2


@triton.jit
def _softmax_start(sinks_ptr, heads, valid, SINKS: tl.constexpr, ROWS: tl.constexpr):
    """The online softmax's running max and sum before any key: empty, or with attention sinks
    (gpt-oss) the sink's logit as one more key whose value is zero."""
    if SINKS:
        row_max = tl.load(sinks_ptr + heads, mask=valid, other=float("-inf")) * 1.4426950408889634  # base 2
        return row_max, tl.where(valid, 1.0, 0.0)
    return tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32)


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, sinks_ptr,
                   out_ptr, row_max_ptr, row_sum_ptr, scale_log2, softcap_log2, sliding_window, v_scale,
                   stride_qt, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch,
                   stride_ot, stride_oh, stride_os,
                   NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr, PDL: tl.constexpr,
                   FP8_WORDS: tl.constexpr, PTX_PAGES: tl.constexpr):
    wait_for_previous(PDL)
    # a sequence's KV heads are programs side by side, so that its tokens' K/V rows (all heads) are read
    # at once: OPT's 32 heads of 64 on an H100, 256 x 384, 273 -> 262 us (Llama-3-8B's heads: within 1%)
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    seq = tl.program_id(0) // NUM_KV_HEADS
    split = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    start = 0
    if sliding_window > 0:
        start = tl.maximum(context_len - sliding_window, 0)
    per_split = tl.cdiv(tl.cdiv(context_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, context_len)

    g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row_mask = (g < GROUP)[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=row_mask, other=0.0)
    q = _in_compute_dtype(q, k_cache_ptr)

    # a sink is counted once, by the first split (the reduce kernel merges it with the others)
    row_max, row_sum = _softmax_start(sinks_ptr, heads, g < tl.where(split == 0, GROUP, 0), SINKS, GROUP_PAD)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        tok_mask = tok < hi
        k = _load_kv_tile(k_cache_ptr, block_tables_ptr, seq, kv_head, tok, tok_mask, d, d_mask,
                          stride_bt, stride_cb, stride_cs, stride_ch, q.dtype, BLOCK_SIZE, PTX_PAGES=PTX_PAGES)
        s = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), scale_log2, softcap_log2, SOFTCAP)
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        row_max_new = tl.maximum(row_max, tl.max(s, axis=1))  # finite: every tile holds a valid token
        alpha = tl.exp2(row_max - row_max_new)
        p = tl.exp2(s - row_max_new[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        if FP8_WORDS:
            v = _load_fp8_words(v_cache_ptr, block_tables_ptr, seq, kv_head, tok, tok_mask, stride_bt, stride_cb,
                                stride_cs, stride_ch, q.dtype, HEAD_DIM, BLOCK_D, BLOCK_SIZE, FP8_WORDS == 2,
                                PTX_PAGES)
        else:
            v = _load_kv_tile(v_cache_ptr, block_tables_ptr, seq, kv_head, tok, tok_mask, d, d_mask,
                              stride_bt, stride_cb, stride_cs, stride_ch, q.dtype, BLOCK_SIZE, PTX_PAGES=PTX_PAGES)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = row_max_new

    out = acc * (v_scale / tl.where(row_sum > 0, row_sum, 1.0))[:, None]
    o_ptrs = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask)
    if NUM_SPLITS > 1:
        stats = (seq * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split
        tl.store(row_max_ptr + stats, row_max, mask=g < GROUP)
        tl.store(row_sum_ptr + stats, row_sum, mask=g < GROUP)


@triton.jit
def _reduce_splits_kernel(partial_ptr, row_max_ptr, row_sum_ptr, out_ptr, stride_ot, stride_oh,
                          NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    s = tl.arange(0, NUM_SPLITS)
    row_max = tl.load(row_max_ptr + row * NUM_SPLITS + s)
    weights = tl.exp2(row_max - tl.max(row_max, axis=0)) * tl.load(row_sum_ptr + row * NUM_SPLITS + s)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    partial = tl.load(partial_ptr + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + d[None, :],
                      mask=d_mask[None, :], other=0.0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _prefill_tile(acc, row_max, row_sum, q, q_pos, n0, k_hi, sliding_window, k_cache_ptr, v_cache_ptr,
                  block_tables_ptr, seq, kv_head, d, d_mask, scale_log2, softcap_log2,
                  stride_bt, stride_cb, stride_cs, stride_ch,
                  BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
                  FULL_D: tl.constexpr, SOFTCAP: tl.constexpr, PTX_PAGES: tl.constexpr):
    """One K/V tile of online softmax. Unmasked tiles lie wholly at or before every row's position."""
    tok = n0 + tl.arange(0, BLOCK_N)
    tok_mask = tok < k_hi
    k = _load_kv_tile(k_cache_ptr, block_tables_ptr, seq, kv_head, tok, tok_mask, d, d_mask,
                      stride_bt, stride_cb, stride_cs, stride_ch, q.dtype, BLOCK_SIZE, not MASKED, FULL_D, PTX_PAGES)
    s = _scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), scale_log2, softcap_log2, SOFTCAP)
    if MASKED:
        allowed = tok_mask[None, :] & (tok[None, :] <= q_pos[:, None])
        if sliding_window > 0:
            allowed = allowed & (tok[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
    row_max_new = tl.maximum(row_max, tl.max(s, axis=1))
    row_max_safe = tl.where(row_max_new == float("-inf"), 0.0, row_max_new)  # rows with nothing visible yet
    alpha = tl.exp2(row_max - row_max_safe)
    p = tl.exp2(s - row_max_safe[:, None])
    row_sum = row_sum * alpha + tl.sum(p, axis=1)
    v = _load_kv_tile(v_cache_ptr, block_tables_ptr, seq, kv_head, tok, tok_mask, d, d_mask,
                      stride_bt, stride_cb, stride_cs, stride_ch, q.dtype, BLOCK_SIZE, not MASKED, FULL_D, PTX_PAGES)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, row_max_new, row_sum


@triton.jit(do_not_specialize=["num_seqs"])  # num_seqs varies by step: one compiled kernel for all
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, sinks_ptr,
                    out_ptr, scale_log2, softcap_log2, sliding_window, v_scale, num_seqs,
                    stride_qt, stride_qh, stride_bt, stride_cb, stride_cs, stride_ch, stride_ot, stride_oh,
                    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
                    PDL: tl.constexpr, PTX_PAGES: tl.constexpr):
    wait_for_previous(PDL)
    # Last blocks first: a sequence's later query blocks see more keys, and starting the longest
    # programs first leaves the short ones to fill the last wave (4-7% at 2k-4k tokens on an H200).
    # A block's KV heads side by side: neighbouring programs read the same tokens' rows of K/V, which
    # hold every head (H100, Llama-3-8B's heads: one 2k prompt 135 -> 115 us, 255 decodes beside a
    # 256-token prompt 176 -> 167; one 8k prompt 1,355-1,372 -> 1,381. W1's prefill steps, with OPT's
    # fc1 ReLU fused: 0.72-0.73 -> 0.65-0.68 s).
    q_block = tl.num_programs(0) // NUM_KV_HEADS - 1 - tl.program_id(0) // NUM_KV_HEADS
    kv_head = tl.program_id(0) % NUM_KV_HEADS
    # Sequence i owns program ids [cu[i] // BLOCK_Q + i, cu[i + 1] // BLOCK_Q + i + 1): enough for its blocks.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first_q = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_q >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_idx = first_q + rows // GROUP_PAD
    g = rows % GROUP_PAD
    heads = kv_head * GROUP + g
    row_valid = (q_idx < q_len) & (g < GROUP)
    q_pos = prefix_len + q_idx
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    io_mask = row_valid[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + (q_start + q_idx)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=io_mask, other=0.0)
    q = _in_compute_dtype(q, k_cache_ptr)

    row_max, row_sum = _softmax_start(sinks_ptr, heads, g < GROUP, SINKS, BLOCK_Q * GROUP_PAD)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], tl.float32)
    k_hi = prefix_len + tl.minimum(q_len, first_q + BLOCK_Q)
    masked_from = 0
    if sliding_window > 0:
        masked_from = tl.maximum(prefix_len + first_q - sliding_window + 1, 0)
    else:  # tiles ending at or before the block's first position are visible to every row
        masked_from = (prefix_len + first_q + 1) // BLOCK_N * BLOCK_N
        for n0 in range(0, masked_from, BLOCK_N):
            acc, row_max, row_sum = _prefill_tile(
                acc, row_max, row_sum, q, q_pos, n0, k_hi, sliding_window, k_cache_ptr, v_cache_ptr,
                block_tables_ptr, seq, kv_head, d, d_mask, scale_log2, softcap_log2,
                stride_bt, stride_cb, stride_cs, stride_ch,
                BLOCK_SIZE, BLOCK_N, PRECISION, False, HEAD_DIM == BLOCK_D, SOFTCAP, PTX_PAGES)
    for n0 in range(masked_from, k_hi, BLOCK_N):
        acc, row_max, row_sum = _prefill_tile(
            acc, row_max, row_sum, q, q_pos, n0, k_hi, sliding_window, k_cache_ptr, v_cache_ptr,
            block_tables_ptr, seq, kv_head, d, d_mask, scale_log2, softcap_log2,
            stride_bt, stride_cb, stride_cs, stride_ch,
            BLOCK_SIZE, BLOCK_N, PRECISION, True, HEAD_DIM == BLOCK_D, SOFTCAP, PTX_PAGES)

    out = acc * (v_scale / tl.where(row_sum > 0, row_sum, 1.0))[:, None]
    tl.store(out_ptr + (q_start + q_idx)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=io_mask)


def prefill_config(head_dim: int, group_pad: int, num_tokens: int, num_seqs: int, max_context_len: int,
                   double_buffer: bool = False) -> dict:
    """Launch settings of the prefill kernel: rows (query tokens x group heads), key tile, warps.
    128-row tiles pay where sequences are long; 64-row tiles where they are short, and in steps of
    many decode rows beside a chunk, where each sequence takes a block of rows of its own. H200 sweep
    (Llama-3-8B / Qwen3-0.6B / OPT-1.3B heads, bf16, blocks of 16 in shuffled order): 255 decodes + a 256-token
    prompt 354/351/939 -> 210/206/426 us, 32 x 256 176/93/133 -> 138/74/80; 512 over 7,680 cached
    tokens 217/203/143 -> 232/222/178 (so long contexts keep 128 rows).
    ``double_buffer`` (an NVIDIA GPU with the shared memory for two K/V buffers of 128-row tiles:
    ``_fits_double_buffer``): long tiles read their block numbers in PTX at 3 stages (``_token_rows``).
    H100, Llama-3-8B's heads, one prompt: bf16 2k/4k/8k 140/401/1,481 -> 135/375/1,376 us, 2k over
    8k cached 673 -> 628; FP8 cache 150/455/1,706 -> 143/419/1,555 (short tiles did not gain: 1k
    bf16 45.7 -> 46.8)."""
    if head_dim > 128:
        return dict(BLOCK_Q=max(1, 64 // group_pad), BLOCK_N=32, num_warps=4, num_stages=2, PTX_PAGES=False)
    short = max_context_len <= 1024 or (num_tokens <= 64 * num_seqs and max_context_len <= 4096)
    rows = 64 if short else 128
    double = double_buffer and not short
    return dict(BLOCK_Q=max(1, rows // group_pad), BLOCK_N=rows, num_warps=4 if short else 8,
                num_stages=3 if double else 2, PTX_PAGES=double)


def decode_config(head_dim: int, fp8_cache: bool = False, nvidia: bool = False) -> dict:
    """Launch settings of the decode kernel. An FP8 cache: tiles of 64 tokens double-buffered
    behind block numbers read in PTX (``_token_rows``; on an NVIDIA GPU), best of 2-4 stages and
    tiles of 64/128 on an H100 at batch 8-256 and contexts 512-32k, against tiles of 128 read with
    ``tl.load``: 32 x 8,448 224 -> 200 us, 16 x 8,192 115 -> 103, 64 x 2,048 115 -> 105, 256 x 512
    123 -> 120, 8 x 32,768 217 -> 192 (a second H100, the two interleaved in one process: 232 -> 236,
    118 -> 111, 116 -> 109, 112 -> 108, 224 -> 201; W4 in the engine, one process: decode 6.79 -> 6.40
    s). Tiles of 32, or 2 or 8 warps, were slower. A bf16 cache did not gain (362 -> 367 us at 32 x
    8,448: it reads at 3.0 TB/s already). Head_dim 64, OPT's MHA on an H200: 16 x 8k 329 -> 248 us, 64 x 2k
    262 -> 250, 256 x 384 202 -> 198 with tiles of 128."""
    if fp8_cache and head_dim <= 128:
        return dict(BLOCK_N=64, num_warps=4, num_stages=3, PTX_PAGES=nvidia)
    if head_dim <= 64:
        return dict(BLOCK_N=128, num_warps=4, num_stages=3, PTX_PAGES=False)
    return dict(BLOCK_N=64 if head_dim <= 128 else 32, num_warps=4, num_stages=4 if head_dim <= 128 else 2,
                PTX_PAGES=False)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    scale: float, sliding_window: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0, *,
                    max_query_len: int, max_context_len: int, num_splits: int | None = None,
                    softcap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``paged_attention_ref`` (``sinks`` in float32); ``max_query_len``/
    ``max_context_len`` are host ints (no device sync). ``num_splits`` forces the decode split
    count (tests)."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    common = dict(NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim,
                  BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
                  PRECISION="ieee" if query.dtype == torch.float32 else "tf32", SOFTCAP=softcap > 0,
                  SINKS=sinks is not None)
    assert sinks is None or (sinks.dtype == torch.float32 and sinks.shape == (num_heads,))
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1 and query.stride(2) == 1
    window = sliding_window or 0
    scale_log2 = scale * k_scale * _LOG2E  # scores in base 2, from the FP8 cache's unscaled K
    softcap_log2 = softcap * _LOG2E
    num_seqs = block_tables.shape[0]
    nvidia = query.is_cuda and torch.version.hip is None

    if max_query_len > 1:
        config = prefill_config(head_dim, common["GROUP_PAD"], num_tokens, num_seqs, max_context_len,
                                nvidia and _fits_double_buffer(k_cache))
        grid = ((num_tokens // config["BLOCK_Q"] + num_seqs) * num_kv_heads,)
        _prefill_kernel[grid](
            query, k_cache, v_cache, block_tables, context_lens, cu_seqlens_q, sinks, out, scale_log2, softcap_log2,
            window,
            v_scale, num_seqs,
            query.stride(0), query.stride(1), block_tables.stride(0), *cache_strides, out.stride(0), out.stride(1),
            **config, **common, **pdl(query),
        )
        return out

    if num_splits is None:
        num_splits = _decode_splits(num_seqs * num_kv_heads, max_context_len, query.device)
    assert num_splits & (num_splits - 1) == 0, "num_splits must be a power of two"
    if num_splits == 1:
        partial, row_max, row_sum = out, out, out  # row_max/row_sum unused with one split
        strides = (out.stride(0), out.stride(1), 0)
    else:
        partial = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        row_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        row_sum = torch.empty_like(row_max)
        strides = (partial.stride(0), partial.stride(1), partial.stride(2))
    common["GROUP_PAD"] = max(16, common["GROUP_PAD"])  # tl.dot needs 16 rows at least
    _decode_kernel[(num_seqs * num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, context_lens, sinks, partial, row_max, row_sum, scale_log2,
        softcap_log2, window, v_scale,
        query.stride(0), query.stride(1), block_tables.stride(0), *cache_strides, *strides,
        NUM_SPLITS=num_splits,
        **decode_config(head_dim, k_cache.element_size() == 1, nvidia), **common, **pdl(query),
        FP8_WORDS=_fp8_words(k_cache, nvidia),
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            partial, row_max, row_sum, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, HEAD_DIM=head_dim, BLOCK_D=common["BLOCK_D"], **pdl(query),
        )
    return out


def _fp8_words(k_cache: torch.Tensor, nvidia: bool) -> int:
    """How the decode kernel reads an FP8 cache's V (``_load_fp8_words``): 0 as bytes (no FP8
    cache, or a head_dim that is not a multiple of 16: its rows would not start on the 16 bytes
    the words' vector loads assume), 1 as words converted by Triton (the interpreter), 2 as words
    converted in PTX (NVIDIA GPUs; FP8 runs only on those of compute capability 8.9 and up, which
    have ``cvt.rn.f16x2.e4m3x2``: ``EngineConfig.check_fp8_device``)."""
    if k_cache.dtype != torch.float8_e4m3fn or k_cache.shape[-1] % 16:
        return 0
    return 2 if nvidia else 1


def _fits_double_buffer(k_cache: torch.Tensor) -> bool:
    """Whether the prefill kernel's 128-row tiles fit twice in a block's shared memory, K and V:
    at 3 stages they took 229,376 bytes with 128 bf16 dims (compiled for sm_90; an H100 or H200
    has 232,448, an A100 166,912, an L4 101,376). A float32 cache (tests) does not."""
    return k_cache.element_size() <= 2 and _shared_memory(k_cache.device) >= 229_376


def _decode_splits(num_programs: int, max_context_len: int, device: torch.device) -> int:
    """Splits per sequence so that programs fill the GPU _PROGRAMS_PER_SM times over, each with at
    least _MIN_TOKENS_PER_SPLIT tokens; a power of two, so few kernel variants get compiled."""
    if device.type != "cuda":
        return 1
    wanted = min(triton.cdiv(_PROGRAMS_PER_SM * num_sms(device), num_programs),
                 triton.cdiv(max_context_len, _MIN_TOKENS_PER_SPLIT), _MAX_SPLITS)
    return triton.next_power_of_2(wanted) if wanted > 1 else 1


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one where ``device`` names no index)."""
    return _properties(device).multi_processor_count


def _shared_memory(device: torch.device) -> int:
    """Shared memory a block of a CUDA device may have (bytes)."""
    return _properties(device).shared_memory_per_block_optin


def _properties(device: torch.device):
    return _properties_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache  # (asked at every attention call)
def _properties_of(device_index: int):
    return torch.cuda.get_device_properties(device_index)
