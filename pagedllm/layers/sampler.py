"""Batched sampling on the logits' device, in vLLM's order: allowed tokens, banned tokens (stop
tokens before min_tokens, bad words), logit bias and per-request logits processors, penalties,
then greedy argmax, or temperature, min-p, top-k/top-p and a random draw.

Random choice uses ``argmax(probs / q)`` with ``q ~ Exponential(1)`` (an exact draw from
``probs``, as gpt-fast does), so each row needs only its own noise: a seeded request's noise is
a function of its seed and the position it samples (Philox, one kernel for all seeded rows), so
it samples the same tokens whatever else is in the batch, and again after a preemption.
Log-probabilities are those of the model's raw logits (vLLM's default).
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedllm.errors import RequestError
from pagedllm.layers import triton_ops
from pagedllm_kernels.reference import greedy_sample_ref, seeded_exponential_ref, token_logprobs_ref


@dataclass
class GrammarMasks:
    """Structured outputs' masks for a step: xgrammar's packed bitmask ``[len(rows),
    ceil(vocab_size / 32)]`` of the tokens each constrained row may take next, those rows, and the
    ids the masks span (the sampler bans the ids past them)."""

    bitmask: torch.Tensor
    rows: list[int]
    vocab_size: int


@dataclass
class SeededRows:
    """The rows of seeded requests: each one's seed and the position of the token it samples."""

    rows: torch.Tensor  # [n] int64
    seeds: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] int64


