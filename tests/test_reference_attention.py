"""The torch reference of paged attention equals plain dense attention on the same sequences."""

import math

import pytest
import torch

from pagedllm_kernels import paged_attention_ref, store_kv_cache_ref


def dense_attention(q, k, v, scale, sliding_window=None, softcap=0.0, sinks=None):
    """q ``[q_len, H, D]`` are the last q_len positions of k/v ``[ctx, Hkv, D]``; ``softcap`` as
    Gemma 2's eager attention in HF transformers (scores / cap, tanh, times cap); ``sinks`` ``[H]``
    as gpt-oss's: weights ``exp(score) / (sum of exp(scores) + exp(sink))``."""
    q_len, num_heads, _ = q.shape
    ctx, num_kv_heads, _ = k.shape
    k = k.repeat_interleave(num_heads // num_kv_heads, dim=1).double()
    v = v.repeat_interleave(num_heads // num_kv_heads, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is None:
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    sink = sinks.double()[:, None]
    top = torch.maximum(scores.amax(-1), sink)
    weights = (scores - top[..., None]).exp()
    weights = weights / (weights.sum(-1) + (sink - top).exp())[..., None]
    return torch.einsum("hqk,khd->qhd", weights, v)


def paged_batch(context_lens, query_lens, num_kv_heads, head_dim, block_size, seed=0):
    """Random K/V written into a cache through shuffled, non-contiguous block tables."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(c / block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 5
    order = torch.randperm(num_blocks, generator=g).tolist()
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables, keys, values = [], [], []
    for ctx, nb in zip(context_lens, blocks_per_seq, strict=True):
        table, order = order[:nb], order[nb:]
        tables.append(table + [0] * (max(blocks_per_seq) - nb))
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=g)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=g)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        store_kv_cache_ref(k, v, k_cache, v_cache, slots)
        keys.append(k)
        values.append(v)
    cu = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    return k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), keys, values, cu


@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("softcap", [0.0, 1.5])  # 1.5: below these scores' spread, so the cap changes them
@pytest.mark.parametrize("with_sinks", [False, True])
def test_mixed_prefill_and_decode_batch_equals_dense(gqa, sliding_window, softcap, with_sinks):
    block_size, head_dim, num_kv_heads = 4, 16, 2
    num_heads = num_kv_heads * gqa
    # decodes and prefill chunks over cached prefixes; contexts on and just past block boundaries
    context_lens = [1, 4, 5, 8, 9, 23, 30]
    query_lens = [1, 1, 5, 8, 1, 10, 3]
    k_cache, v_cache, tables, keys, values, cu = paged_batch(context_lens, query_lens, num_kv_heads,
                                                             head_dim, block_size)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1))
    scale = head_dim**-0.5
    # sinks about as large as the scores, so that they take a real share of each softmax
    sinks = torch.randn(num_heads, generator=torch.Generator().manual_seed(2)) * 2 if with_sinks else None
    out = paged_attention_ref(q, k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32), cu,
                              scale, sliding_window, softcap=softcap, sinks=sinks)
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        expected = dense_attention(q[cu[i]:cu[i + 1]], k, v, scale, sliding_window, softcap, sinks)
        torch.testing.assert_close(out[cu[i]:cu[i + 1]].double(), expected, rtol=1e-5, atol=1e-5)


def test_store_kv_cache_skips_slots_marked_minus_one():
    k_cache = torch.zeros(2, 4, 1, 2)
    v_cache = torch.zeros_like(k_cache)
    key = torch.ones(3, 1, 2)
    store_kv_cache_ref(key, 2 * key, k_cache, v_cache, torch.tensor([5, -1, 0]))
    written = k_cache.view(-1, 1, 2)[:, 0, 0]
    assert written.tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    assert v_cache.view(-1, 1, 2)[5, 0, 0] == 2
