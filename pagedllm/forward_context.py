"""The step's attention metadata, set by the model runner around a forward pass.

Layers read it from here rather than taking it as an argument, so that model files keep
HF's shape (``forward(input_ids, positions)``).
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where the step's tokens go in the paged KV cache and what each sequence attends to.

    slot_mapping: ``[num_tokens]`` flat cache slot of each new token (-1: do not store).
    block_tables: ``[num_seqs, max_blocks]`` block ids of each sequence (padded with 0).
    context_lens: ``[num_seqs]`` tokens in each sequence's context after this step.
    cu_seqlens_q: ``[num_seqs + 1]`` start of each sequence's new tokens in the flat batch.
    window_slot_mapping, window_block_tables: the same in the sliding layers' own pool, for a
    model whose layers mix sliding windows with full attention (Gemma 3); None otherwise.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_query_len: int
    max_context_len: int
    window_slot_mapping: torch.Tensor | None = None
    window_block_tables: torch.Tensor | None = None


_metadata: AttentionMetadata | None = None


@contextmanager
def forward_metadata(metadata: AttentionMetadata):
    global _metadata
    _metadata = metadata
    try:
        yield
    finally:
        _metadata = None


def get_attention_metadata() -> AttentionMetadata:
    if _metadata is None:
        raise RuntimeError("attention ran outside forward_metadata(): the model runner sets it for each step")
    return _metadata
