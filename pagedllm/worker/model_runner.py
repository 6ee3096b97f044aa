"""One rank's model over its paged KV cache: turns a step's batch into tensors and runs the forward pass."""

import gc
import itertools
import logging

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed import broadcast_from_driver, enable_symmetric_all_reduce, min_over_ranks, rank_device
from pagedllm.engine.block_manager import window_pool_blocks
from pagedllm.forward_context import forward_metadata
from pagedllm.layers.attention import select_attention_backend
from pagedllm.layers.sampler import index_tensor, profile_sampler
from pagedllm.models.weights import build_model
from pagedllm.worker.cuda_graphs import DecodeGraphs
from pagedllm.worker.kv_cache import (
    allocate_kv_cache,
    attention_layers,
    check_fixed_cache,
    cpu_kv_budget,
    gpu_kv_budget,
    kv_pools,
    release_kv_cache,
    split_between_pools,
)
from pagedllm.worker.step_inputs import SeqChunk, StepBatch, StepInputs

logger = logging.getLogger("pagedllm")


class ModelRunner:
    """One rank of the model: its shard of the weights, its KV cache, its step inputs and decode
    graphs. Every rank runs the same ``run_forward`` on the same ``StepBatch`` each step, meeting
    the others in the layers' collectives; rank 0's lives in the driver's process (``Executor``),
    the others' in workers (``tensor_parallel``)."""

    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config = config
        self.tp_size = config.tensor_parallel_size
        self.device = torch.device(config.device) if self.tp_size == 1 else rank_device(config.device, rank)
        config.check_fp8_device(self.device)
        self.block_size = config.block_size
        self.rank = rank
        self.last_sampled: torch.Tensor | None = None  # the last sampled tokens, on the device (set by rank 0)
        self.model, self.checkpoint_bytes_read = build_model(config, self.device, self.rank)
        if self.tp_size > 1 and not config.disable_custom_all_reduce:
            enable_symmetric_all_reduce(config.dtype, self.device)  # before the graphs capture the all-reduces
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.attention_backend = select_attention_backend(self.device)
        for attn in attention_layers(self.model):
            attn.backend = self.attention_backend
        self.pools = kv_pools(self.model, config.block_size, config.kv_cache_torch_dtype)
        self.geometry = self.pools.geometry
        max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self.inputs = StepInputs(max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs,
                                 max_blocks_per_seq, config.block_size, self.device,
                                 window_pool=bool(self.pools.window_layers))
        self.decode_graphs: DecodeGraphs | None = None  # captured once the KV cache exists
        self.kv_cache_budget: str | None = None  # how the profile sized the cache (benchmarks record it)
        if config.num_kv_blocks:
            self.num_kv_blocks = config.num_kv_blocks
            self.num_window_kv_blocks = min(self._max_useful_window_blocks(), config.num_kv_blocks)
            check_fixed_cache(self.num_kv_blocks, self.num_window_kv_blocks, self.pools, self.device)
        else:
            self.num_kv_blocks, self.num_window_kv_blocks = self._profile_num_blocks()
        self.kv_cache = allocate_kv_cache(self.pools.layers, self.geometry, self.num_kv_blocks, self.device)
        self.window_kv_cache = (allocate_kv_cache(self.pools.window_layers, self.pools.window_geometry,
                                                  self.num_window_kv_blocks, self.device)
                                if self.pools.window_layers else None)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.decode_graphs = DecodeGraphs(self.model, self.inputs, config.max_num_seqs, config.max_model_len)

    def shutdown(self) -> None:
        """Release the graphs, the KV cache and the weights, and return the memory to the device.
        The graphs go first: NCCL cannot tear down a communicator that captured graphs still use.
        The weights' storage is freed here, not left to the collector: an engine in a reference
        cycle is shut down by the collector itself (its finalizer), and a model freed then would
        wait for the next collection, holding its memory from the next ``LLM``."""
        self.decode_graphs = None
        on_gpu = self.device.type == "cuda"
        if on_gpu:  # graphs a cycle holds let their memory pools go now (a full collection: ~0.3-1 s in a big heap)
            gc.collect()
            torch.cuda.synchronize(self.device)
        release_kv_cache(self.model)
        for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        self.kv_cache = self.window_kv_cache = self.model = self.inputs = self.last_sampled = None
        if on_gpu:  # what cycles still hold goes back to the device now, not at some later collection
            gc.collect()
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def run_forward(self, batch: StepBatch):
        """What every rank runs each step: the forward pass. Inputs still pending on the host are
        the last sampled tokens, which rank 0 broadcasts first (on the device: no rank waits)."""
        if batch.pending_rows and self.tp_size > 1:
            if self.rank != 0:
                self.last_sampled = torch.empty(batch.num_last_sampled, dtype=torch.int64, device=self.device)
            broadcast_from_driver(self.last_sampled)
        return self._forward(batch.chunks, batch.prompt_rows, batch.pending_rows)

    def _forward(self, chunks: list[SeqChunk], extra_rows: list[int] | None = None,
                 pending_rows: list[tuple[int, int]] | None = None):
        """Logits ``[chunks wanting logits, vocab]`` of one flat, unpadded batch (a decode batch
        replays a CUDA graph, padded to its size), and the logits at the flat token rows
        ``extra_rows`` (prompt logprobs; None when none are asked for). ``pending_rows``: (flat
        token row, row of the last launch's sampled tokens) of each input still pending."""
        is_decode = all(len(c.token_ids) == 1 and c.wants_logits for c in chunks)
        graph_size = self.decode_graphs.bucket(len(chunks)) if self.decode_graphs and is_decode else None
        if graph_size is not None and not extra_rows:
            self.inputs.prepare(chunks, pad_seqs_to=graph_size, max_context_len=self.config.max_model_len)
            self._feed_pending_inputs(pending_rows)
            return self.decode_graphs.replay(graph_size, len(chunks)), None
        step = self.inputs.prepare(chunks)
        self._feed_pending_inputs(pending_rows)
        with forward_metadata(step.metadata):
            hidden_states = self.model(step.input_ids, step.positions)
        logits = self.model.compute_logits(hidden_states[step.logits_indices])
        if not extra_rows:
            return logits, None
        return logits, self.model.compute_logits(hidden_states[index_tensor(extra_rows, self.device)])

    def _feed_pending_inputs(self, pending_rows: list[tuple[int, int]] | None) -> None:
        """Write the tokens the last launch sampled into the input rows that wait for them."""
        if not pending_rows:
            return
        flat_rows, sampled_rows = zip(*pending_rows, strict=True)
        n, input_ids = len(flat_rows), self.inputs.gpu["input_ids"]
        if flat_rows == sampled_rows == tuple(range(n)):
            input_ids[:n] = self.last_sampled[:n]  # a decode batch as the last one was: one copy, no indices
            return
        rows = index_tensor(flat_rows + sampled_rows, self.device)  # (one copy to the device for both)
        input_ids[rows[:n]] = self.last_sampled[rows[n:]]

    @property
    def sliding_window(self) -> int | None:
        """The window of the layers whose blocks the engine releases as they slide out of it."""
        return self.pools.sliding_window

    def _max_useful_window_blocks(self) -> int:
        cfg = self.config
        if not self.pools.window_layers:
            return 0
        return window_pool_blocks(self.pools.sliding_window, self.block_size, cfg.max_num_seqs,
                                  cfg.max_num_batched_tokens)

    def _profile_num_blocks(self) -> tuple[int, int]:
        """KV blocks that fit beside the weights and the largest step's activations (and of the
        sliding layers' pool, where they have one); says how it decided, and fails if not even
        one sequence of max_model_len fits."""
        cfg = self.config
        blocks_per_seq = -(-cfg.max_model_len // self.block_size)
        if self.device.type == "cpu":
            budget_bytes, budget = cpu_kv_budget()
            max_useful = cfg.max_num_seqs * blocks_per_seq  # host memory is not reserved past use
        else:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            temporary_cache_bytes = self._dummy_run()
            torch.cuda.synchronize(self.device)
            activation_peak = torch.cuda.max_memory_allocated(self.device) - self.weight_bytes - temporary_cache_bytes
            torch.cuda.empty_cache()
            budget_bytes, budget = gpu_kv_budget(cfg.gpu_memory_utilization, self.weight_bytes, max(activation_peak, 0))
            max_useful = 1 << 62
        num_blocks, num_window_blocks = split_between_pools(budget_bytes, self.pools, max_useful,
                                                            self._max_useful_window_blocks())
        num_blocks = min_over_ranks(num_blocks, cfg.tensor_parallel_size)
        num_window_blocks = min_over_ranks(num_window_blocks, cfg.tensor_parallel_size)
        fits = num_blocks // blocks_per_seq
        self.kv_cache_budget = budget
        per_rank = f" (on each of {cfg.tensor_parallel_size} ranks)" if cfg.tensor_parallel_size > 1 else ""
        window = (f"; the {len(self.pools.window_layers)} sliding layers' own pool {num_window_blocks} blocks "
                  f"(window {self.pools.sliding_window})" if self.pools.window_layers else "")
        logger.info("KV cache%s: %s -> %d blocks of %d tokens (%d tokens); %d sequences of max_model_len %d fit at "
                    "once%s", per_rank, budget, num_blocks, self.block_size, num_blocks * self.block_size, fits,
                    cfg.max_model_len, window)
        if fits < 1:
            raise ValueError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, fewer than one sequence of "
                f"max_model_len={cfg.max_model_len}: lower max_model_len, or give the cache more memory "
                "(gpu_memory_utilization, or PAGEDLLM_CPU_KVCACHE_SPACE on the CPU)"
            )
        return num_blocks, num_window_blocks

    @torch.inference_mode()
    def _dummy_run(self) -> int:
        """The largest step the scheduler can build: max_num_batched_tokens prompt tokens over as
        many sequences as may run (the most logits), over a cache just large enough, and its
        logits sampled as the costliest step could; then the longest context's last chunk, so that
        every kernel variant a step can choose is compiled. Returns the temporary cache's bytes."""
        cfg = self.config
        num_seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        num_tokens = min(cfg.max_num_batched_tokens, num_seqs * cfg.max_model_len)
        lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        chunks, next_block = [], 0
        for length in lengths:
            blocks = -(-length // self.block_size)
            table = list(range(next_block, next_block + blocks))
            chunks.append(SeqChunk([0] * length, 0, table, True, table if self.pools.window_layers else None))
            next_block += blocks
        caches = [allocate_kv_cache(self.pools.layers, self.geometry, next_block, self.device)]
        if self.pools.window_layers:
            caches.append(allocate_kv_cache(self.pools.window_layers, self.pools.window_geometry, next_block,
                                            self.device))
        try:
            logits, _ = self._forward(chunks)
            if self.rank == 0:  # the one rank that samples
                profile_sampler(logits, cfg.max_logprobs)
            # The last chunk of a max_model_len sequence (every block of it the same one): attention's
            # kernels for long contexts compile now, not at a user's first long prompt.
            length = min(cfg.max_model_len, cfg.max_num_batched_tokens, 512)
            table = [0] * -(-cfg.max_model_len // self.block_size)
            self._forward([SeqChunk([0] * length, cfg.max_model_len - length, table, True,
                                    table if self.pools.window_layers else None)])
        finally:
            release_kv_cache(self.model)
        return sum(cache.numel() * cache.element_size() for cache in caches)

