"""Turns a scheduled step into tensors, runs the model over the paged cache, and samples."""

from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.request import Request
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.forward_context import AttentionMetadata, forward_metadata
from pagedllm.layers.attention import select_attention_backend
from pagedllm.layers.sampler import Sampler, SamplingMetadata
from pagedllm.models.weights import build_model
from pagedllm.worker.kv_cache import (
    allocate_kv_cache,
    attention_layers,
    cache_geometry,
    cpu_num_blocks,
    gpu_num_blocks,
    release_kv_cache,
)


@dataclass
class SeqChunk:
    """The tokens one sequence computes this step: ``token_ids`` at positions from ``start``."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    wants_logits: bool  # the chunk reaches the sequence's end, so its last token is sampled


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = build_model(config)
        self.attention_backend = select_attention_backend(self.device)
        for attn in attention_layers(self.model):
            attn.backend = self.attention_backend
        self.geometry = cache_geometry(self.model, config.block_size, config.dtype)
        self.num_kv_blocks = config.num_kv_blocks or self._profile_num_blocks()
        self.kv_cache = allocate_kv_cache(self.model, self.geometry, self.num_kv_blocks, self.device)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own generators

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[int | None]:
        """Run one step; return each scheduled request's sampled token (None: prefill chunk)."""
        for request_id in out.finished_request_ids:
            self.generators.pop(request_id, None)
        chunks = [
            SeqChunk(r.token_ids[r.num_computed_tokens : r.num_computed_tokens + n], r.num_computed_tokens,
                     r.block_table, r.num_computed_tokens + n == r.num_tokens)
            for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)
        ]
        logits = self._forward(chunks)
        sampling = [r for r, c in zip(out.requests, chunks, strict=True) if c.wants_logits]
        tokens = iter(self.sampler(logits, self._sampling_metadata(sampling)).tolist()) if sampling else None
        return [next(tokens) if c.wants_logits else None for c in chunks]

    def _forward(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Logits ``[num_chunks_wanting_logits, vocab]`` of one flat, unpadded batch."""
        input_ids, positions, slot_mapping, context_lens, cu_seqlens_q, logits_indices = [], [], [], [], [0], []
        bs = self.block_size
        for chunk in chunks:
            end = chunk.start + len(chunk.token_ids)
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, end))
            table = chunk.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(chunk.start, end))
            context_lens.append(end)
            cu_seqlens_q.append(cu_seqlens_q[-1] + len(chunk.token_ids))
            if chunk.wants_logits:
                logits_indices.append(cu_seqlens_q[-1] - 1)
        max_blocks = max(len(c.block_table) for c in chunks)
        block_tables = [c.block_table + [0] * (max_blocks - len(c.block_table)) for c in chunks]

        def tensor(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=tensor(slot_mapping, torch.int64),
            block_tables=tensor(block_tables),
            context_lens=tensor(context_lens),
            cu_seqlens_q=tensor(cu_seqlens_q),
            max_query_len=max(len(c.token_ids) for c in chunks),
            max_context_len=max(context_lens),
        )
        with forward_metadata(meta):
            hidden_states = self.model(tensor(input_ids, torch.int64), tensor(positions, torch.int64))
        return self.model.compute_logits(hidden_states[tensor(logits_indices, torch.int64)])

    def _sampling_metadata(self, requests: list[Request]) -> SamplingMetadata:
        params = [r.sampling_params for r in requests]
        generators = {}
        for row, request in enumerate(requests):
            seed = request.sampling_params.seed
            if seed is not None and not request.sampling_params.greedy:
                if request.request_id not in self.generators:
                    self.generators[request.request_id] = torch.Generator(device=self.device).manual_seed(seed)
                generators[row] = self.generators[request.request_id]
        banned = [r.tokens_banned_now() for r in requests]
        return SamplingMetadata(
            temperatures=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_ks=torch.tensor([p.top_k for p in params]) if any(p.top_k > 0 for p in params) else None,
            top_ps=torch.tensor([p.top_p for p in params]) if any(p.top_p < 1 for p in params) else None,
            generators=generators,
            all_greedy=all(p.greedy for p in params),
            banned_token_ids=banned if any(banned) else None,
        )

    def _profile_num_blocks(self) -> int:
        """KV blocks that fit beside the weights and the largest step's activations."""
        max_useful = self.config.max_num_seqs * -(-self.config.max_model_len // self.block_size)
        if self.device.type == "cpu":
            return cpu_num_blocks(self.geometry, max_useful)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._dummy_run()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        return gpu_num_blocks(self.geometry, self.config.gpu_memory_utilization, peak)

    @torch.inference_mode()
    def _dummy_run(self) -> None:
        """The largest step the scheduler can build: max_num_batched_tokens prompt tokens over as
        many sequences as may run (the most logits), over a cache just large enough."""
        cfg = self.config
        num_seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        num_tokens = min(cfg.max_num_batched_tokens, num_seqs * cfg.max_model_len)
        lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        chunks, next_block = [], 0
        for length in lengths:
            blocks = -(-length // self.block_size)
            chunks.append(SeqChunk([0] * length, 0, list(range(next_block, next_block + blocks)), True))
            next_block += blocks
        allocate_kv_cache(self.model, self.geometry, next_block, self.device)
        try:
            self._forward(chunks)
        finally:
            release_kv_cache(self.model)
