"""Plain-torch references of the paged-cache kernels.

They define what the Triton kernels must compute, and they are the CPU backend.
Cache layout, per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` for K and for V.
A token at position p of a sequence lives in block ``block_table[p // block_size]``,
slot ``p % block_size``; its flat slot is ``block * block_size + p % block_size``.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # float8_e4m3fn's largest value


def to_cache(x: torch.Tensor, cache: torch.Tensor, scale: float) -> torch.Tensor:
    """K or V rows as the cache holds them: as they are, or in an FP8 cache ``x / scale`` clamped
    to e4m3's range (a value past it would become NaN)."""
    if cache.dtype == x.dtype:
        return x
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(cache.dtype)


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, cols]`` as float8 e4m3 and one float32 scale per row ``[rows, 1]``: ``x ~ q * scale``,
    the scale a row's largest magnitude / FP8_MAX, its values multiplied by the inverse (FP8_MAX /
    largest: one division a row, as the kernels do it). On CUDA torch divides by a Python number
    as a product by its inverse: the kernels are compared with this on the CPU."""
    largest = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    inverse = torch.full_like(largest, FP8_MAX) / largest
    return (x.float() * inverse).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), largest / FP8_MAX


def fp8_weight_matmul_ref(x: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 activations times FP8 weights, each with its row scales: both dequantized, multiplied in
    float32, rounded to ``out_dtype``."""
    return ((x.float() * x_scale) @ (weight.float() * weight_scale).t()).to(out_dtype)


