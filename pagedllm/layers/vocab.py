"""The token embedding and LM head split by vocabulary rows across tensor-parallel ranks.

Each rank holds ``ceil(vocab / ranks)`` rows (the last rank's tail padded with zeros). The
embedding looks up the ids in its range and an all-reduce sums the ranks' rows; the LM head's
per-rank logits are gathered and the padding cut off.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from pagedllm.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_world_size
from pagedllm.layers.linear import check_full_shape, linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_size = tp_world_size()
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.start = tp_rank() * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, dim))
        self.weight.weight_loader = self._load
        self.weight.full_shape = (vocab_size, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.start
        mine = (local_ids >= 0) & (local_ids < self.rows_per_rank)
        rows = F.embedding(local_ids.clamp(0, self.rows_per_rank - 1), self.weight)
        return all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))

    def _load(self, param: nn.Parameter, loaded, part: int | None) -> None:
        check_full_shape(loaded, param.full_shape)
        stop = min(self.start + self.rows_per_rank, self.vocab_size)
        param.data.zero_()
        param.data[: stop - self.start].copy_(loaded[self.start : stop])


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the whole vocabulary from this rank's rows (the weight may be the embedding's)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden_states, self.weight, None, None)
        if self.tp_size == 1:
            return logits
        return all_gather_last_dim(logits)[:, : self.vocab_size]
