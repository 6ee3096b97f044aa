"""Every Triton kernel equals its torch reference (on CPU under TRITON_INTERPRET=1, at small shapes;
on a GPU for real, with real head layouts)."""

import functools
import math

import pytest
import torch
import triton
import triton.language as tl
from test_reference_attention import paged_batch

from pagedllm_kernels import paged_attention_ref, store_kv_cache_ref
from pagedllm_kernels.cache_ops import fp8_quotient, store_kv_cache
from pagedllm_kernels.paged_attention import _load_fp8_words, paged_attention, prefill_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 tl.dot is wrong (it multiplies raw bits): bf16 is tested on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def run_both(context_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
             sliding_window=None, num_splits=None, seed=0, softcap=0.0, sinks=None):
    k_cache, v_cache, tables, _, _, cu = paged_batch(context_lens, query_lens, num_kv_heads, head_dim,
                                                     block_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=g)
    args = [t.to(DEVICE) for t in (query.to(dtype), k_cache.to(dtype), v_cache.to(dtype), tables,
                                   torch.tensor(context_lens, dtype=torch.int32), cu)]
    scale = head_dim**-0.5
    sinks = sinks.to(DEVICE) if sinks is not None else None
    expected = paged_attention_ref(*[a.float() if a.is_floating_point() else a for a in args], scale,
                                   sliding_window, softcap=softcap, sinks=sinks)
    out = paged_attention(*args, scale, sliding_window, max_query_len=max(query_lens),
                          max_context_len=max(context_lens), num_splits=num_splits, softcap=softcap, sinks=sinks)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
def test_decode_matches_reference_across_block_boundaries(gqa, dtype):
    block_size = 16
    context_lens = [1, 15, 16, 17, 32, 33, 70]  # on and just past block boundaries
    run_both(context_lens, [1] * len(context_lens), 2 * gqa, 2, 32, block_size, dtype)


