"""A step's requests into the sampler's inputs, and its outputs back into Python numbers."""

import torch

from pagedllm.engine.request import Request
from pagedllm.engine.structured_output import allows_only, fill_masks
from pagedllm.layers.sampler import PenaltyInputs, SamplerOutput, SamplingMetadata, SeededRows

# Per sampled token: {token id: (logprob, rank)} for the sampled token and the top alternatives.
TokenLogprobs = dict[int, tuple[float, int]]


def num_logprobs(k: int | None, vocab_size: int) -> int | None:
    """How many top logprobs ``k`` asks for: -1 is the whole vocabulary."""
    return None if k is None else vocab_size if k == -1 else min(k, vocab_size)


def sampling_metadata(requests: list[Request], positions: list[int], vocab_size: int, pin: bool) -> SamplingMetadata:
    """The rows' settings as (pinned, with ``pin``) host tensors and lists; ``positions``: the
    position of the token each row samples. Values are clamped to the vocabulary, so that no row
    can break the batch's sampling even if it slipped past validation."""
    params = [r.sampling_params for r in requests]
    seeded = [row for row, p in enumerate(params) if p.seed is not None and not p.greedy]
    # (a request that the previous step ended samples once more here, free: its token is dropped)
    masks = fill_masks([None if r.is_finished else r.grammar_now for r in requests], pin)
    # min_tokens gives way to a grammar that can only end here: banning its stop tokens would leave no token
    must_end = set() if masks is None else {row for i, row in enumerate(masks.rows) if requests[row].before_min_tokens
                                            and allows_only(masks, i, requests[row].stop_token_ids)}
    banned = [[t for t in r.tokens_banned_now(row in must_end) if t < vocab_size] if r.may_ban else []
              for row, r in enumerate(requests)]
    wanted = [num_logprobs(p.logprobs, vocab_size) for p in params if p.logprobs is not None]
    tensors = [(row, r.tensors) for row, r in enumerate(requests) if r.tensors is not None]
    biased = [(row, *in_vocabulary(vocab_size, *t.bias)) for row, t in tensors if t.bias is not None]

    def host(values: list, used: bool, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return torch.tensor(values, dtype=dtype, pin_memory=pin) if used else None

    return SamplingMetadata(
        temperatures=host([p.temperature for p in params], True, torch.float32),
        top_ks=host([min(p.top_k, vocab_size) for p in params], any(p.top_k > 0 for p in params)),
        top_ps=host([p.top_p for p in params], any(p.top_p < 1 for p in params)),
        all_greedy=all(p.greedy for p in params),
        seeded=SeededRows(host(seeded, True, torch.int64),  # sample i of a group draws from seed + i
                          host([params[row].seed + requests[row].sample_index for row in seeded], True, torch.int64),
                          host([positions[row] for row in seeded], True, torch.int64)) if seeded else None,
        banned_token_ids=banned if any(banned) else None,
        min_ps=host([p.min_p for p in params], any(p.min_p > 0 for p in params)),
        penalties=penalty_inputs(requests),
        max_num_logprobs=max(wanted) if wanted else None,
        allowed_token_ids=[(row, in_vocabulary(vocab_size, t.allowed_ids)[0])
                           for row, t in tensors if t.allowed_ids is not None] or None,
        logit_bias=(torch.cat([torch.full_like(ids, row) for row, ids, _ in biased]),
                    torch.cat([ids for _, ids, _ in biased]), torch.cat([b for _, _, b in biased])) if biased else None,
        logits_processors=[(row, p.logits_processors, requests[row].prompt_token_ids, requests[row].output_token_ids)
                           for row, p in enumerate(params) if p.logits_processors] or None,
        grammar=masks,
    )


def in_vocabulary(vocab_size: int, token_ids: torch.Tensor, *alongside: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Token ids (and values alongside) within the vocabulary: validation checked them, and no row
    that slipped past it can break the batch's sampling."""
    if int(token_ids.max()) < vocab_size:
        return token_ids, *alongside
    keep = token_ids < vocab_size
    return token_ids[keep], *(values[keep] for values in alongside)


def penalty_inputs(requests: list[Request]) -> PenaltyInputs | None:
    """The penalized rows' penalties and tokens, each row's prompt a tensor made once (padding
    every row to the longest, from Python lists, took 38 ms a step for one 1,000-token prompt in
    a batch of 256, and 559 ms for a 30,000-token one)."""
    rows = [row for row, r in enumerate(requests) if r.sampling_params.penalized]
    if not rows:
        return None
    penalized = [requests[row] for row in rows]
    params = [r.sampling_params for r in penalized]
    outputs = [torch.tensor(r.output_token_ids, dtype=torch.int64) for r in penalized]
    return PenaltyInputs(
        rows=torch.tensor(rows),
        presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32),
        frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32),
        repetition=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
        output_token_ids=padded(outputs),
        seen_token_ids=padded([torch.cat((r.tensors.prompt_ids, out))
                               for r, out in zip(penalized, outputs, strict=True)]),
    )


