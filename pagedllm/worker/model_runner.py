"""Turns a scheduled step into tensors, runs the model over the paged cache, and samples."""

import dataclasses
import gc
import logging
from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed import min_over_ranks
from pagedllm.engine.request import PENDING_TOKEN, Request
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.errors import RequestError
from pagedllm.forward_context import forward_metadata
from pagedllm.layers.attention import select_attention_backend
from pagedllm.layers.sampler import Sampler, SamplerOutput, index_tensor
from pagedllm.models.weights import build_model
from pagedllm.worker.cuda_graphs import DecodeGraphs
from pagedllm.worker.kv_cache import (
    GiB,
    allocate_kv_cache,
    attention_layers,
    cache_geometry,
    cpu_num_blocks,
    gpu_num_blocks,
    release_kv_cache,
)
from pagedllm.worker.sampling_inputs import TokenLogprobs, logprobs_to_host, sampling_metadata, score_prompt_tokens
from pagedllm.worker.step_inputs import SeqChunk, StepBatch, StepInputs
from pagedllm.worker.tensor_parallel import WorkerGroup, rank_device

logger = logging.getLogger("pagedllm")



@dataclass
class ModelRunnerOutput:
    sampled_token_ids: list[int | None]  # per scheduled request; None for a prefill chunk
    token_logprobs: list[float | None] | None = None  # per scheduled request: its sampled token's logprob
    logprobs: list[TokenLogprobs | None] | None = None  # per scheduled request, when any asked
    # scheduled request's row -> logprobs of the next prompt tokens it scored this step
    prompt_logprobs: dict[int, list[TokenLogprobs]] | None = None


@dataclass
class PendingOutput:
    """A launched step: its sampled tokens (and logprobs) on their way to pinned host memory.
    ``wait`` blocks only on this step's own copy, not on steps launched after it."""

    result: ModelRunnerOutput  # prompt logprobs already filled in
    rows: list[int]  # the scheduled request (chunk) of each sampled row
    requests: list[Request]  # the request of each sampled row
    sampled: SamplerOutput | None  # host copies, complete once ``ready`` has passed
    ready: torch.cuda.Event | None
    vocab_size: int

    def wait(self) -> ModelRunnerOutput:
        result = self.result
        if self.sampled is None:
            return result
        if self.ready is not None:
            self.ready.synchronize()
        token_ids = self.sampled.token_ids.tolist()
        row_logprobs = [None] * len(self.rows)
        if self.sampled.top_ids is not None:
            row_logprobs = logprobs_to_host(self.sampled, token_ids, self.requests, self.vocab_size)
            result.logprobs = [None] * len(result.sampled_token_ids)
        result.token_logprobs = [None] * len(result.sampled_token_ids)
        token_logprobs = self.sampled.sampled_logprobs.tolist()
        for chunk_index, token_id, token_logprob, top in zip(self.rows, token_ids, token_logprobs, row_logprobs,
                                                             strict=True):
            result.sampled_token_ids[chunk_index] = token_id
            result.token_logprobs[chunk_index] = token_logprob
            if result.logprobs is not None:
                result.logprobs[chunk_index] = top
        return result


