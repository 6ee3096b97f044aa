"""The engine loop's one step: schedule, run the model, update, and report finished requests."""

import logging
import os
from typing import TYPE_CHECKING

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from pagedllm.config import EngineConfig
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from pagedllm.engine.request import Request, SampleGroup
from pagedllm.engine.scheduler import Scheduler, SchedulerOutput
from pagedllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.worker.model_runner import PendingOutput

logger = logging.getLogger("pagedllm")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from pagedllm.worker.model_runner import ModelRunner  # torch-heavy; the engine itself is not

        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.eos_token_ids = eos_token_ids(config, self.tokenizer)
        self.model_runner = ModelRunner(config)
        self.block_manager = BlockManager(self.model_runner.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0  # of the requests added, over the engine's life
        # Async scheduling: the step launched last, whose sampled tokens are not yet read back.
        # Workers of other ranks get each step's token ids from the host, so they need them there first.
        self.async_scheduling = config.async_scheduling and config.tensor_parallel_size == 1
        self._in_flight: tuple[SchedulerOutput, PendingOutput] | None = None

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request could never run, naming the field; nothing is changed.
        Together with SamplingParams' own checks, a request that passes cannot fail in the engine."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this model has none: use stop_token_ids")
        vocab_size = self.config.hf_config.vocab_size
        ids = prompt_token_ids
        if not (all(type(t) is int for t in ids) and min(ids) >= 0 and max(ids) < vocab_size):  # fast when fine
            bad = [t for t in ids if type(t) is not int or not 0 <= t < vocab_size]
            raise ValueError(f"the prompt has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids={bad[:5]} is invalid: it must hold token ids of the "
                             f"vocabulary [0, {vocab_size})")
        limit = min(self.config.max_logprobs, vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > limit:
                raise ValueError(f"SamplingParams.{name}={value} is invalid: it must be at most {limit} "
                                 f"(max_logprobs={self.config.max_logprobs}, vocabulary {vocab_size})")
        max_len = self.config.max_model_len
        wanted = params.max_tokens or 1  # max_tokens=None needs room for one token at least
        if len(prompt_token_ids) + wanted > max_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens and asks for up to {wanted} more, "
                f"{len(prompt_token_ids) + wanted} in all, but max_model_len is {max_len}: "
                "shorten the prompt or lower max_tokens"
            )
        needed = self.block_manager.blocks_for(len(prompt_token_ids) + self._max_tokens(prompt_token_ids, params))
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"the request needs {needed} KV cache blocks of {self.config.block_size} tokens, but the cache "
                f"has only {self.block_manager.num_blocks}: shorten it or give the cache more blocks"
            )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, stream: bool = False) -> None:
        """Queue a request. A streaming request is reported by every step that gives it a token.
        With ``n > 1`` its samples are n requests of one group (ids ``request_id#i``), which wait
        for room like any others."""
        self.validate_request(prompt_token_ids, params)
        self.num_prompt_tokens += len(prompt_token_ids)
        stops = frozenset(set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids))
        max_tokens = self._max_tokens(prompt_token_ids, params)
        group = SampleGroup(request_id) if params.n > 1 else None
        for index in range(params.n):
            request = Request(f"{request_id}#{index}" if group else request_id, list(prompt_token_ids), params,
                              max_tokens, stops, prompt, stream=stream, group=group, sample_index=index)
            if (params.stop or stream) and self.tokenizer is not None:
                request.detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            if group is not None:
                group.members.append(request)
            self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> None:
        """End a request (all its samples) wherever it is, freeing its blocks."""
        for request in list(self.scheduler.running) + list(self.scheduler.waiting):
            group_id = request.group.request_id if request.group else request.request_id
            if group_id == request_id:
                self.scheduler.finish_request(request, "abort")

    def shutdown(self) -> None:
        """Drop every request and free the model runner's device memory."""
        for request in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.abort_request(request.request_id)
        self._in_flight = None
        self.model_runner.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()  # a request in flight is running (or preempted)

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the requests that finished, and the streaming requests that got a
        token.

        With async scheduling, the step is launched before the previous one's sampled tokens are
        read back, so the host schedules and prepares while the device computes: a decode input
        still pending on the host is fed from the device. The outputs returned are then the
        previous step's. A request that a stop token ends computes one token too many, which is
        dropped.
        """
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None and any(_needs_results_first(r) for r in in_flight[0].requests):
            return self._finish_step(*in_flight)
        out = self.scheduler.schedule()
        if not out.requests:
            if in_flight is None:
                raise RuntimeError("the scheduler found nothing it could run although requests are waiting")
            return self._finish_step(*in_flight)
        try:
            pending = self.model_runner.launch(out)
        except BaseException:
            self._in_flight = in_flight
            raise
        outputs = self._finish_step(*in_flight) if in_flight is not None else []
        self.scheduler.commit_step(out)
        if self.async_scheduling:
            self._in_flight = out, pending
            return outputs
        return outputs + self._finish_step(out, pending)

    def _finish_step(self, out: SchedulerOutput, pending: "PendingOutput") -> list[RequestOutput]:
        """Read a committed step's sampled tokens back and update its requests (those that ended
        meanwhile drop theirs); return the outputs to report."""
        result = pending.wait()
        ended_before = [r.is_finished for r in out.requests]
        self.num_generated_tokens += sum(t is not None and not ended
                                         for t, ended in zip(result.sampled_token_ids, ended_before, strict=True))
        for index, entries in (result.prompt_logprobs or {}).items():
            out.requests[index].prompt_logprobs.extend(entries)
        reported = self.scheduler.update_from_output(out, result.sampled_token_ids, result.logprobs)
        for request, token_id, ended in zip(out.requests, result.sampled_token_ids, ended_before, strict=True):
            if ended or token_id is None or request.detokenizer is None:
                continue
            try:
                ended_by_stop_string = self._extend_text(request)
            except Exception as err:
                self._fail(request, err)
                ended_by_stop_string = True
            if ended_by_stop_string or (request.stream and not request.is_finished):
                reported.append(request)
        return self._outputs(reported)

    def _outputs(self, reported: list[Request]) -> list[RequestOutput]:
        """One output per reported request, or per group once all its samples are done (or at
        every token when it streams)."""
        outputs, done = [], set()
        for request in reported:
            group = request.group
            if id(group or request) in done or (group and not group.is_finished and not request.stream):
                continue
            done.add(id(group or request))
            try:
                outputs.append(self._output(request))
            except Exception as err:
                self._fail(request, err)
                outputs.append(self._output(request))
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
        detokenizer = request.detokenizer
        num_new_chars = len(detokenizer.update(request.output_token_ids))
        params = request.sampling_params
        if not params.stop or not num_new_chars or request.num_output_tokens < params.min_tokens:
            return False
        hit = find_stop_string(detokenizer.text, num_new_chars, params.stop)
        if hit is None:
            return False
        stop, start = hit
        detokenizer.text = detokenizer.text[: start + (len(stop) if params.include_stop_str_in_output else 0)]
        if request.is_finished:  # a stop token or max_tokens ended it in this step: the text is still cut
            request.finish_reason, request.stop_reason = "stop", stop
            return False
        self.scheduler.finish_request(request, "stop", stop)
        return True

    def _max_tokens(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        return params.max_tokens or self.config.max_model_len - len(prompt_token_ids)

    def _output(self, request: Request) -> RequestOutput:
        """The request's output; for one of n samples, the whole group's, samples in index order."""
        group = request.group
        members = group.members if group else [request]
        first = members[0]
        error = next((m.error for m in members if m.error is not None), None)
        output = RequestOutput(group.request_id if group else request.request_id, first.prompt,
                               first.prompt_token_ids, [self._completion(m, error is None) for m in members],
                               group.is_finished if group else request.is_finished,
                               num_cached_tokens=first.num_cached_tokens or 0, metrics=_metrics(members), error=error)
        if first.sampling_params.prompt_logprobs is not None and error is None:
            output.prompt_logprobs = [None] + self._logprobs(first.prompt_logprobs)
        return output

    def _completion(self, request: Request, with_text: bool) -> CompletionOutput:
        token_ids = request.output_token_ids
        if not with_text:  # a failed request: its tokens and reason only
            return CompletionOutput(request.sample_index, "", token_ids, request.finish_reason)
        text = ""
        ended_by_stop_string = isinstance(request.stop_reason, str)
        if request.detokenizer is not None and (ended_by_stop_string or not request.is_finished):
            text = request.detokenizer.text  # cut at the stop string, or so far (holds back half a character)
            if not request.is_finished and request.sampling_params.stop:
                # so far: hold back what a later token could still turn into a stop string
                text = text[: max(len(text) - max(map(len, request.sampling_params.stop)) + 1, 0)]
        elif self.tokenizer is not None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=request.sampling_params.skip_special_tokens)
        completion = CompletionOutput(request.sample_index, text, token_ids, request.finish_reason,
                                      request.stop_reason)
        if request.sampling_params.logprobs is not None:
            completion.cumulative_logprob = request.cumulative_logprob
            completion.logprobs = self._logprobs(request.output_logprobs)
        return completion

    def _logprobs(self, entries: list[dict[int, tuple[float, int]]]) -> list[dict[int, Logprob]]:
        return [{t: Logprob(lp, rank, self._decode_token(t)) for t, (lp, rank) in entry.items()} for entry in entries]

    def _decode_token(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None


def _needs_results_first(request: Request) -> bool:
    """Whether the request's next step needs the token it is sampling now on the host: penalties
    count its output tokens."""
    return not request.is_finished and request.sampling_params.penalized


def _metrics(members: list[Request]) -> RequestMetrics:
    """The group's times: the earliest first ones and the latest last ones of its samples."""
    def known(name: str) -> list[float]:
        return [t for m in members if (t := getattr(m, name)) is not None]

    scheduled = min(known("first_scheduled_time"), default=None)
    arrival = members[0].arrival_time
    finished = known("finished_time")
    return RequestMetrics(arrival, max(known("last_token_time"), default=None), scheduled,
                          min(known("first_token_time"), default=None),
                          None if scheduled is None else scheduled - arrival,
                          max(finished) if len(finished) == len(members) else None)


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