def padded(token_ids: list[torch.Tensor]) -> torch.Tensor:
    """``[rows, longest]``, padded with -1 (one column at least)."""
    if not any(len(t) for t in token_ids):
        return torch.full((len(token_ids), 1), -1, dtype=torch.int64)
    return torch.nn.utils.rnn.pad_sequence(token_ids, batch_first=True, padding_value=-1)


def logprobs_to_host(sampled: SamplerOutput, tokens: list[int], requests: list[Request],
                     vocab_size: int) -> list[TokenLogprobs | None]:
    """Each row's sampled token (``tokens``) and its own number of top alternatives, as Python numbers."""
    top_ids, top_logprobs = sampled.top_ids.tolist(), sampled.top_logprobs.tolist()
    token_logprobs = sampled.sampled_logprobs.tolist()
    ranks = sampled.sampled_ranks.tolist()
    result = []
    for row, request in enumerate(requests):
        k = num_logprobs(request.sampling_params.logprobs, vocab_size)
        if k is None:
            result.append(None)
            continue
        entry = {tokens[row]: (token_logprobs[row], ranks[row])}
        for rank, (token_id, logprob) in enumerate(zip(top_ids[row][:k], top_logprobs[row][:k], strict=True), 1):
            entry.setdefault(token_id, (logprob, rank))
        result.append(entry)
    return result


SCORED_ROWS_AT_ONCE = 1024  # a float32 slice of [1024, vocab]: 0.6 GB at Qwen3's 152k, where 8,192 rows took 5 GB


def score_prompt_tokens(logits: torch.Tensor, targets: list[tuple[int, int]],
                        requests: list[Request]) -> dict[int, list[TokenLogprobs]]:
    """Each prompt token's logprob and rank under the logits before it, with the request's top-k;
    rows in slices, so that a long prompt's float32 copies stay small."""
    vocab_size = logits.shape[-1]
    k = max(max(num_logprobs(requests[i].sampling_params.prompt_logprobs, vocab_size) for i, _ in targets), 1)
    token_logprobs, ranks, top_logprobs, top_ids = [], [], [], []
    for start in range(0, len(targets), SCORED_ROWS_AT_ONCE):
        rows = slice(start, start + SCORED_ROWS_AT_ONCE)
        logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
        token_ids = torch.tensor([t for _, t in targets[rows]], device=logprobs.device)
        chosen = logprobs.gather(1, token_ids.unsqueeze(1))
        ranks += ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        token_logprobs += chosen.squeeze(1).tolist()
        values, ids = logprobs.topk(k, dim=-1)
        top_logprobs += values.tolist()
        top_ids += ids.tolist()
    scored: dict[int, list[TokenLogprobs]] = {}
    for row, ((index, token_id), token_logprob) in enumerate(zip(targets, token_logprobs, strict=True)):
        entry = {token_id: (token_logprob, ranks[row])}
        wanted = num_logprobs(requests[index].sampling_params.prompt_logprobs, vocab_size)
        for rank, (other, value) in enumerate(zip(top_ids[row][:wanted], top_logprobs[row][:wanted], strict=True), 1):
            entry.setdefault(other, (value, rank))
        scored.setdefault(index, []).append(entry)
    return scored
