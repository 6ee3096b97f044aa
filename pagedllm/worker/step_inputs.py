"""One step's model inputs, built on the host in pinned buffers and copied to the device asynchronously.

The device buffers persist across steps, so a CUDA graph captured on them replays on whatever
the next step writes there. There are two sets of host buffers, used in turn: with async
scheduling a step is prepared while the one before may not have copied its inputs yet.
"""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.forward_context import AttentionMetadata

# What a decode padding row holds: its token is stored nowhere (slot -1) and sees one token.
_PADDING_TOKEN = {"input_ids": 0, "positions": 0, "slot_mapping": -1, "window_slot_mapping": -1}
_PADDING_SEQ = {"context_lens": 1, "block_tables": 0, "window_block_tables": 0}


@dataclass
class SeqChunk:
    """The tokens one sequence computes this step: ``token_ids`` at positions from ``start``."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    wants_logits: bool  # the chunk reaches the sequence's end, so its last token is sampled
    window_block_table: list[int] | None = None  # in the sliding layers' own pool (models that mix)


@dataclass
class StepBatch:
    """Everything a tensor-parallel rank needs to run one step's forward pass (sent to workers)."""

    chunks: list[SeqChunk]
    prompt_rows: list[int]  # flat token rows whose logits score prompt tokens (prompt_logprobs)
    # (flat token row, row of the last sampled tokens) of inputs still pending on the host (async scheduling)
    pending_rows: list[tuple[int, int]]
    num_last_sampled: int = 0  # how many tokens the last sampling step gave (rank 0 broadcasts them)


@dataclass
class PreparedStep:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    num_seqs: int


class StepInputs:
    """Host (pinned) and device buffers for up to ``max_num_tokens`` tokens of ``max_num_seqs`` sequences."""

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device, window_pool: bool = False):
        self.block_size = block_size
        self.device = device
        self.window_pool = window_pool  # the sliding layers have their own pool, tables and slots
        pin = device.type == "cuda"
        shapes = {
            "input_ids": ((max_num_tokens,), torch.int64),
            "positions": ((max_num_tokens,), torch.int64),
            "slot_mapping": ((max_num_tokens,), torch.int64),
            "context_lens": ((max_num_seqs,), torch.int32),
            "cu_seqlens_q": ((max_num_seqs + 1,), torch.int32),
            "logits_indices": ((max_num_seqs,), torch.int64),
            "block_tables": ((max_num_seqs, max_blocks_per_seq), torch.int32),
        }
        if window_pool:
            shapes["window_slot_mapping"] = shapes["slot_mapping"]
            shapes["window_block_tables"] = shapes["block_tables"]
        self.host_sets = [{k: torch.zeros(shape, dtype=dt, pin_memory=pin) for k, (shape, dt) in shapes.items()}
                          for _ in range(2)]
        self.host_np_sets = [{k: v.numpy() for k, v in host.items()} for host in self.host_sets]
        self.host = self.host_sets[0]
        self.gpu = {k: torch.zeros(shape, dtype=dt, device=device) for k, (shape, dt) in shapes.items()}

    def prepare(self, chunks: list[SeqChunk], pad_seqs_to: int | None = None,
                max_context_len: int | None = None) -> PreparedStep:
        """Write the chunks' inputs and copy them over. ``pad_seqs_to`` pads a decode batch (one token
        per sequence) to a captured graph's size: padding stores nothing (slot -1) and attends to
        one token. ``max_context_len`` overrides the batch's own (a graph's split count is fixed).
        Positions, slots and block tables are written with numpy over the whole batch, not per
        sequence: a decode step of 256 sequences spent ~0.4 ms of host time in Python loops here."""
        turn = int(self.host is self.host_sets[0])  # the set the step before last used
        self.host, h = self.host_sets[turn], self.host_np_sets[turn]
        num_seqs = len(chunks)
        padded = max(pad_seqs_to or num_seqs, num_seqs)
        lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, num_seqs)
        starts = np.fromiter((c.start for c in chunks), np.int64, num_seqs)
        ends = starts + lens
        cu = np.zeros(padded + 1, np.int64)
        np.cumsum(lens, out=cu[1:num_seqs + 1])
        cu[num_seqs + 1:] = cu[num_seqs] + np.arange(1, padded - num_seqs + 1)  # padding: one token each
        num_tokens = int(cu[num_seqs])
        if num_tokens == num_seqs:  # decode: one token each
            h["input_ids"][:num_seqs] = [c.token_ids[0] for c in chunks]
            positions, rows = starts, np.arange(num_seqs)
        else:
            h["input_ids"][:num_tokens] = list(itertools.chain.from_iterable(c.token_ids for c in chunks))
            rows = np.repeat(np.arange(num_seqs), lens)
            positions = np.arange(num_tokens) - np.repeat(cu[:num_seqs] - starts, lens)
        h["positions"][:num_tokens] = positions
        h["slot_mapping"][:num_tokens] = _slots(h["block_tables"], [c.block_table for c in chunks], rows, positions,
                                                self.block_size)
        if self.window_pool:
            h["window_slot_mapping"][:num_tokens] = _slots(h["window_block_tables"],
                                                           [c.window_block_table for c in chunks], rows, positions,
                                                           self.block_size)
        logits_indices = (cu[1:num_seqs + 1] - 1)[np.fromiter((c.wants_logits for c in chunks), bool, num_seqs)]
        num_logits = len(logits_indices)
        h["logits_indices"][:num_logits] = logits_indices
        h["context_lens"][:num_seqs] = ends
        h["cu_seqlens_q"][: padded + 1] = cu
        if padded > num_seqs:  # decode graph padding: one token each, stored nowhere, seeing one slot
            for name, value in _PADDING_TOKEN.items():
                if name in h:
                    h[name][num_tokens:num_tokens + padded - num_seqs] = value
            h["context_lens"][num_seqs:padded] = _PADDING_SEQ["context_lens"]
            num_tokens += padded - num_seqs
        sizes = {"input_ids": num_tokens, "positions": num_tokens, "slot_mapping": num_tokens,
                 "context_lens": padded, "cu_seqlens_q": padded + 1, "logits_indices": num_logits,
                 "block_tables": padded}
        if self.window_pool:
            sizes |= {"window_slot_mapping": num_tokens, "window_block_tables": padded}
        dev = {k: self.gpu[k][:n].copy_(self.host[k][:n], non_blocking=True) for k, n in sizes.items()}
        metadata = attention_metadata(dev, int(lens.max()), max_context_len or int(ends.max()))
        return PreparedStep(dev["input_ids"], dev["positions"], metadata, dev["logits_indices"], num_seqs)

    def decode_metadata(self, batch_size: int, max_context_len: int) -> AttentionMetadata:
        """The metadata of a decode batch of ``batch_size`` over the device buffers (a graph's capture)."""
        return attention_metadata({k: v[:batch_size + (k == "cu_seqlens_q")] for k, v in self.gpu.items()}, 1,
                                  max_context_len)


