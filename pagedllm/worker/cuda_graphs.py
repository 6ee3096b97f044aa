"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket, captured at start-up.

A decode step launches hundreds of small kernels; replaying them as one graph removes the
launch overhead that otherwise dominates small batches. A step of n sequences runs in the
smallest captured graph of at least n, its extra rows padded (stored nowhere).
"""

import logging
import time

import torch
import torch.nn as nn

from pagedllm.forward_context import forward_metadata
from pagedllm.worker.step_inputs import StepInputs, fill_decode_padding

logger = logging.getLogger("pagedllm")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: nn.Module, inputs: StepInputs, max_num_seqs: int, max_model_len: int):
        self.inputs = inputs
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        start = time.perf_counter()
        pool = None
        gpu = inputs.gpu
        for batch_size in reversed(self.batch_sizes):  # largest first, so smaller ones reuse its memory
            fill_decode_padding(inputs, batch_size)
            # The split count of decode attention is fixed at capture: size it for the longest context.
            metadata = inputs.decode_metadata(batch_size, max_context_len=max_model_len)
            with forward_metadata(metadata):
                model.compute_logits(model(gpu["input_ids"][:batch_size], gpu["positions"][:batch_size]))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden_states = model(gpu["input_ids"][:batch_size], gpu["positions"][:batch_size])
                    logits = model.compute_logits(hidden_states)
            pool = graph.pool()
            self.graphs[batch_size] = (graph, logits)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes 1 to %d) in %.1f s",
                    len(self.graphs), max_num_seqs, time.perf_counter() - start)

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest captured batch size that holds ``num_seqs`` sequences."""
        for batch_size in self.batch_sizes:
            if batch_size >= num_seqs:
                return batch_size
        return None

    def replay(self, batch_size: int, num_seqs: int) -> torch.Tensor:
        """Run the graph on what the step inputs hold now; logits of the first ``num_seqs`` rows."""
        graph, logits = self.graphs[batch_size]
        graph.replay()
        return logits[:num_seqs]