def from_cache(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """Cached K or V in the compute ``dtype`` (an FP8 cache's values times its scale)."""
    return x if x.dtype == dtype else (x.float() * scale).to(dtype)


def store_kv_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write the step's new K/V rows ``[num_tokens, num_kv_heads, head_dim]`` at their flat slots
    (into an FP8 cache divided by the layer's scales).

    Slots marked -1 (padding tokens) are skipped.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = to_cache(key[keep], k_cache, k_scale)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = to_cache(value[keep], v_cache, v_scale)


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a flat, unpadded batch of new tokens against their paged context.

    query: ``[num_tokens, num_heads, head_dim]``, sequence i owning rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``. Those are the last tokens of its context, whose
    K/V (the new ones included) are already in the cache: ``context_lens[i]`` tokens through
    ``block_tables[i]``. A decode is a sequence with one query row; a prefill chunk over a
    cached prefix has several. ``sliding_window`` w lets a query see only the last w
    positions (itself included), as Mistral does. An FP8 cache is read times ``k_scale`` and
    ``v_scale``. ``softcap`` > 0 caps the scores at +-softcap, ``softcap * tanh(score / softcap)``
    (Gemma 2's ``attn_logit_softcapping``). ``sinks`` ``[num_heads]`` (gpt-oss's attention sinks):
    each head's softmax has one more logit, ``sinks[head]``, whose value is zero, so a query may
    attend to nothing.
    """
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(query)
    starts = cu_seqlens_q.tolist()
    for i, context_len in enumerate(context_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        num_blocks = -(-context_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = from_cache(k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len], query.dtype, k_scale)
        v = from_cache(v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:context_len], query.dtype, v_scale)
        q_pos = torch.arange(context_len - (end - start), context_len, device=query.device)
        k_pos = torch.arange(context_len, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        q, k, v = query[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if softcap > 0 or sinks is not None:  # as HF's eager attention: scores, masked, softmax in float32
            group = num_heads // num_kv_heads
            scores = q @ k.repeat_interleave(group, 0).transpose(1, 2) * scale
            if softcap > 0:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~mask, float("-inf")).float()
            if sinks is not None:
                sink = sinks.float()[:, None, None].expand(-1, scores.shape[1], 1)
                scores = torch.cat((scores, sink), dim=-1)
            probs = scores.softmax(-1)[..., :context_len]  # (a sink's column, if any, dropped)
            o = probs.to(q.dtype) @ v.repeat_interleave(group, 0)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                               enable_gqa=num_heads != num_kv_heads)
        out[start:end] = o.transpose(0, 1)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 scale_in_float32: bool = False, quantize: bool = False):
    """HF's RMSNorm (float32 statistics, scaled in the input dtype; ``scale_in_float32``: scaled
    before rounding, as Gemma's). With ``residual``: first ``x + residual`` (rounded to the dtype,
    as HF adds), which is returned too as the new residual. ``quantize``: the output of a 2-D ``x``
    as ``quantize_rows_ref`` returns it, for an FP8 linear layer."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = (weight.float() * h).to(dtype) if scale_in_float32 else weight * h.to(dtype)
    if quantize:
        out = quantize_rows_ref(out)
    return out if residual is None else (out, residual)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF's LayerNorm (``F.layer_norm`` in x's dtype); with ``residual``: of ``x + residual`` (rounded
    to the dtype, as HF adds), which is returned too as the new residual."""
    if residual is not None:
        x = x + residual
        residual = x
    out = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return out if residual is None else (out, residual)


def rotary_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q ``[tokens, heads, head_dim]`` and k, computed in float32;
    ``cos``/``sin`` are ``[max_position, head_dim // 2]`` tables."""
    c = cos[positions].unsqueeze(1)
    s = sin[positions].unsqueeze(1)

    def rotate(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def clamped_swiglu_ref(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation of ``[tokens, 2 * n]`` gate|up, as HF computes it:
    ``(up + 1) * gate * sigmoid(alpha * gate)`` with gate clamped below ``limit`` and up within
    +-``limit``."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))


def silu_and_mul_ref(gate_up: torch.Tensor, quantize: bool = False):
    """``silu(gate) * up`` for ``[tokens, 2 * n]`` holding gate then up, rounded as HF's two ops round
    (``quantize``: as ``quantize_rows_ref`` returns it, for an FP8 linear layer)."""
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.nn.functional.silu(gate) * up
    return quantize_rows_ref(out) if quantize else out


def token_logprobs_ref(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Each row's ``token_ids[row]`` log-probability under its logits, in float32."""
    logits = logits.float()
    return logits.gather(1, token_ids.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)


def greedy_sample_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax (its first maximum) and that token's log-probability, in float32."""
    token_ids = logits.float().argmax(dim=-1)
    return token_ids, token_logprobs_ref(logits, token_ids)


_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of the constant ``a`` and uint32 values held in
    int64 ``b``, in 16-bit halves so that no int64 product overflows."""
    low_part, high_part = a * (b & 0xFFFF), a * (b >> 16)
    carried = high_part + (low_part >> 16)
    return carried >> 16, ((carried & 0xFFFF) << 16) | (low_part & 0xFFFF)


def philox_ref(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """The first uint32 output (held in int64) of Philox4x32-10 for the 64-bit key ``seed`` and the
    counter ``(c0, c1, 0, 0)``, as Triton's ``tl.randint`` computes it."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0


def seeded_exponential_ref(noise: torch.Tensor, rows: torch.Tensor, seeds: torch.Tensor,
                           positions: torch.Tensor) -> torch.Tensor:
    """``noise[rows[i], t] = -log(u)`` with ``u`` uniform in (0, 1) on a 2**-23 grid (never 0 or 1),
    drawn by Philox keyed by ``seeds[i]`` at counter ``(t, positions[i])``."""
    token_ids = torch.arange(noise.shape[1], dtype=torch.int64, device=noise.device)
    bits = philox_ref(seeds.long().unsqueeze(1), token_ids.unsqueeze(0), positions.long().unsqueeze(1) & _MASK32)
    uniform = ((bits >> 9) * 2 + 1).to(torch.float32) * 2.0**-24
    noise[rows.long()] = -torch.log(uniform)
    return noise


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation_and_mul: Callable[[torch.Tensor], torch.Tensor],
                  w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                  b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """Mixture of experts as HF computes it, expert by expert: each token's ``top_k`` experts
    ``w2[e] @ activation_and_mul(w13[e] @ x)`` (``w13 [E, 2I, H]``: gate rows then up rows, which
    ``activation_and_mul`` maps to ``[.., I]``; ``w2 [E, H, I]``), plus the experts' biases where
    given (``b13 [E, 2I]``, ``b2 [E, H]``: gpt-oss's), weighted by ``topk_weights`` (float32) and
    summed in x's dtype. FP8 weights are dequantized with their scales per expert and row first."""
    if w13_scale is not None:
        w13, w2 = (w13.float() * w13_scale).to(x.dtype), (w2.float() * w2_scale).to(x.dtype)
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        tokens, slots = torch.where(topk_ids == expert)
        gate_up = F.linear(x[tokens], w13[expert], b13[expert] if b13 is not None else None)
        expert_out = F.linear(activation_and_mul(gate_up), w2[expert], b2[expert] if b2 is not None else None)
        out.index_add_(0, tokens, (expert_out * topk_weights[tokens, slots, None]).to(x.dtype))
    return out