@pytest.mark.parametrize("num_splits", [2, 4])
@pytest.mark.parametrize("sliding_window", [None, 40])
def test_split_decode_merges_like_one_pass(num_splits, sliding_window):
    context_lens = [3, 64, 130, 200]
    run_both(context_lens, [1] * 4, 8, 2, 64, 16, torch.float32, sliding_window, num_splits)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_decode_head_dims(head_dim):
    run_both([20, 45, 300], [1, 1, 1], 4, 2, head_dim, 16, torch.float16, num_splits=1)  # 300: three 128-token tiles


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
def test_prefill_over_paged_prefix_matches_reference(gqa, block_size):
    # mixed batch: decodes, prefill chunks over cached prefixes, fresh prompts; the last two reach
    # past the first key tile, so the prefill kernel's fully visible (unpredicated) tiles run too
    context_lens = [1, 40, 17, 33, 90, 64, 300, 260]
    query_lens = [1, 40, 1, 9, 25, 16, 150, 260]
    run_both(context_lens, query_lens, 2 * gqa, 2, 32, block_size, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliding_window", [None, 10])
def test_prefill_dtypes_and_sliding_window(dtype, sliding_window):
    run_both([37, 80, 5], [37, 30, 5], 4, 4, 64, 16, dtype, sliding_window)


@pytest.mark.parametrize("sliding_window", [None, 40])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_soft_capped_scores_in_decode_and_prefill(sliding_window, num_splits):
    """Gemma 2's attn_logit_softcapping: each score capped before the softmax, in both kernels (a
    cap of 1.5 is below these scores' spread, so an uncapped kernel fails)."""
    context_lens = [3, 64, 130, 200]
    run_both(context_lens, [1] * 4, 8, 2, 32, 16, torch.float16, sliding_window, num_splits, softcap=1.5)
    run_both(context_lens, [3, 20, 130, 1], 8, 2, 32, 16, torch.float16, sliding_window, softcap=1.5)


@pytest.mark.parametrize("sliding_window", [None, 40])
@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_attention_sinks_in_decode_and_prefill(sliding_window, num_splits):
    """gpt-oss's attention sinks: one more logit per head in each softmax, counted once across a
    decode's splits (contexts of 3 leave later splits empty). Sinks from far below the scores to
    far above them (where a query attends to almost nothing), so a kernel that drops them fails."""
    sinks = torch.tensor([-30.0, -1.0, 0.0, 0.5, 1.5, 3.0, 8.0, 60.0])
    context_lens = [3, 64, 130, 200]
    run_both(context_lens, [1] * 4, 8, 2, 32, 16, torch.float16, sliding_window, num_splits, sinks=sinks)
    if num_splits == 1:
        run_both(context_lens, [3, 20, 130, 1], 8, 2, 32, 16, torch.float16, sliding_window, sinks=sinks)
        run_both([30, 9], [12, 9], 6, 2, 64, 16, torch.float32, sliding_window, sinks=sinks[:6])  # group of 3


def test_prefill_non_power_of_two_group():  # Qwen2.5-0.5B: 14 query heads on 2 KV heads
    run_both([30, 9], [12, 9], 14, 2, 64, 16, torch.float16)


def test_prefill_tile_settings_both_match_reference():
    # 128-row tiles past 1,024 tokens of context; 64-row tiles there too where decode rows dominate
    assert prefill_config(32, 2, 100, 1, 1100)["BLOCK_N"] == 128
    assert prefill_config(32, 2, 100, 2, 1100)["BLOCK_N"] == 64
    # long tiles double-buffered (3 stages, block numbers read in PTX) only where the GPU has the room
    assert [prefill_config(128, 4, 8192, 1, 8192, room)["num_stages"] for room in (False, True)] == [2, 3]
    assert [prefill_config(128, 4, 8192, 1, 8192, room)["PTX_PAGES"] for room in (False, True)] == [False, True]
    assert prefill_config(128, 4, 512, 1, 512, True)["PTX_PAGES"] is False  # short tiles did not gain
    assert prefill_config(256, 4, 8192, 1, 8192, True)["PTX_PAGES"] is False
    run_both([1100], [100], 4, 2, 32, 16, torch.float16)
    run_both([1100, 1100], [99, 1], 4, 2, 32, 16, torch.float16)


def test_store_kv_cache_matches_reference_and_skips_minus_one():
    num_kv_heads, head_dim = 2, 32
    fused = torch.randn(6, 3 * num_kv_heads * head_dim)  # strided rows, as a q/k/v split gives
    key = fused[:, : num_kv_heads * head_dim].view(6, num_kv_heads, head_dim)
    value = fused[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(6, num_kv_heads, head_dim)
    slots = torch.tensor([5, -1, 0, 17, 9, -1])
    caches = [torch.full((4, 8, num_kv_heads, head_dim), 7.0) for _ in range(4)]
    store_kv_cache_ref(key, value, caches[0], caches[1], slots)
    key, value, slots = key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE)
    k_dev, v_dev = caches[2].to(DEVICE), caches[3].to(DEVICE)
    store_kv_cache(key, value, k_dev, v_dev, slots)
    assert torch.equal(k_dev.cpu(), caches[0]) and torch.equal(v_dev.cpu(), caches[1])


@pytest.mark.skipif(DEVICE != "cuda", reason="real shapes need a GPU")
@pytest.mark.parametrize("layout", [(32, 8, 128), (32, 32, 64), (16, 8, 128)],
                         ids=["llama-3-8b", "opt-1.3b", "qwen3-0.6b"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_shapes_on_gpu(layout, dtype):
    num_heads, num_kv_heads, head_dim = layout
    g = torch.Generator().manual_seed(0)
    context_lens = torch.randint(1, 3000, (24,), generator=g).tolist()
    run_both(context_lens, [1] * 24, num_heads, num_kv_heads, head_dim, 16, dtype)
    run_both([4096, 700], [1, 1], num_heads, num_kv_heads, head_dim, 16, dtype)  # split-K path
    query_lens = [min(c, math.ceil(c / 3)) for c in context_lens[:8]]
    run_both(context_lens[:8], query_lens, num_heads, num_kv_heads, head_dim, 16, dtype)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_shapes_over_an_fp8_cache_on_gpu(dtype):
    """Llama-3-8B's heads over an e4m3 cache: decode batches, split or not, and a 2k chunk over a 4k
    prefix (the prefill kernel's double-buffered long tiles, block numbers read in PTX) equal
    attention over the dequantized cache."""
    g = torch.Generator().manual_seed(1)
    for context_lens, query_lens in ((torch.randint(1, 3000, (24,), generator=g).tolist(), [1] * 24),
                                     ([4096, 700], [1, 1]), ([6144, 1500], [2048, 300])):
        k_cache, v_cache, tables, _, _, cu = paged_batch(context_lens, query_lens, 8, 128, 16, 2)
        k8, v8 = (k_cache / 0.05).to(torch.float8_e4m3fn), (v_cache / 0.02).to(torch.float8_e4m3fn)
        query = torch.randn(sum(query_lens), 32, 128, generator=g)
        lens = torch.tensor(context_lens, dtype=torch.int32)
        expected = paged_attention_ref(query, k8.float() * 0.05, v8.float() * 0.02, tables, lens, cu, 128**-0.5)
        out = paged_attention(*(t.to(DEVICE) for t in (query.to(dtype), k8, v8, tables, lens, cu)), 128**-0.5, None,
                              0.05, 0.02, max_query_len=max(query_lens), max_context_len=max(context_lens))
        torch.testing.assert_close(out.cpu().float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("head_dim", [80, 96, 256])
def test_prefill_head_dims(head_dim):  # 300: fully visible key tiles with padded dims
    run_both([24, 50, 300], [24, 20, 20], 4, 2, head_dim, 16, torch.float16)


def test_decode_block_size_32():
    run_both([1, 31, 32, 33, 100], [1] * 5, 8, 2, 64, 32, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("width", [64, 96])
@pytest.mark.parametrize("scale_in_float32", [False, True])  # Llama's rounding, Gemma's (a float32 weight)
def test_rms_norm_matches_reference(dtype, with_residual, width, scale_in_float32):
    from pagedllm_kernels.elementwise import rms_norm
    from pagedllm_kernels.reference import rms_norm_ref

    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(5, width, generator=g).to(dtype) for _ in range(2))
    weight = torch.randn(width, generator=g).to(torch.float32 if scale_in_float32 else dtype)
    res = residual if with_residual else None
    expected = rms_norm_ref(x, weight, 1e-5, res, scale_in_float32)
    got = rms_norm(x.to(DEVICE), weight.to(DEVICE), 1e-5, res.to(DEVICE) if with_residual else None,
                   scale_in_float32)
    for e, o in zip(expected if with_residual else [expected], got if with_residual else [got], strict=True):
        torch.testing.assert_close(o.cpu().float(), e.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8_cache", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_writes_the_kv_cache_as_store_kv_cache_does(dtype, fp8_cache, qk_norm):
    """rotary given a KVWrite: q and k as without it, and the caches bit for bit as store_kv_cache
    writes the rotated K and V (into an FP8 cache divided by the scales), padding slots untouched."""
    from pagedllm_kernels.cache_ops import KVWrite
    from pagedllm_kernels.elementwise import rotary

    num_q, num_k, head_dim, g = 4, 2, 32, torch.Generator().manual_seed(1)
    qkv = (3 * torch.randn(6, (num_q + 2 * num_k) * head_dim, generator=g)).to(dtype).to(DEVICE)
    freqs = torch.randn(50, head_dim // 2, generator=g)
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)
    positions = torch.tensor([0, 7, 3, 49, 12, 1], device=DEVICE)
    slots = torch.tensor([5, -1, 0, 17, 9, -1], device=DEVICE)
    weights = [torch.randn(head_dim, generator=g).to(dtype).to(DEVICE) for _ in "qk"] if qk_norm else None
    scales = (0.05, 0.02) if fp8_cache else (1.0, 1.0)
    cache_dtype = torch.float8_e4m3fn if fp8_cache else dtype
    caches = [torch.full((4, 8, num_k, head_dim), 7.0).to(cache_dtype).to(DEVICE) for _ in range(4)]

    def split(t):
        q, k, v = t.split([num_q * head_dim, num_k * head_dim, num_k * head_dim], dim=-1)
        return q.view(6, num_q, head_dim), k.view(6, num_k, head_dim), v.view(6, num_k, head_dim)

    apart, fused = qkv.clone(), qkv.clone()
    q, k, v = split(apart)
    rotary(positions, q, k, cos, sin, weights, 1e-6)
    store_kv_cache(k, v, caches[0], caches[1], slots, *scales)
    q, k, v = split(fused)
    rotary(positions, q, k, cos, sin, weights, 1e-6, kv_write=KVWrite(v, caches[2], caches[3], slots, *scales))
    assert torch.equal(apart, fused)
    for expected, got in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(expected.float().cpu(), got.float().cpu())
    assert (caches[2].float().view(-1, num_k * head_dim) != 7.0).sum(dim=1).gt(0).sum() == 4  # the 4 real slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("qk_norm", [None, "rms", "gemma"])  # fused with QK-norm: as the norms then rotary
def test_rotary_matches_reference_in_place_on_strided_views(dtype, heads, qk_norm):
    from pagedllm_kernels.elementwise import rotary
    from pagedllm_kernels.reference import rms_norm_ref, rotary_ref

    num_q, num_k = heads
    head_dim, g = 32 if qk_norm != "gemma" else 40, torch.Generator().manual_seed(0)
    qkv = 3 * torch.randn(6, (num_q + 2 * num_k) * head_dim, generator=g).to(dtype)
    q = qkv[:, : num_q * head_dim].view(6, num_q, head_dim)
    k = qkv[:, num_q * head_dim : (num_q + num_k) * head_dim].view(6, num_k, head_dim)
    freqs = torch.randn(50, head_dim // 2, generator=g)
    cos, sin = freqs.cos(), freqs.sin()
    positions = torch.tensor([0, 7, 3, 49, 12, 1])
    weights, float32_scale, eps = None, qk_norm == "gemma", 1e-6
    if qk_norm:
        weights = [torch.randn(head_dim, generator=g).to(torch.float32 if float32_scale else dtype) for _ in "qk"]
        expected_q, expected_k = rotary_ref(positions, rms_norm_ref(q, weights[0], eps, None, float32_scale),
                                            rms_norm_ref(k, weights[1], eps, None, float32_scale), cos, sin)
    else:
        expected_q, expected_k = rotary_ref(positions, q, k, cos, sin)
    qkv_dev = qkv.to(DEVICE)
    q_dev = qkv_dev[:, : num_q * head_dim].view(6, num_q, head_dim)
    k_dev = qkv_dev[:, num_q * head_dim : (num_q + num_k) * head_dim].view(6, num_k, head_dim)
    rotary(positions.to(DEVICE), q_dev, k_dev, cos.to(DEVICE), sin.to(DEVICE),
           [w.to(DEVICE) for w in weights] if weights else None, eps, float32_scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(q_dev.cpu().float(), expected_q.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(k_dev.cpu().float(), expected_k.float(), rtol=tol, atol=tol)
    assert torch.equal(qkv_dev[:, (num_q + num_k) * head_dim :].cpu(), qkv[:, (num_q + num_k) * head_dim :])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    from pagedllm_kernels.elementwise import silu_and_mul
    from pagedllm_kernels.reference import silu_and_mul_ref

    gate_up = torch.randn(4, 2 * 1500, generator=torch.Generator().manual_seed(0)).to(dtype)
    torch.testing.assert_close(silu_and_mul(gate_up.to(DEVICE)).cpu().float(), silu_and_mul_ref(gate_up).float(),
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_clamped_swiglu_matches_reference(dtype):
    """gpt-oss's activation: values from -12 to 12 about its limit of 7, so every clamp is crossed."""
    from pagedllm_kernels.elementwise import clamped_swiglu
    from pagedllm_kernels.reference import clamped_swiglu_ref

    gate_up = (torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(0)) * 6).clamp(-12, 12).to(dtype)
    expected = clamped_swiglu_ref(gate_up.float(), 1.702, 7.0)
    torch.testing.assert_close(clamped_swiglu(gate_up.to(DEVICE), 1.702, 7.0).cpu().float(), expected,
                               rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 8)  # |out| up to 8 x 7
    assert not torch.allclose(expected, clamped_swiglu_ref(gate_up.float(), 1.702, 100.0), atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("vocab", [7, 1024, 2500])  # shorter than, equal to and beyond one block of 1024
# 3 and 4: rows shared by programs, some with no logits (vocab 7), the merge masking its lanes past the splits
@pytest.mark.parametrize("num_splits", [None, 3, 4])
def test_token_logprobs_match_log_softmax(dtype, vocab, num_splits):
    from pagedllm_kernels.reference import token_logprobs_ref
    from pagedllm_kernels.sampling_ops import token_logprobs

    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(5, vocab, generator=g) * 8).to(dtype)
    logits[1, : vocab // 2] = float("-inf")  # masked tokens count for nothing
    tokens = torch.tensor([0, vocab - 1, vocab // 2, 3 % vocab, 1])
    got = token_logprobs(logits.to(DEVICE), tokens.to(DEVICE), num_splits).cpu()
    expected = token_logprobs_ref(logits, tokens)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("vocab", [7, 2500])
@pytest.mark.parametrize("num_splits", [None, 3, 4])
def test_greedy_sample_matches_argmax_and_log_softmax(dtype, vocab, num_splits):
    from pagedllm_kernels.reference import greedy_sample_ref
    from pagedllm_kernels.sampling_ops import greedy_sample

    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(6, vocab, generator=g) * 8).to(dtype)
    logits[1, : vocab // 2] = float("-inf")
    logits[2, [vocab - 1, vocab // 3, 2]] = 100.0  # tied maxima: the first one wins, as torch's argmax
    logits[3, [vocab - 1, vocab // 2]] = 100.0  # tied across splits (vocab 2500, 4 splits)
    logits[4, vocab - 1] = 100.0  # the last token, in the last block
    logits[5, [min(1124, vocab - 1), 100 % vocab]] = 100.0  # tied in one lane of the 1,024-wide blocks
    got_ids, got = greedy_sample(logits.to(DEVICE), num_splits)
    want_ids, want = greedy_sample_ref(logits)
    assert got_ids.dtype == torch.int64 and got_ids.tolist() == want_ids.tolist()
    assert want_ids[2:].tolist() == [2, vocab // 2, vocab - 1, 100 % vocab]
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-5)


def test_seeded_exponential_matches_its_reference():
    """Seeded rows' noise: the kernel's Philox (Triton's tl.randint) equals the torch one, for
    negative and 64-bit seeds and a vocabulary past one block; rows without a seed keep theirs."""
    from pagedllm_kernels.reference import seeded_exponential_ref
    from pagedllm_kernels.sampling_ops import seeded_exponential_

    noise = torch.full((6, 2500), -1.0)
    rows, seeds = torch.tensor([4, 0, 2]), torch.tensor([-3, 123_456_789_012_345, 2**63 - 1])
    positions = torch.tensor([0, 7, 100_000])
    got = seeded_exponential_(noise.to(DEVICE), rows.to(DEVICE), seeds.to(DEVICE), positions.to(DEVICE)).cpu()
    expected = seeded_exponential_ref(noise.clone(), rows, seeds, positions)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert (got[[1, 3, 5]] == -1).all() and (got[rows] > 0).all()
    assert not torch.equal(got[4], got[2]) and 0.9 < got[rows].mean() < 1.1  # Exponential(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens, num_experts, top_k",
                         [(1, 4, 2), (37, 6, 2), (60, 4, 2), (200, 8, 3), (300, 2, 2), (9, 16, 1)])
def test_fused_moe_matches_reference(dtype, num_tokens, num_experts, top_k):
    """The grouped GEMMs over tokens sorted by expert equal the expert-by-expert reference: one
    token, experts left without tokens, blocks of 16, 32 and 64 rows, widths off the block sizes."""
    from pagedllm_kernels.fused_moe import fused_moe
    from pagedllm_kernels.reference import fused_moe_ref, silu_and_mul_ref

    g = torch.Generator().manual_seed(num_tokens)
    hidden, intermediate = 48, 40
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * intermediate, hidden, generator=g) / 7).to(dtype)
    w2 = (torch.randn(num_experts, hidden, intermediate, generator=g) / 7).to(dtype)
    weights, ids = torch.randn(num_tokens, num_experts, generator=g).softmax(-1).topk(top_k)
    expected = fused_moe_ref(x.float(), w13.float(), w2.float(), weights, ids, silu_and_mul_ref)
    got = fused_moe(*(t.to(DEVICE) for t in (x, w13, w2, weights, ids)), silu_and_mul_ref).cpu()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("num_tokens", [1, 37, 200])
def test_fused_moe_with_biases_and_clamped_swiglu_matches_reference(num_tokens):
    """gpt-oss's experts: biases on both products (the down one's added before the routing weight)
    and its clamped activation (a limit within these values' range, so the clamp matters)."""
    from pagedllm_kernels.fused_moe import fused_moe
    from pagedllm_kernels.reference import clamped_swiglu_ref, fused_moe_ref

    g = torch.Generator().manual_seed(num_tokens)
    num_experts, hidden, intermediate = 6, 48, 40
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * intermediate, hidden, generator=g) / 4
    w2 = torch.randn(num_experts, hidden, intermediate, generator=g) / 7
    b13, b2 = torch.randn(num_experts, 2 * intermediate, generator=g), torch.randn(num_experts, hidden, generator=g)
    weights, ids = torch.randn(num_tokens, num_experts, generator=g).softmax(-1).topk(2)
    act = functools.partial(clamped_swiglu_ref, alpha=1.702, limit=1.5)
    expected = fused_moe_ref(x, w13, w2, weights, ids, act, b13=b13, b2=b2)
    got = fused_moe(*(t.to(DEVICE) for t in (x, w13, w2, weights, ids)), act, b13=b13.to(DEVICE),
                    b2=b2.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, fused_moe_ref(x, w13, w2, weights, ids, act, b13=b13), atol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_moe_reads_fp8_experts_with_their_row_scales(dtype):
    from pagedllm_kernels.fused_moe import fused_moe
    from pagedllm_kernels.reference import fused_moe_ref, quantize_rows_ref, silu_and_mul_ref

    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 48, generator=g).to(dtype)
    experts = [(torch.randn(6, rows, cols, generator=g) / 7) for rows, cols in ((80, 48), (48, 40))]
    (w13, s13), (w2, s2) = (tuple(t.view(*w.shape[:2], -1) for t in quantize_rows_ref(w.reshape(-1, w.shape[-1])))
                            for w in experts)
    weights, ids = torch.randn(40, 6, generator=g).softmax(-1).topk(2)
    silu = silu_and_mul_ref
    expected = fused_moe_ref(x.float(), w13, w2, weights, ids, silu, s13, s2)
    got = fused_moe(*(t.to(DEVICE) for t in (x, w13, w2, weights, ids)), silu_and_mul_ref, s13.to(DEVICE),
                    s2.to(DEVICE)).cpu()
    torch.testing.assert_close(got.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    unquantized = fused_moe_ref(x.float(), *experts, weights, ids, silu)
    assert (expected - unquantized).norm() < 0.1 * unquantized.norm()  # e4m3 per row: a few percent


def test_sort_by_expert_groups_pairs_in_whole_blocks():
    from pagedllm_kernels.fused_moe import sort_by_expert

    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # pairs 0..5: experts 2, 0, 2, 1, 0, 2
    sorted_pairs, block_experts = sort_by_expert(ids, num_experts=4, block_m=2)
    assert sorted_pairs.tolist()[:8] == [1, 4, 3, 6, 0, 2, 5, 6]  # 6 pads expert 1's and 2's groups
    assert block_experts.tolist()[:4] == [0, 1, 2, 2] and set(block_experts.tolist()[4:]) == {-1}
    assert len(sorted_pairs) == 2 * len(block_experts) >= 6 + 4 * (2 - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])  # bf16 runs in fp16
@pytest.mark.parametrize("query_lens", [[1, 1, 1], [5, 30, 1]], ids=["decode", "prefill"])
def test_fp8_cache_is_read_times_its_scales(dtype, query_lens):
    """kv_cache_dtype="fp8": the kernels (and the reference) read e4m3 K/V times each layer's
    scale: equal to attention over the dequantized cache (200: past the prefill kernel's first key tile)."""
    context_lens, k_scale, v_scale = [20, 45, 200], 0.05, 0.02
    k_cache, v_cache, tables, _, _, cu = paged_batch(context_lens, query_lens, 2, 64, 16, 0)
    k8 = (k_cache / k_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    v8 = (v_cache / v_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    query = torch.randn(sum(query_lens), 4, 64, generator=torch.Generator().manual_seed(3))
    lens = torch.tensor(context_lens, dtype=torch.int32)
    expected = paged_attention_ref(query, k8.float() * k_scale, v8.float() * v_scale, tables, lens, cu, 0.125)
    ref = paged_attention_ref(query.to(dtype), k8, v8, tables, lens, cu, 0.125, None, k_scale, v_scale)
    out = paged_attention(*(t.to(DEVICE) for t in (query.to(dtype), k8, v8, tables, lens, cu)), 0.125, None,
                          k_scale, v_scale, max_query_len=max(query_lens), max_context_len=max(context_lens))
    for got in (ref, out.cpu()):
        torch.testing.assert_close(got.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("head_dim", [64, 96, 36])  # 96: words past the head masked; 36: rows not 16 B aligned: bytes
def test_an_fp8_caches_decode_splits_merge_at_its_scales(num_splits, head_dim):
    """The decode kernel reads an FP8 cache's V as 32-bit words (``_load_fp8_words``): each
    split's partial output and the merged one come back at the cache's scales, for head sizes
    the words tile, pad or cannot tile."""
    k_cache, v_cache, tables, _, _, cu = paged_batch([150, 300], [1, 1], 2, head_dim, 16, 4)
    k8, v8 = (k_cache / 0.05).to(torch.float8_e4m3fn), (v_cache / 0.02).to(torch.float8_e4m3fn)
    query = torch.randn(2, 4, head_dim, generator=torch.Generator().manual_seed(5), dtype=torch.float16)
    lens = torch.tensor([150, 300], dtype=torch.int32)
    expected = paged_attention_ref(query.float(), k8.float() * 0.05, v8.float() * 0.02, tables, lens, cu, 0.125)
    out = paged_attention(*(t.to(DEVICE) for t in (query, k8, v8, tables, lens, cu)), 0.125, None, 0.05, 0.02,
                          max_query_len=1, max_context_len=300, num_splits=num_splits)
    torch.testing.assert_close(out.cpu().float(), expected, rtol=2e-3, atol=2e-3)


@triton.jit
def _words_kernel(cache_ptr, table_ptr, out_ptr, PTX: tl.constexpr):
    tok = tl.arange(0, 16)
    v = _load_fp8_words(cache_ptr, table_ptr, 0, 0, tok, tok < 16, 0, 256, 16, 16, tl.float16, 16, 16, 16, PTX, PTX)
    tl.store(out_ptr + tok[:, None] * 16 + tl.arange(0, 16)[None, :], v)


@pytest.mark.parametrize("ptx", [False, True] if DEVICE == "cuda" else [False])
def test_every_e4m3_value_reads_as_words_exactly_in_place(ptx):
    """All 256 codes as one block of 16 tokens x 16 dims: each comes back as its fp16 value, at its
    token and dim (the four bytes of a word, in order)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    x = codes.view(torch.float8_e4m3fn)
    out = torch.empty(16, 16, dtype=torch.float16, device=DEVICE)
    _words_kernel[(1,)](x.view(1, 16, 1, 16).to(DEVICE), torch.zeros(1, dtype=torch.int32, device=DEVICE), out,
                        PTX=ptx)
    finite = (codes & 0x7F) != 0x7F  # e4m3fn's two NaNs, which the cache never holds (stores clamp)
    assert torch.equal(out.cpu().flatten()[finite].float(), x[finite].float())
    assert torch.equal(out.cpu().flatten()[finite].view(torch.int16) < 0, codes[finite] >= 128)  # -0 keeps its sign


def test_store_into_an_fp8_cache_divides_by_the_scale_and_clamps():
    key = torch.tensor([[[0.55, -3.0, 10.0, 0.003]]]).repeat(3, 2, 8)  # 10 / 0.01 is past e4m3's 448
    value = -key
    slots = torch.tensor([2, -1, 7])
    caches = [torch.zeros(2, 4, 2, 32, dtype=torch.float8_e4m3fn) for _ in range(4)]
    store_kv_cache_ref(key, value, caches[0], caches[1], slots, 0.01, 0.02)
    k_dev, v_dev = caches[2].to(DEVICE), caches[3].to(DEVICE)
    store_kv_cache(key.to(DEVICE), value.to(DEVICE), k_dev, v_dev, slots.to(DEVICE), 0.01, 0.02)
    assert torch.equal(k_dev.cpu().float(), caches[0].float()) and torch.equal(v_dev.cpu().float(), caches[1].float())
    stored = caches[0].view(-1, 2, 32)[2, 0, :4].float()
    assert stored.tolist() == [56.0, -288.0, 448.0, 0.3125]  # e4m3 of 55, -300, 448 (clamped), 0.3


@triton.jit
def _fp8_quotient_kernel(x_ptr, out_ptr, scale, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, fp8_quotient(tl.load(x_ptr + offs, mask=offs < n), scale), mask=offs < n)


def quotient_cases(scale: float) -> torch.Tensor:
    """Every e4m3 rounding midpoint times the scale and three float32 steps either side (where a
    quotient off by one step rounds to another e4m3 value), zeros, infinities, values past the range."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[codes.isfinite()].unique()
    x = ((grid[1:] + grid[:-1]) / 2 * scale).float()
    up, down, near = x, x, [x]
    for _ in range(3):
        up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
        near += [up, down]
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 3e38, -3e38, 1e-30, -1e-30, 500 * scale, 449 * scale])
    return torch.cat(near + [special])


SCALES = [0.01, 0.37, 1 / 3, 1.0, 3.0, 7e-3]


@pytest.mark.parametrize("scale", SCALES)
def test_the_fp8_quotient_is_torchs_division_to_the_bit(scale):
    """The kernels divide by a KV scale without a division a value (a reciprocal and FMA
    corrections): the quotient must be torch's, signed zeros and all, where a step off would round
    to another e4m3 value."""
    x = quotient_cases(scale)
    out = torch.empty_like(x, device=DEVICE)
    _fp8_quotient_kernel[(triton.cdiv(len(x), 256),)](x.to(DEVICE), out, scale, len(x), BLOCK=256)
    expected = (x / scale).clamp(-448.0, 448.0)
    assert torch.equal(out.cpu().view(torch.int32), expected.view(torch.int32))


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (8, 9), reason=(
    "needs an FP8 GPU: the interpreter rounds float32 to e4m3 wrongly at ties (-400 -> -416, -124 -> -64)"))
@pytest.mark.parametrize("scale", SCALES)
def test_an_fp8_store_writes_torchs_bytes(scale):
    values = quotient_cases(scale)
    values = torch.cat([values, torch.zeros(-len(values) % 32)]).view(-1, 1, 32)
    slots = torch.arange(len(values))
    caches = [torch.zeros(len(values), 1, 1, 32, dtype=torch.float8_e4m3fn) for _ in range(4)]
    store_kv_cache_ref(values, -values, caches[0], caches[1], slots, scale, scale)
    k_dev, v_dev = caches[2].to(DEVICE), caches[3].to(DEVICE)
    store_kv_cache(values.to(DEVICE), (-values).to(DEVICE), k_dev, v_dev, slots.to(DEVICE), scale, scale)
    for expected, got in ((caches[0], k_dev), (caches[1], v_dev)):
        assert torch.equal(got.cpu().view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])  # OPT's layer_norm_elementwise_affine=False
@pytest.mark.parametrize("width", [64, 96])
def test_layer_norm_matches_reference(dtype, with_residual, affine, width):
    from pagedllm_kernels.elementwise import layer_norm
    from pagedllm_kernels.reference import layer_norm_ref

    g = torch.Generator().manual_seed(width)
    x, residual = (torch.randn(5, width, generator=g).to(dtype) * 3 + 1 for _ in range(2))
    weight, bias = ((torch.randn(width, generator=g).to(dtype) for _ in range(2)) if affine else (None, None))
    res = residual if with_residual else None
    expected = layer_norm_ref(x, weight, bias, 1e-5, res)
    on = (lambda t: None if t is None else t.to(DEVICE))
    got = layer_norm(x.to(DEVICE), on(weight), on(bias), 1e-5, on(res))
    for e, o in zip(expected if with_residual else [expected], got if with_residual else [got], strict=True):
        torch.testing.assert_close(o.cpu().float(), e.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("fp8", [False, True])  # bf16/fp16 weights, or FP8 ones with row scales (any out dtype)
@pytest.mark.parametrize("rows, split_k, bias", [(1, 1, False), (3, 2, True), (16, 3, False), (5, 4, True)])
def test_few_rows_matmul_equals_its_reference(dtype, fp8, rows, split_k, bias):
    """few_rows_matmul, split-K included (its last program to arrive adds the partial sums and resets
    its counter: a second call gives the same), against F.linear or the FP8 reference."""
    import torch.nn.functional as F

    from pagedllm_kernels.few_rows import few_rows_matmul
    from pagedllm_kernels.reference import fp8_weight_matmul_ref, quantize_rows_ref

    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 300, generator=g), torch.randn(70, 300, generator=g) / 300**0.5
    b = torch.randn(70, generator=g).to(dtype) if bias else None
    if fp8:
        (x, x_scale), (weight, scale) = quantize_rows_ref(x), quantize_rows_ref(weight)
        expected = fp8_weight_matmul_ref(x, x_scale, weight, scale, dtype).float()
        scales = [x_scale.to(DEVICE), scale.to(DEVICE)]
    else:
        x, weight = x.to(dtype), weight.to(dtype)
        expected, scales = F.linear(x.float(), weight.float()), []
    if bias:  # the product rounded to the dtype, then the bias added: as F.linear's separate add would
        expected = expected.to(dtype).float() + b.float()
    args = [x.to(DEVICE), weight.to(DEVICE), dtype, None if b is None else b.to(DEVICE), *scales]
    got = few_rows_matmul(*args, block_k=64, split_k=split_k)
    assert got.dtype == dtype and got.shape == (rows, 70)
    assert torch.equal(few_rows_matmul(*args, block_k=64, split_k=split_k), got)
    torch.testing.assert_close(got.float().cpu(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_few_rows_matmul_takes_the_narrow_bf16_layers_and_every_fp8_one():
    """The rule measured on an H200: Qwen3-0.6B's and OPT-1.3B's narrow layers go to the kernel;
    a layer 4,096 deep (Llama-3-8B) or wider than the SMs' tiles (an LM head) stays with cuBLAS;
    FP8 weights always take it (torch._scaled_mm tiles a few rows worse)."""
    from pagedllm_kernels.few_rows import reads_faster

    def weight(n, k, dtype=torch.bfloat16):
        return torch.empty(n, k, dtype=dtype, device="meta")

    assert all(reads_faster(weight(n, k)) for n, k in [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072),
                                                        (2048, 2048), (6144, 2048)])
    assert not any(reads_faster(weight(n, k)) for n, k in [(4096, 4096), (6144, 4096), (4096, 14336),
                                                            (151936, 1024), (28672, 4096)])
    assert reads_faster(weight(28672, 4096, torch.float8_e4m3fn))


def test_few_rows_prefetch_stays_within_its_budget_and_the_programs_columns():
    """The prefetch asks for whole 128-byte lines, a power of two of them (the kernel's arange), never
    past a program's own columns, and over the grid within PREFETCH_BYTES; none where a line would not fit."""
    from pagedllm_kernels.few_rows import PREFETCH_BYTES, _prefetch_columns, few_rows_config

    for n, k, size in [(6144, 4096, 1), (4096, 14336, 1), (28672, 4096, 1), (1024, 2048, 2), (151936, 1024, 2)]:
        tiles = few_rows_config(n, k, size)
        k_per_split = math.ceil(math.ceil(k / tiles["split_k"]) / tiles["block_k"]) * tiles["block_k"]
        programs = math.ceil(n / tiles["block_n"]) * math.ceil(k / k_per_split)
        columns = _prefetch_columns(programs * tiles["block_n"] * size, k_per_split, size)
        if columns:
            assert columns * size % 128 == 0 and columns & (columns - 1) == 0 and columns <= k_per_split
            assert programs * tiles["block_n"] * columns * size <= PREFETCH_BYTES
        assert (columns == 0) == (PREFETCH_BYTES // (programs * tiles["block_n"] * size) < 128 // size)
    assert _prefetch_columns(PREFETCH_BYTES, 4096, 1) == 0  # the grid's rows alone use the budget up
