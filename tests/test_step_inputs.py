"""The model runner's step inputs: flat batch layout, and the padding that decode graphs replay."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.worker.cuda_graphs import graph_batch_sizes
from pagedllm.worker.step_inputs import SeqChunk, StepInputs


def test_graph_buckets_cover_every_batch_size():
    assert graph_batch_sizes(256)[:6] == [1, 2, 4, 8, 16, 32] and graph_batch_sizes(256)[-1] == 256
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(1) == [1]


def test_mixed_prefill_and_decode_batch_layout():
    inputs = StepInputs(max_num_tokens=64, max_num_seqs=8, max_blocks_per_seq=4, block_size=4,
                        device=torch.device("cpu"))
    chunks = [SeqChunk([7], 5, [3, 9], True),  # decode at position 5: block 9, slot 1
              SeqChunk([1, 2, 3], 4, [0, 6, 2], False)]  # prefill chunk over a 4-token prefix
    step = inputs.prepare(chunks)
    assert step.input_ids.tolist() == [7, 1, 2, 3]
    assert step.positions.tolist() == [5, 4, 5, 6]
    assert step.metadata.slot_mapping.tolist() == [37, 24, 25, 26]
    assert step.metadata.context_lens.tolist() == [6, 7]
    assert step.metadata.cu_seqlens_q.tolist() == [0, 1, 4]
    assert step.metadata.block_tables[:, :3].tolist() == [[3, 9, 0], [0, 6, 2]]
    assert step.logits_indices.tolist() == [0]
    assert (step.metadata.max_query_len, step.metadata.max_context_len) == (3, 7)


def test_decode_padding_stores_nothing_and_sees_one_token():
    inputs = StepInputs(max_num_tokens=16, max_num_seqs=8, max_blocks_per_seq=2, block_size=4,
                        device=torch.device("cpu"))
    step = inputs.prepare([SeqChunk([5], 2, [1], True), SeqChunk([6], 0, [3], True)], pad_seqs_to=4,
                          max_context_len=8)
    assert step.metadata.slot_mapping.tolist() == [6, 12, -1, -1]
    assert step.metadata.context_lens.tolist() == [3, 1, 1, 1]
    assert step.input_ids.tolist() == [5, 6, 0, 0]
    assert step.metadata.max_context_len == 8 and step.num_seqs == 2


def reference_inputs(chunks: list[SeqChunk], block_size: int, padded: int) -> dict[str, list]:
    """The step's inputs written out one sequence and one token at a time."""
    ids, positions, slots, window_slots, lens, cu, logits = [], [], [], [], [], [0], []
    for chunk in chunks:
        for offset, token in enumerate(chunk.token_ids):
            p = chunk.start + offset
            ids.append(token)
            positions.append(p)
            slots.append(chunk.block_table[p // block_size] * block_size + p % block_size)
            if chunk.window_block_table is not None:
                window_slots.append(chunk.window_block_table[p // block_size] * block_size + p % block_size)
        lens.append(chunk.start + len(chunk.token_ids))
        cu.append(cu[-1] + len(chunk.token_ids))
        if chunk.wants_logits:
            logits.append(cu[-1] - 1)
    extra = padded - len(chunks)
    return {"input_ids": ids + [0] * extra, "positions": positions + [0] * extra, "slot_mapping": slots + [-1] * extra,
            "window_slot_mapping": window_slots + [-1] * extra if window_slots else None,
            "context_lens": lens + [1] * extra, "cu_seqlens_q": cu + list(range(cu[-1] + 1, cu[-1] + 1 + extra)),
            "logits_indices": logits}


@st.composite
def step_batches(draw):
    """A batch of decode and prefill chunks (or decode only, padded to a graph's size), each with a
    block table covering its tokens and some blocks past them (-1: released out of a window), and
    with a second pool's tables or not."""
    block_size = draw(st.sampled_from([1, 4, 16]))
    decode_only, window = draw(st.booleans()), draw(st.booleans())
    chunks = []
    for _ in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, 40))
        n = 1 if decode_only else draw(st.integers(1, 12))
        blocks = -(-(start + n) // block_size) + draw(st.integers(0, 2))
        table = draw(st.lists(st.integers(0, 500), min_size=blocks, max_size=blocks))
        released = min(draw(st.integers(0, 2)), start // block_size)
        table[:released] = [-1] * released
        chunks.append(SeqChunk(draw(st.lists(st.integers(0, 99), min_size=n, max_size=n)), start, table,
                               decode_only or draw(st.booleans()), [b + 1000 for b in table] if window else None))
    pad_to = len(chunks) + draw(st.integers(0, 3)) if decode_only else None
    return block_size, chunks, pad_to


@given(step_batches())
@settings(max_examples=200, deadline=None)
def test_prepared_inputs_equal_the_one_token_at_a_time_reference(batch):
    block_size, chunks, pad_to = batch
    window = chunks[0].window_block_table is not None
    inputs = StepInputs(max_num_tokens=96, max_num_seqs=12, max_blocks_per_seq=64, block_size=block_size,
                        device=torch.device("cpu"), window_pool=window)
    inputs.prepare([SeqChunk([1] * 3, 0, [7] * 64, True, [7] * 64 if window else None)] * 5)  # stale rows, both sets
    inputs.prepare([SeqChunk([1] * 3, 0, [7] * 64, True, [7] * 64 if window else None)] * 5)
    step = inputs.prepare(chunks, pad_seqs_to=pad_to)
    padded = pad_to or len(chunks)
    want = reference_inputs(chunks, block_size, padded)
    meta = step.metadata
    got = {"input_ids": step.input_ids, "positions": step.positions, "slot_mapping": meta.slot_mapping,
           "window_slot_mapping": meta.window_slot_mapping, "context_lens": meta.context_lens,
           "cu_seqlens_q": meta.cu_seqlens_q, "logits_indices": step.logits_indices}
    for name, values in want.items():
        assert (got[name].tolist() if got[name] is not None else None) == values, name
    for row, chunk in enumerate(chunks):
        assert meta.block_tables[row, :len(chunk.block_table)].tolist() == chunk.block_table
        if window:
            assert meta.window_block_tables[row, :len(chunk.window_block_table)].tolist() == chunk.window_block_table
    assert meta.max_query_len == max(len(c.token_ids) for c in chunks)
    assert meta.max_context_len == max(c.start + len(c.token_ids) for c in chunks)
    assert step.num_seqs == len(chunks)