@dataclass
class PenaltyInputs:
    """The penalized rows of a step, and theirs alone: one row's long prompt is no one else's cost."""

    rows: torch.Tensor  # [k] the penalized rows
    presence: torch.Tensor  # [k]
    frequency: torch.Tensor  # [k]
    repetition: torch.Tensor  # [k]
    output_token_ids: torch.Tensor  # [k, n] each row's generated tokens, padded with -1
    seen_token_ids: torch.Tensor  # [k, m] its prompt and generated tokens, padded with -1


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step's logits ``[num_rows, vocab]``."""

    temperatures: torch.Tensor  # [num_rows] float; 0 means greedy
    top_ks: torch.Tensor | None  # [num_rows] int; 0 means off; None when no row uses it
    top_ps: torch.Tensor | None  # [num_rows] float; 1 means off; None when no row uses it
    all_greedy: bool
    seeded: SeededRows | None = None  # rows that draw their own noise
    banned_token_ids: list[list[int]] | None = None  # per row, e.g. EOS before min_tokens
    min_ps: torch.Tensor | None = None  # [num_rows] float; 0 means off
    penalties: PenaltyInputs | None = None
    max_num_logprobs: int | None = None  # top-k logprobs wanted by some row (None: no row wants any)
    allowed_token_ids: list[tuple[int, torch.Tensor]] | None = None  # (row, the only tokens it may sample)
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, token ids, biases (float32)
    # (row, the request's processors, its prompt and output token ids)
    logits_processors: list[tuple[int, list[Callable], list[int], list[int]]] | None = None
    grammar: GrammarMasks | None = None  # structured outputs: the allowed tokens of the constrained rows


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [rows]
    sampled_logprobs: torch.Tensor  # [rows] the sampled token's logprob under the raw logits
    # with max_num_logprobs: [rows, k] top ids and logprobs, and the sampled token's rank
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator  # noise for the rows without a seed of their own

    def __call__(self, model_logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        has_ops = meta.allowed_token_ids or meta.banned_token_ids or meta.logit_bias or meta.logits_processors
        fused = triton_ops.fused_on(model_logits)
        if meta.all_greedy and not (has_ops or meta.grammar is not None or meta.penalties is not None):
            # argmax and its logprob in one pass over the logits, at the model's dtype
            out = SamplerOutput(*(triton_ops.greedy_sample if fused else greedy_sample_ref)(model_logits))
            raw = None
        else:
            raw = model_logits.float()  # kept as it is, for logprobs
            logits = apply_request_logits_ops(raw.clone(), meta) if has_ops else raw
            if meta.grammar is not None:
                logits = apply_grammar(logits if has_ops else raw.clone(), meta.grammar)
            if meta.penalties is not None:
                logits = apply_penalties(logits, meta.penalties)
            token_ids = logits.argmax(dim=-1)
            if not meta.all_greedy:
                token_ids = self._sample(logits, token_ids, meta)
            token_logprobs = triton_ops.token_logprobs if fused else token_logprobs_ref
            out = SamplerOutput(token_ids, token_logprobs(model_logits, token_ids))  # one pass, at the model's dtype
        if meta.max_num_logprobs is not None:
            token_ids, raw = out.token_ids, model_logits.float() if raw is None else raw
            raw_logprobs = torch.log_softmax(raw, dim=-1)
            out.top_logprobs, out.top_ids = raw_logprobs.topk(max(meta.max_num_logprobs, 1), dim=-1)
            raw_token_logits = raw.gather(1, token_ids.unsqueeze(1))
            out.sampled_ranks = (raw > raw_token_logits).sum(dim=-1) + 1
        return out

    def _sample(self, logits: torch.Tensor, greedy: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        temperatures = meta.temperatures.to(logits.device, non_blocking=True)
        # (at most 1e5 times over: as greedy below that, and finite logits stay finite, as penalties keep them; at
        # most 1e30 under, which is already uniform: a temperature past float32's range was inf here, and a
        # banned token's -inf / inf a NaN, which argmax took: token 0, outside a grammar's mask)
        logits = logits / torch.where(temperatures > 0, temperatures.clamp(1e-5, 1e30), 1.0).unsqueeze(1)
        if meta.min_ps is not None:
            logits = apply_min_p(logits, meta.min_ps.to(logits.device, non_blocking=True))
        logits = apply_top_k_top_p(logits, meta.top_ks, meta.top_ps)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        if meta.seeded is not None:
            seeded = meta.seeded
            fill = triton_ops.seeded_exponential_ if triton_ops.fused_on(noise) else seeded_exponential_ref
            fill(noise, *(t.to(noise.device, non_blocking=True) for t in (seeded.rows, seeded.seeds, seeded.positions)))
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(temperatures > 0, sampled, greedy)


def profile_sampler(logits: torch.Tensor, max_num_logprobs: int) -> None:
    """Sample the profile run's logits as the costliest step could (greedy and random rows, top-k,
    top-p, min-p, penalties, seeded rows, the most logprobs a request may ask for), and one row of
    them greedily and at random: the cache's sizing then counts the sampler's float32 copies and
    sort, and every sampling kernel a step can launch is compiled before the first request rather
    than in the middle of a user's run (a compile takes ~0.2 s)."""
    rows, vocab = logits.shape
    half = torch.arange(rows) % 2 == 0  # every other row greedy, the rest at random, seeded
    seeded = torch.nonzero(~half).flatten()
    no_tokens = torch.full((rows, 1), -1, dtype=torch.int64)
    meta = SamplingMetadata(
        temperatures=torch.where(half, 0.0, 0.8), top_ks=torch.full((rows,), min(50, vocab)),
        top_ps=torch.full((rows,), 0.9), all_greedy=False,
        seeded=SeededRows(seeded, seeded, torch.zeros_like(seeded)), min_ps=torch.full((rows,), 0.05),
        penalties=PenaltyInputs(torch.arange(rows), *(torch.ones(rows) for _ in range(3)), no_tokens, no_tokens),
        max_num_logprobs=vocab if max_num_logprobs == -1 else min(max_num_logprobs, vocab))
    sampler = Sampler(torch.Generator(device=logits.device))
    sampler(logits, meta)
    sampler(logits, SamplingMetadata(torch.zeros(rows), None, None, all_greedy=True))
    one_random = torch.tensor([0.8])
    sampler(logits[:1], SamplingMetadata(one_random, None, None, all_greedy=False))
    sampler(logits[:1], SamplingMetadata(torch.zeros(1), None, None, all_greedy=True))


def apply_grammar(logits: torch.Tensor, masks: GrammarMasks) -> torch.Tensor:
    """Structured outputs: -inf for every token a constrained row's grammar does not allow next."""
    import xgrammar as xgr

    rows = index_tensor(masks.rows, logits.device)
    constrained = logits[rows]
    bitmask = masks.bitmask.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(constrained, bitmask, vocab_size=masks.vocab_size)
    constrained[:, masks.vocab_size :] = float("-inf")  # the model's padding ids, past the tokenizer
    logits[rows] = constrained
    return logits


def index_tensor(values: list | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Indices (or values) from a list or a host tensor on ``device``, copied from pinned memory
    without waiting for the device."""
    if not isinstance(values, torch.Tensor):
        return torch.tensor(values, pin_memory=device.type == "cuda").to(device, non_blocking=True)
    return (values.pin_memory() if device.type == "cuda" else values).to(device, non_blocking=True)


def apply_request_logits_ops(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Each request's own changes to its row, in place: allowed tokens, bans, logit bias, and its
    logits processors (an error in one of those is pinned on its row: ``RequestError``)."""
    device = logits.device
    for row, allowed in meta.allowed_token_ids or ():
        ids = index_tensor(allowed, device)
        kept = logits[row, ids]
        logits[row] = float("-inf")
        logits[row, ids] = kept
    if meta.banned_token_ids:
        rows = [row for row, banned in enumerate(meta.banned_token_ids) for _ in banned]
        token_ids = [t for banned in meta.banned_token_ids for t in banned]
        logits[index_tensor(rows, device), index_tensor(token_ids, device)] = float("-inf")
    if meta.logit_bias is not None:
        rows, token_ids, biases = meta.logit_bias
        logits.index_put_((index_tensor(rows, device), index_tensor(token_ids, device)),
                          index_tensor(biases, device).to(logits.dtype), accumulate=True)
    for row, processors, prompt_ids, output_ids in meta.logits_processors or ():
        for processor in processors:
            try:  # vLLM's two forms: (output ids, logits) and (prompt ids, output ids, logits)
                takes_prompt = len(inspect.signature(processor).parameters) == 3
                args = (prompt_ids, output_ids, logits[row]) if takes_prompt else (output_ids, logits[row])
                logits[row] = processor(*args)
            except Exception as err:
                raise RequestError(err, row=row) from err
    return logits


_LEAST_PENALTY = 1e-20  # repetition penalties are clamped to [1e-20, 1e20]
_LARGEST_LOGIT = 1e30  # and the logits they change to within +-1e30


def apply_penalties(logits: torch.Tensor, p: PenaltyInputs) -> torch.Tensor:
    """Repetition penalty on every token seen (prompt and output), then frequency and presence
    penalties on the generated tokens, as vLLM applies them, to the penalized rows (a new tensor)."""
    vocab = logits.shape[1]
    device = logits.device
    rows = index_tensor(p.rows, device)
    sub = logits[rows]

    def one_hot_counts(ids: torch.Tensor) -> torch.Tensor:
        ids = torch.where(ids < 0, vocab, ids).to(device)  # padding lands in a dropped extra column
        counts = torch.zeros(len(sub), vocab + 1, device=device)
        return counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))[:, :vocab]

    # Within float32's range, and finite logits kept finite: a penalty of 1e308 (inf in float32) made a
    # seen token -inf, 0 / 0 NaN, and a row whose grammar allows only seen tokens could sample nothing.
    repetition = p.repetition.to(device).unsqueeze(1).clamp(_LEAST_PENALTY, 1 / _LEAST_PENALTY)
    seen = (one_hot_counts(p.seen_token_ids) > 0) & sub.isfinite()
    penalized = torch.where(sub > 0, sub / repetition, sub * repetition).clamp(-_LARGEST_LOGIT, _LARGEST_LOGIT)
    sub = torch.where(seen, penalized, sub)
    counts = one_hot_counts(p.output_token_ids)
    sub = sub - p.frequency.to(device).unsqueeze(1) * counts - p.presence.to(device).unsqueeze(1) * (counts > 0)
    return logits.index_put((rows,), sub)


def apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor | None,
                      top_ps: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k and smallest top-p nucleus."""
    if top_ks is None and top_ps is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_ks is not None:
        ks = top_ks.to(logits.device, non_blocking=True)
        ks = torch.where(ks > 0, ks, logits.shape[-1]).unsqueeze(1)
        ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
        drop |= ranks >= ks
    if top_ps is not None:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_ps.to(logits.device, non_blocking=True).unsqueeze(1)
    drop[:, 0] = False  # the most likely token always stays
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
