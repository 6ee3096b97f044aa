"""The model runner's step inputs: flat batch layout, and the padding that decode graphs replay."""

import torch

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