def attention_metadata(dev: dict[str, torch.Tensor], max_query_len: int, max_context_len: int) -> AttentionMetadata:
    return AttentionMetadata(dev["slot_mapping"], dev["block_tables"], dev["context_lens"], dev["cu_seqlens_q"],
                             max_query_len, max_context_len, dev.get("window_slot_mapping"),
                             dev.get("window_block_tables"))


def _slots(tables: np.ndarray, block_tables: list[list[int]], rows: np.ndarray, positions: np.ndarray,
           block_size: int) -> np.ndarray:
    """Write each sequence's block table into its row of ``tables``, and return the flat cache
    slot of each token (sequence ``rows``, at ``positions``) through them."""
    widths = np.fromiter(map(len, block_tables), np.int64, len(block_tables))
    flat = np.fromiter(itertools.chain.from_iterable(block_tables), np.int32, int(widths.sum()))
    offsets = np.zeros(len(block_tables), np.int64)
    np.cumsum(widths[:-1], out=offsets[1:])
    table_rows = np.repeat(np.arange(len(block_tables)), widths)
    tables[table_rows, np.arange(len(flat)) - np.repeat(offsets, widths)] = flat
    return tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size


def fill_decode_padding(inputs: StepInputs, batch_size: int) -> None:
    """Make rows [0, batch_size) harmless decode inputs (used before capturing a graph)."""
    for name, value in (_PADDING_TOKEN | _PADDING_SEQ).items():
        if name in inputs.gpu:
            inputs.gpu[name][:batch_size].fill_(value)
    inputs.gpu["cu_seqlens_q"][: batch_size + 1].copy_(torch.arange(batch_size + 1, dtype=torch.int32))

