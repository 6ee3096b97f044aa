"""The engine loop's one step: schedule, run the model, update, and report finished requests."""

import logging
import os
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from pagedllm.config import EngineConfig
from pagedllm.engine.block_manager import BlockManager, CacheCapacity, HybridBlockManager
from pagedllm.engine.detokenizer import stop_string_hit
from pagedllm.engine.outputs import OutputBuilder
from pagedllm.engine.progress import ProgressReport
from pagedllm.engine.request import Request, SampleGroup, SamplingTensors
from pagedllm.engine.request_checks import (
    bad_word_token_ids,
    max_output_tokens,
    stop_token_ids,
    truncated_prompt,
    validate_request,
)
from pagedllm.engine.scheduler import Scheduler, SchedulerOutput
from pagedllm.engine.structured_output import GrammarCompiler, SampleGrammar
from pagedllm.errors import ClientFault, RequestError
from pagedllm.metrics import EngineStats
from pagedllm.outputs import RequestOutput
from pagedllm.reasoning import AnswerStart, parser_for
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from pagedllm.worker.executor import PendingOutput

logger = logging.getLogger("pagedllm")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from pagedllm.worker.executor import Executor  # torch-heavy; the engine itself is not

        self.config = config
        self.tokenizer = load_tokenizer(config)
        # What a step reports of a request: its RequestOutput; an engine process's driver builds those
        # itself, from the progress reports (pagedllm.engine.progress) its engine process swaps in here
        self.outputs: OutputBuilder | ProgressReport = OutputBuilder(self.tokenizer)
        self.eos_token_ids = eos_token_ids(config, self.tokenizer)
        self.default_sampling_fields = generation_defaults(config)
        self.grammars = GrammarCompiler(self.tokenizer, config.hf_config.vocab_size, self.eos_token_ids)
        # where a reasoning model's answer starts: a request's grammar constrains only its answer
        # (a gpt-oss model's is harmony's without a flag, as the server reads its answers)
        parser = parser_for(config.reasoning_parser, config.hf_config.model_type, self.tokenizer)
        self.answer_start = AnswerStart.of(self.tokenizer, parser) if parser else None
        self.executor = Executor(config)
        self.block_manager, self.cache_capacity = block_pools(config, self.executor.num_kv_blocks,
                                                             self.executor.num_window_kv_blocks,
                                                             self.executor.sliding_window)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        # Requests (a group's samples together) whose grammar compiles in a worker thread: queued once it has
        self.compiling: list[tuple[Future, list[Request]]] = []
        # Each unfinished request by its id (a group by its first sample): an id runs once at a time (as vLLM's)
        self.unfinished: dict[str, Request] = {}
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0  # of the requests added, over the engine's life
        # Async scheduling: the step launched last, whose sampled tokens are not yet read back.
        self.async_scheduling = config.async_scheduling  # fixed: which of the two steps runs
        self._in_flight: tuple[SchedulerOutput, PendingOutput] | None = None

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request could never run, naming the field; nothing is changed."""
        validate_request(self.config, self.tokenizer, self.cache_capacity, self.grammars, self.eos_token_ids,
                         prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = False, cache_salt: str | None = None) -> None:
        """Queue a request. A streaming request is reported by every step that gives it a token.
        With ``n > 1`` (or ``best_of``) its samples are requests of one group (ids ``request_id#i``),
        which wait for room like any others. A request with structured outputs is queued once its
        grammar has compiled (off the engine loop); one that does not compile fails then, alone."""
        running = self.unfinished.get(request_id)
        if running is not None and not (running.group or running).is_finished:
            raise ValueError(f"request id {request_id!r} is already running: give each request an id of its own")
        validate_request(self.config, self.tokenizer, self.cache_capacity, self.grammars, self.eos_token_ids,
                         prompt_token_ids, params, compile_grammar=False)
        if stream and params.samples > params.n and params.output_kind != RequestOutputKind.FINAL_ONLY:
            raise ValueError(f"SamplingParams.best_of={params.best_of} is invalid: it cannot be streamed (the best "
                             "samples are known only at the end): use output_kind=RequestOutputKind.FINAL_ONLY")
        prompt_token_ids = truncated_prompt(prompt_token_ids, params, self.config.max_model_len)
        self.num_prompt_tokens += len(prompt_token_ids)
        stops = stop_token_ids(params, self.eos_token_ids)
        max_tokens = max_output_tokens(prompt_token_ids, params, self.config.max_model_len)
        bad_words = bad_word_token_ids(self.tokenizer, params.bad_words) if params.bad_words else []
        group = SampleGroup(request_id) if params.samples > 1 else None
        tensors = SamplingTensors.of(params, prompt_token_ids)
        requests = []
        for index in range(params.samples):
            request = Request(f"{request_id}#{index}" if group else request_id, list(prompt_token_ids), params,
                              max_tokens, stops, prompt, stream=stream, group=group, sample_index=index,
                              bad_words_token_ids=bad_words, tensors=tensors, cache_salt=cache_salt)
            request.detokenizer = self.outputs.detokenizer(params, stream)
            if group is not None:
                group.members.append(request)
            requests.append(request)
        self.unfinished[request_id] = requests[0]
        if params.structured_outputs is not None:
            self.compiling.append((self.grammars.compile_later(params.structured_outputs), requests))
        else:
            for request in requests:
                self.scheduler.add_request(request)

    def _queue_compiled(self, wait_s: float = 0.0) -> list[RequestOutput]:
        """Queue the requests whose grammar has compiled (waiting up to ``wait_s`` for one); end those
        whose grammar did not compile, and return their outputs."""
        if wait_s and self.compiling:
            wait([future for future, _ in self.compiling], wait_s, FIRST_COMPLETED)
        failed = []
        for entry in [e for e in self.compiling if e[0].done()]:
            self.compiling.remove(entry)
            future, requests = entry
            try:
                compiled = future.result()
            except Exception as err:  # a ValueError: its own values, a client's fault (400)
                message = f"{type(err).__name__}: {err}"
                for request in requests:
                    request.error = ClientFault(message) if isinstance(err, ValueError) else message
                    request.finish("error")
                failed.append(requests[0])
                continue
            start = self.answer_start
            thinking_until = start.awaited(requests[0].prompt_token_ids) if start is not None else None
            for request in requests:
                request.grammar = SampleGrammar.new(compiled, thinking_until)
                self.scheduler.add_request(request)
        return self._outputs(failed)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """End a request (all its samples), or many (as vLLM's takes a list), wherever they are,
        freeing their blocks: each found by its id, not by a pass over the queues."""
        ids = {request_id} if isinstance(request_id, str) else set(request_id)
        firsts = [self.unfinished.pop(one) for one in ids if one in self.unfinished]
        for entry in [e for e in self.compiling if _group_id(e[1][0]) in ids]:
            self.compiling.remove(entry)
            entry[0].cancel()
            for request in entry[1]:
                request.finish("abort")
        # found by id, not by a pass over the queues: every sample not done is in one (those compiling are done now)
        self.scheduler.finish_requests([r for first in firsts for r in (first.group.members if first.group else [first])
                                        if not r.is_finished], "abort")

    def shutdown(self) -> None:
        """Drop every request and free the model runner's device memory."""
        self.scheduler.finish_requests([*self.scheduler.running, *self.scheduler.waiting], "abort")
        self.compiling.clear()
        self.unfinished.clear()
        self.grammars.shutdown()
        self._in_flight = None
        self.executor.shutdown()

    def stats(self) -> EngineStats:
        manager, scheduler = self.block_manager, self.scheduler
        compiling = sum(len(requests) for _, requests in self.compiling)
        return EngineStats(len(scheduler.running), len(scheduler.waiting) + compiling,
                           manager.num_blocks - manager.num_free_blocks, manager.num_blocks, self.num_prompt_tokens,
                           self.num_generated_tokens, scheduler.num_preemptions, manager.num_cache_queries,
                           manager.num_cache_hits)

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        # (a request in flight is running, or preempted)
        return self.scheduler.has_unfinished_requests() or bool(self.compiling)

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the outputs of the requests that finished, and of the streaming
        requests that got a token (an engine process's ``ProgressReport`` makes reports of them
        instead). The plain step or the pipelined one, as ``async_scheduling`` says (no bound method
        kept on the engine: that cycle would keep a dropped engine, and its workers, alive). With
        nothing to run but grammars compiling, it waits a little for one."""
        outputs = self._queue_compiled()
        if not self.scheduler.has_unfinished_requests():
            outputs += self._queue_compiled(wait_s=0.01)
            if not self.scheduler.has_unfinished_requests():
                return outputs
        return outputs + (self._step_pipelined() if self.async_scheduling else self._step_plain())

    def _step_plain(self) -> list[RequestOutput]:
        """Schedule a batch, run it, read its sampled tokens back."""
        out = self.scheduler.schedule()
        if not out.requests:
            raise RuntimeError("the scheduler found nothing it could run although requests are waiting")
        launched = self._launch(out)
        if isinstance(launched, list):  # a request failed alone: its output
            return launched
        self.scheduler.commit_step(out)
        return self._finish_step(out, launched)

    def _step_pipelined(self) -> list[RequestOutput]:
        """Launch a batch before the previous one's sampled tokens are read back, so the host
        schedules and prepares while the device computes: a decode input still pending on the host
        is fed from the device. The outputs returned are then the previous step's. A request that
        a stop token ends computes one token too many, which is dropped."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and any(_needs_results_first(r) for r in in_flight[0].requests):
            return self._finish_step(*in_flight)
        out = self.scheduler.schedule()
        if not out.requests:
            if in_flight is None:
                raise RuntimeError("the scheduler found nothing it could run although requests are waiting")
            return self._finish_step(*in_flight)
        outputs: list[RequestOutput] = []  # the step in flight's, once it is read back

        def finish_in_flight() -> None:  # a grammar's mask needs the step in flight's tokens accepted
            nonlocal in_flight, outputs
            outputs, in_flight = self._finish_step(*in_flight), None

        constrained = in_flight is not None and any(r.grammar is not None for r in out.requests)
        try:
            launched = self._launch(out, finish_in_flight if constrained else None)
        except BaseException:
            self._in_flight = in_flight
            raise
        if isinstance(launched, list):  # a request failed alone; the step in flight stays
            self._in_flight = in_flight
            return outputs + launched
        if in_flight is not None:
            outputs = self._finish_step(*in_flight)
        self.scheduler.commit_step(out)
        self._in_flight = out, launched
        return outputs

    def _launch(self, out: SchedulerOutput, before_sampling=None) -> "PendingOutput | list[RequestOutput]":
        """Start the batch on the device; or, where one request's own code failed (a logits
        processor), end that request alone and return its output: the step runs again without it."""
        try:
            return self.executor.launch(out, before_sampling)
        except RequestError as err:
            failed = next(r for r in out.requests if r.request_id == err.request_id)
            self._fail(failed, err.error)
            return self._outputs([failed])

    def _finish_step(self, out: SchedulerOutput, pending: "PendingOutput") -> list[RequestOutput]:
        """Read a committed step's sampled tokens back and update its requests (those that ended
        meanwhile drop theirs); return the outputs to report."""
        result = pending.wait()
        ended_before = [r.is_finished for r in out.requests]
        self.num_generated_tokens += sum(t is not None and not ended
                                         for t, ended in zip(result.sampled_token_ids, ended_before, strict=True))
        for index, entries in (result.prompt_logprobs or {}).items():
            out.requests[index].prompt_logprobs.extend(entries)
        reported = self.scheduler.update_from_output(out, result.sampled_token_ids, result.logprobs,
                                                     result.token_logprobs)
        for request, token_id, ended in zip(out.requests, result.sampled_token_ids, ended_before, strict=True):
            if ended or token_id is None:
                continue
            ended_by_stop_string = False
            if request.detokenizer is not None:
                try:
                    ended_by_stop_string = self._extend_text(request)
                except Exception as err:
                    self._fail(request, err)
                    ended_by_stop_string = True
            if ended_by_stop_string or (request.stream and not request.is_finished):  # (streams: also without text)
                reported.append(request)
        return self._outputs(reported)

    def _outputs(self, reported: list[Request]) -> list[RequestOutput]:
        """One output per reported request, or per group once all its samples are done (or, when
        it streams, at its first token and every ``stream_interval`` tokens after, unless it asked for
        the final output only)."""
        outputs, done = [], set()
        interval = self.config.stream_interval
        for request in reported:
            group = request.group
            finished = group.is_finished if group else request.is_finished
            streamed_now = (request.stream and request.sampling_params.output_kind != RequestOutputKind.FINAL_ONLY
                            and (request.num_output_tokens - 1) % interval == 0)
            if id(group or request) in done or not (finished or streamed_now):
                continue
            done.add(id(group or request))
            if finished:
                self.unfinished.pop(_group_id(request), None)
            try:
                outputs.append(self.outputs.output(request))
            except Exception as err:
                self._fail(request, err)
                outputs.append(self.outputs.output(request))
        return outputs

    def _fail(self, request: Request, err: Exception) -> None:
        """An error pinned on one request (its text, stop strings, logprobs) ends it, all its
        samples, with finish reason "error"; the rest of the batch goes on."""
        logger.exception("request %s failed; the others go on", request.request_id)
        for member in request.group.members if request.group else [request]:
            member.error = f"{type(err).__name__}: {err}"
            if member.is_finished:
                member.finish("error")
            else:
                self.scheduler.finish_request(member, "error")

    def _extend_text(self, request: Request) -> bool:
        """Decode the request's new token; on a stop string, cut the text there and end the request
        (if a stop token or length did not end it first). True if a stop string newly ended it."""
        stop = stop_string_hit(request)
        if stop is None:
            return False
        if request.is_finished:  # a stop token or max_tokens ended it in this step: the text is still cut
            request.finish_reason, request.stop_reason = "stop", stop
            return False
        self.scheduler.finish_request(request, "stop", stop)
        return True


def _group_id(request: Request) -> str:
    """The id the request was added under (its group's, for a sample)."""
    return request.group.request_id if request.group else request.request_id


def _needs_results_first(request: Request) -> bool:
    """Whether the request's next step needs the token it is sampling now on the host (penalties,
    bad words and logits processors read its output tokens; a grammar's matcher takes it between
    the next step's forward pass and its sampling instead)."""
    return not request.is_finished and request.needs_its_tokens


def load_tokenizer(config: EngineConfig) -> PreTrainedTokenizerBase | None:
    """The HF tokenizer, or None with ``skip_tokenizer_init`` or for a directory with no tokenizer
    files (a bare config for benchmarks): such a model takes token ids only."""
    path = config.tokenizer
    if config.skip_tokenizer_init:
        return None
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: prompts must be token ids and outputs carry no text", path)
        return None
    return AutoTokenizer.from_pretrained(path, use_fast=config.tokenizer_mode != "slow",
                                         trust_remote_code=config.trust_remote_code)


# generation_config.json's sampling settings -> SamplingParams' fields (vLLM takes these).
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(config: EngineConfig) -> dict:
    """The SamplingParams fields that ``generate`` without sampling params takes from the model's
    generation_config.json (with ``generation_config="auto"``), as vLLM does."""
    source = config.model_path if config.generation_config == "auto" else config.generation_config
    if config.generation_config == "vllm" or not os.path.isfile(os.path.join(source, "generation_config.json")):
        return {}
    generation = GenerationConfig.from_pretrained(source).to_diff_dict()
    defaults = {field: generation[key] for key, field in _GENERATION_DEFAULTS.items()
                if generation.get(key) is not None}
    if defaults:
        logger.info("generate() without sampling params uses the model's generation_config.json: %s "
                    "(generation_config='vllm' turns this off)", defaults)
    return defaults


def eos_token_ids(config: EngineConfig, tokenizer: PreTrainedTokenizerBase | None) -> set[int]:
    """EOS ids from config.json, generation_config.json and the tokenizer, as HF generate stops on."""
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(config.hf_config, "eos_token_id", None))
    if os.path.isfile(os.path.join(config.model_path, "generation_config.json")):
        add(GenerationConfig.from_pretrained(config.model_path).eos_token_id)
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


def block_pools(config: EngineConfig, num_blocks: int, num_window_blocks: int,
                sliding_window: int | None) -> tuple[BlockManager | HybridBlockManager, CacheCapacity]:
    """The block manager of the KV cache the executor allocated, and what it can give one request:
    one pool (its blocks released outside ``sliding_window`` where every layer slides); or, with
    ``num_window_blocks``, the full layers' pool beside the sliding layers' own."""
    bs, budget = config.block_size, config.max_num_batched_tokens
    if not num_window_blocks:
        return (BlockManager(num_blocks, bs, config.enable_prefix_caching, sliding_window),
                CacheCapacity(((num_blocks, sliding_window),), bs, budget))
    window_pool = BlockManager(num_window_blocks, bs, config.enable_prefix_caching, sliding_window)
    return (HybridBlockManager(BlockManager(num_blocks, bs, config.enable_prefix_caching), window_pool),
            CacheCapacity(((num_blocks, None), (num_window_blocks, sliding_window)), bs, budget))

