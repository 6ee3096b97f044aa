"""The driver's side of the model: each scheduled step becomes one batch that every rank runs, then
rank 0 samples and the sampled tokens come back to the host as they arrive.

The driver holds rank 0's ModelRunner and, with ``tensor_parallel_size`` > 1, the WorkerGroup of
the other ranks. It alone turns the scheduler's output into a ``StepBatch`` (the one message the
ranks get), samples, and reads results back. With async
scheduling a step's decode inputs may be tokens the previous step is still sampling: each rank
takes them from its own copy of those tokens on the device (rank 0 broadcasts them).
"""

import dataclasses
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedllm.config import EngineConfig
from pagedllm.engine.request import PENDING_TOKEN, Request
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.errors import RequestError
from pagedllm.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from pagedllm.worker.model_runner import ModelRunner
from pagedllm.worker.sampling_inputs import TokenLogprobs, logprobs_to_host, sampling_metadata, score_prompt_tokens
from pagedllm.worker.step_inputs import SeqChunk, StepBatch
from pagedllm.worker.tensor_parallel import WorkerGroup

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


class Executor:
    """Runs the scheduler's steps on every rank of the model and samples on rank 0."""

    def __init__(self, config: EngineConfig):
        self.config = config
        tp_size = config.tensor_parallel_size
        self.workers = WorkerGroup(config, tp_size) if tp_size > 1 else None
        try:
            self.runner = ModelRunner(config, rank=0)
        except BaseException as err:
            if self.workers is not None:
                failure = self.workers.failure()
                self.workers.shutdown()
                if failure and not isinstance(err, ValueError):  # a ValueError is every rank's own
                    raise RuntimeError(failure) from None
            raise
        if self.workers is not None:
            self.workers.wait_ready()
        generator = torch.Generator(device=self.runner.device)
        if config.seed is None:
            generator.seed()  # a fresh random seed
        else:
            generator.manual_seed(config.seed)
        self.sampler = Sampler(generator)
        self._last_sample_rows: dict[str, int] = {}  # request id -> its row of the last sampled tokens
        self._num_last_sampled = 0
        self._last_sampling: tuple[list[Request], SamplingMetadata] | None = None  # rows and their inputs
        # Also when the script just ends: rank 0 must free its graphs before the ranks can leave together.
        self._finalizer = weakref.finalize(self, _stop_ranks, self.runner, self.workers)

    @property
    def num_kv_blocks(self) -> int:
        return self.runner.num_kv_blocks

    @property
    def sliding_window(self) -> int | None:
        return self.runner.sliding_window

    @property
    def num_window_kv_blocks(self) -> int:
        """Blocks of the sliding layers' own pool (0: they have none)."""
        return self.runner.num_window_kv_blocks

    def shutdown(self) -> None:
        """Free rank 0's model and cache, then stop the other ranks (each frees its own first)."""
        self._finalizer()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, before_sampling: Callable[[], None] | None = None) -> PendingOutput:
        """Start one step on the device: each scheduled request's sampled token (None for a prefill
        chunk that does not reach the end), and logprobs for the requests that ask for them, come
        back through ``PendingOutput.wait``. A decode input that is still ``PENDING_TOKEN`` on the
        host is the token the previous launch sampled for that request, taken on the device.
        ``before_sampling`` runs once the forward pass is launched, before the sampling inputs are
        built (the engine reads the previous step back there, for grammars' masks)."""
        chunks, pending_rows, flat_rows = [], [], 0
        for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True):
            chunk = SeqChunk(r.token_ids[r.num_computed_tokens : r.num_computed_tokens + n], r.num_computed_tokens,
                             r.block_table, r.num_computed_tokens + n == r.num_tokens,
                             r.window_blocks.block_table if r.window_blocks is not None else None)
            chunks.append(chunk)
            flat_rows += n
            if chunk.token_ids[-1] == PENDING_TOKEN:
                pending_rows.append((flat_rows - 1, self._last_sample_rows[r.request_id]))
        prompt_rows, prompt_targets = self._prompt_logprobs(out, chunks)
        batch = StepBatch(chunks, prompt_rows, pending_rows, self._num_last_sampled)
        if self.workers is None:
            logits, prompt_logits = self.runner.run_forward(batch)
        else:
            logits, prompt_logits = self.workers.run(self.runner.run_forward, batch)
        if before_sampling is not None:
            before_sampling()
        result = ModelRunnerOutput([None] * len(chunks))
        if prompt_logits is not None:
            result.prompt_logprobs = score_prompt_tokens(prompt_logits, prompt_targets, out.requests)
        rows = [i for i, chunk in enumerate(chunks) if chunk.wants_logits]  # a row of logits each
        requests = [out.requests[i] for i in rows]
        if not rows:
            return PendingOutput(result, rows, requests, None, None, 0)
        vocab_size = logits.shape[-1]
        pin = self.runner.device.type == "cuda"
        positions = [chunks[i].start + len(chunks[i].token_ids) for i in rows]  # of the tokens sampled
        meta = self._sampling_metadata(requests, positions, vocab_size, pin)
        try:
            sampled = self.sampler(logits, meta)
        except RequestError as err:  # the step is not committed: the other requests run it again
            err.request_id = requests[err.row].request_id
            raise
        # Only now, once the step is sure to be committed: later launches feed these to their pending inputs.
        self.runner.last_sampled = sampled.token_ids
        self._num_last_sampled = len(rows)
        self._last_sample_rows = {request.request_id: row for row, request in enumerate(requests)}
        host = SamplerOutput(**{f.name: _to_host(getattr(sampled, f.name)) for f in dataclasses.fields(sampled)})
        ready = None
        if self.runner.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return PendingOutput(result, rows, requests, host, ready, vocab_size)

    def _sampling_metadata(self, requests: list[Request], positions: list[int], vocab_size: int,
                           pin: bool) -> SamplingMetadata:
        """The rows' sampling inputs: the last step's again where its rows were the same requests in
        the same order and none has inputs that change by the step (a seed's position, a grammar's
        mask, bans, penalties, logits processors), as in a long decode (building them took ~0.25 ms
        of host time a step for 256 rows on a 2-core x86 CPU)."""
        last = self._last_sampling
        if last is not None and last[0] == requests and all(
                r.grammar is None and not r.may_ban and not r.needs_its_tokens and
                (r.sampling_params.seed is None or r.sampling_params.greedy) for r in requests):
            return last[1]
        meta = sampling_metadata(requests, positions, vocab_size, pin=pin)
        self._last_sampling = requests, meta
        return meta

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


def _stop_ranks(runner: ModelRunner, workers: WorkerGroup | None) -> None:
    runner.shutdown()
    if workers is not None:
        workers.shutdown()


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start copying a device tensor into pinned host memory (complete after the step's event)."""
    if t is None or not t.is_cuda:
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
