"""Batched sampling on the logits' device: greedy, temperature, top-k, top-p, per-request seeds.

Random choice uses ``argmax(probs / q)`` with ``q ~ Exponential(1)`` (an exact draw from
``probs``, as gpt-fast does), so each row needs only its own noise: a seeded request draws
its noise from its own generator and samples the same tokens whatever else is in the batch.
"""

from dataclasses import dataclass

import torch


@dataclass
class SamplingMetadata:
    """Per-row sampling settings of one step's logits ``[num_rows, vocab]``."""

    temperatures: torch.Tensor  # [num_rows] float; 0 means greedy
    top_ks: torch.Tensor | None  # [num_rows] int; 0 means off; None when no row uses it
    top_ps: torch.Tensor | None  # [num_rows] float; 1 means off; None when no row uses it
    generators: dict[int, torch.Generator]  # row -> the request's own generator (seeded requests)
    all_greedy: bool
    banned_token_ids: list[list[int]] | None = None  # per row, e.g. EOS before min_tokens


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator  # noise for rows without a seed of their own

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        logits = logits.float()
        if meta.banned_token_ids:
            for row, banned in enumerate(meta.banned_token_ids):
                if banned:
                    logits[row, banned] = float("-inf")
        greedy = logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy
        temperatures = meta.temperatures.to(logits.device)
        logits = logits / torch.where(temperatures > 0, temperatures, 1.0).unsqueeze(1)
        logits = apply_top_k_top_p(logits, meta.top_ks, meta.top_ps)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        for row in range(probs.shape[0]):
            noise[row].exponential_(generator=meta.generators.get(row, self.generator))
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(temperatures > 0, sampled, greedy)


def apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor | None,
                      top_ps: torch.Tensor | None) -> torch.Tensor:
    """Set to -inf every logit outside each row's top-k and smallest top-p nucleus."""
    if top_ks is None and top_ps is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_ks is not None:
        ks = top_ks.to(logits.device)
        ks = torch.where(ks > 0, ks, logits.shape[-1]).unsqueeze(1)
        ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
        drop |= ranks >= ks
    if top_ps is not None:
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_ps.to(logits.device).unsqueeze(1)
    drop[:, 0] = False  # the most likely token always stays
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