class ModelRunner:
    """One rank's model, KV cache and step inputs. Rank 0 (the driver's) also samples and, with
    ``tensor_parallel_size`` > 1, starts the other ranks' workers and sends them every step."""

    def __init__(self, config: EngineConfig, rank: int = 0):
        self.config = config
        tp_size = config.tensor_parallel_size
        self.device = torch.device(config.device) if tp_size == 1 else rank_device(config.device, rank)
        self.block_size = config.block_size
        self.rank = rank
        self.workers = WorkerGroup(config, tp_size) if rank == 0 and tp_size > 1 else None
        try:
            self._build(config)
        except BaseException as err:
            if self.workers is not None:
                failure = self.workers.failure()
                self.workers.shutdown()
                if failure and not isinstance(err, ValueError):  # a ValueError is every rank's own
                    raise RuntimeError(failure) from None
            raise
        if self.workers is not None:
            self.workers.wait_ready()

    def _build(self, config: EngineConfig) -> None:
        self.model, self.checkpoint_bytes_read = build_model(config, self.device, self.rank)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.attention_backend = select_attention_backend(self.device)
        for attn in attention_layers(self.model):
            attn.backend = self.attention_backend
        self.geometry = cache_geometry(self.model, config.block_size, config.dtype)
        max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self.inputs = StepInputs(max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs,
                                 max_blocks_per_seq, config.block_size, self.device)
        self.decode_graphs: DecodeGraphs | None = None  # captured once the KV cache exists
        self.num_kv_blocks = config.num_kv_blocks or self._profile_num_blocks()
        self.kv_cache = allocate_kv_cache(self.model, self.geometry, self.num_kv_blocks, self.device)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.decode_graphs = DecodeGraphs(self.model, self.inputs, config.max_num_seqs, config.max_model_len)
        generator = torch.Generator(device=self.device)
        if config.seed is None:
            generator.seed()  # a fresh random seed
        else:
            generator.manual_seed(config.seed)
        self.sampler = Sampler(generator)
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own generators
        self._last_sampled: torch.Tensor | None = None  # the last launch's sampled tokens, on the device
        self._last_sample_rows: dict[str, int] = {}  # request id -> its row there

    def shutdown(self) -> None:
        """Release the graphs, the KV cache and the weights, stop the workers, and return the memory
        to the device. The graphs go first: NCCL cannot tear down a communicator that captured
        graphs still use (every rank does the same before leaving the group)."""
        self.decode_graphs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.workers is not None:
            self.workers.shutdown()
        release_kv_cache(self.model)
        self.kv_cache = self.model = self.inputs = self._last_sampled = None
        self.generators.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> PendingOutput:
        """Start one step on the device: each scheduled request's sampled token (None for a prefill
        chunk that does not reach the end), and logprobs for the requests that ask for them, come
        back through ``PendingOutput.wait``. A decode input that is still ``PENDING_TOKEN`` on the
        host is the token the previous launch sampled for that request, taken on the device."""
        for request_id in out.finished_request_ids:
            self.generators.pop(request_id, None)
        chunks, pending_rows, flat_rows = [], [], 0
        for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True):
            chunk = SeqChunk(r.token_ids[r.num_computed_tokens : r.num_computed_tokens + n], r.num_computed_tokens,
                             r.block_table, r.num_computed_tokens + n == r.num_tokens)
            chunks.append(chunk)
            flat_rows += n
            if chunk.token_ids[-1] == PENDING_TOKEN:
                pending_rows.append((flat_rows - 1, self._last_sample_rows[r.request_id]))
        prompt_rows, prompt_targets = self._prompt_logprobs(out, chunks)
        batch = StepBatch(chunks, prompt_rows, pending_rows)
        if self.workers is None:
            logits, prompt_logits = self.run_forward(batch)
        else:
            logits, prompt_logits = self.workers.run(self.run_forward, batch)
        result = ModelRunnerOutput([None] * len(chunks))
        if prompt_logits is not None:
            result.prompt_logprobs = score_prompt_tokens(prompt_logits, prompt_targets, out.requests)
        rows = [i for i, chunk in enumerate(chunks) if chunk.wants_logits]  # a row of logits each
        requests = [out.requests[i] for i in rows]
        self._last_sample_rows = {request.request_id: row for row, request in enumerate(requests)}
        if not rows:
            return PendingOutput(result, rows, requests, None, None, 0)
        vocab_size = logits.shape[-1]
        meta = sampling_metadata(requests, vocab_size, self._generators(requests), pin=self.device.type == "cuda")
        try:
            sampled = self.sampler(logits, meta)
        except RequestError as err:  # the step is not committed: the other requests run it again
            err.request_id = requests[err.row].request_id
            raise
        self._last_sampled = sampled.token_ids
        host = SamplerOutput(**{f.name: _to_host(getattr(sampled, f.name)) for f in dataclasses.fields(sampled)})
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return PendingOutput(result, rows, requests, host, ready, vocab_size)

    @torch.inference_mode()
    def run_forward(self, batch: StepBatch):
        """What every rank runs each step: the forward pass."""
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
        if pending_rows:
            flat_rows, sampled_rows = zip(*pending_rows, strict=True)
            sampled = self._last_sampled[index_tensor(sampled_rows, self.device)]
            self.inputs.gpu["input_ids"][index_tensor(flat_rows, self.device)] = sampled

    def _prompt_logprobs(self, out: SchedulerOutput, chunks: list[SeqChunk]):
        """For requests asking for prompt logprobs: the flat rows whose logits predict a prompt
        token not yet scored, and per such row (scheduled request, prompt token it predicts)."""
        rows, targets, start = [], [], 0
        for index, (request, chunk) in enumerate(zip(out.requests, chunks, strict=True)):
            if request.wants_prompt_logprobs:
                for offset in range(len(chunk.token_ids)):
                    position = chunk.start + offset  # its logits predict token position + 1
                    if len(request.prompt_logprobs) <= position < request.num_prompt_tokens - 1:
                        rows.append(start + offset)
                        targets.append((index, request.prompt_token_ids[position + 1]))
            start += len(chunk.token_ids)
        return rows, targets

    def _generators(self, requests: list[Request]) -> dict[int, torch.Generator]:
        """Row -> the generator of each seeded request (sample i of a group draws from seed + i),
        kept until the request finishes."""
        generators = {}
        for row, request in enumerate(requests):
            seed = request.sampling_params.seed
            if seed is not None and not request.sampling_params.greedy:
                if request.request_id not in self.generators:
                    generator = torch.Generator(device=self.device).manual_seed(seed + request.sample_index)
                    self.generators[request.request_id] = generator
                generators[row] = self.generators[request.request_id]
        return generators

    def _profile_num_blocks(self) -> int:
        """KV blocks that fit beside the weights and the largest step's activations; says how it
        decided, and fails if not even one sequence of max_model_len fits."""
        cfg = self.config
        blocks_per_seq = -(-cfg.max_model_len // self.block_size)
        if self.device.type == "cpu":
            num_blocks = cpu_num_blocks(self.geometry, cfg.max_num_seqs * blocks_per_seq)
            budget = f"{num_blocks * self.geometry.bytes_per_block / GiB:.2f} GiB of host memory"
        else:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            temporary_cache_bytes = self._dummy_run()
            torch.cuda.synchronize(self.device)
            activation_peak = torch.cuda.max_memory_allocated(self.device) - self.weight_bytes - temporary_cache_bytes
            torch.cuda.empty_cache()
            num_blocks, budget = gpu_num_blocks(self.geometry, cfg.gpu_memory_utilization, self.weight_bytes,
                                                max(activation_peak, 0))
        num_blocks = min_over_ranks(num_blocks, cfg.tensor_parallel_size)
        fits = num_blocks // blocks_per_seq
        per_rank = f" (on each of {cfg.tensor_parallel_size} ranks)" if cfg.tensor_parallel_size > 1 else ""
        logger.info("KV cache%s: %s -> %d blocks of %d tokens (%d tokens); %d sequences of max_model_len %d fit at "
                    "once", per_rank, budget, num_blocks, self.block_size, num_blocks * self.block_size, fits,
                    cfg.max_model_len)
        if fits < 1:
            raise ValueError(
                f"the KV cache holds {num_blocks * self.block_size} tokens, fewer than one sequence of "
                f"max_model_len={cfg.max_model_len}: lower max_model_len, or give the cache more memory "
                "(gpu_memory_utilization, or PAGEDLLM_CPU_KVCACHE_SPACE on the CPU)"
            )
        return num_blocks

    @torch.inference_mode()
    def _dummy_run(self) -> int:
        """The largest step the scheduler can build: max_num_batched_tokens prompt tokens over as
        many sequences as may run (the most logits), over a cache just large enough. Returns the
        temporary cache's bytes."""
        cfg = self.config
        num_seqs = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
        num_tokens = min(cfg.max_num_batched_tokens, num_seqs * cfg.max_model_len)
        lengths = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        chunks, next_block = [], 0
        for length in lengths:
            blocks = -(-length // self.block_size)
            chunks.append(SeqChunk([0] * length, 0, list(range(next_block, next_block + blocks)), True))
            next_block += blocks
        cache = allocate_kv_cache(self.model, self.geometry, next_block, self.device)
        try:
            self._forward(chunks)
        finally:
            release_kv_cache(self.model)
        return cache.numel() * cache.element_size()


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start copying a device tensor into pinned host memory (complete after the step's event)."""
    if t is None or not t.is_cuda:
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
