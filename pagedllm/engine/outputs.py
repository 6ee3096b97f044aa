"""Requests into the ``RequestOutput`` a caller sees: text, logprobs, times; a group's samples
together (the n best of ``best_of``); only what is new for ``RequestOutputKind.DELTA``."""

import dataclasses

from transformers import PreTrainedTokenizerBase

from pagedllm.engine.detokenizer import IncrementalDetokenizer, incremental_detokenizer, output_text
from pagedllm.engine.request import Request
from pagedllm.outputs import CompletionOutput, FlatLogprobs, RequestMetrics, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class OutputBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self.tokenizer = tokenizer
        # Each token's own text, as logprobs give it: decoded once per token id (a logprobs=20 stream decoded
        # 21 tokens a step: ~90 us on a 2-core CPU, against ~2 us looked up); at most the vocabulary
        self.token_texts: dict[int, str] = {}

    def detokenizer(self, params: SamplingParams, stream: bool) -> IncrementalDetokenizer | None:
        """A request's text as it goes: for its stop strings, and for the outputs of a stream."""
        return incremental_detokenizer(self.tokenizer, params) if params.stop or stream else None

    def output(self, request: Request) -> RequestOutput:
        """The request's output; for one of n samples, the whole group's, samples in index order."""
        group = request.group
        members = group.members if group else [request]
        first = members[0]
        params = first.sampling_params
        error = next((m.error for m in members if m.error is not None), None)
        finished = group.is_finished if group else request.is_finished
        delta = params.output_kind == RequestOutputKind.DELTA and first.stream
        first_report = not any(m.num_reported_tokens for m in members)
        # a delta's tokens and logprobs are taken from where the last one ended, not cut from all of them: a long
        # stream would copy its whole output at each token
        completions = [self._completion(m, error is None, delta) for m in members]
        if finished and params.samples > params.n and error is None:  # best_of: the n most likely, re-indexed
            completions = sorted(completions, key=lambda c: c.cumulative_logprob, reverse=True)[:params.n]
            for index, completion in enumerate(completions):
                completion.index = index
        output = RequestOutput(group.request_id if group else request.request_id, first.prompt,
                               first.prompt_token_ids, completions, finished,
                               num_cached_tokens=first.num_cached_tokens or 0, metrics=_metrics(members), error=error)
        if params.prompt_logprobs is not None and error is None and (first_report or not delta):
            output.prompt_logprobs = self._logprobs(first.prompt_logprobs, params.detokenize, FlatLogprobs([None]))
        if delta:  # only what is new (the prompt's logprobs come with the first output only)
            for member, completion in zip(members, output.outputs, strict=True):
                chars = member.num_reported_chars
                member.num_reported_tokens += len(completion.token_ids)
                member.num_reported_chars = len(completion.text)
                completion.text = completion.text[chars:]
        return output

    def _completion(self, request: Request, with_text: bool, delta: bool) -> CompletionOutput:
        """The sample's completion: its whole text, and its tokens and logprobs (with ``delta``, those
        not reported yet)."""
        start = request.num_reported_tokens if delta else 0
        token_ids = request.token_ids[request.num_prompt_tokens + start:]
        if not with_text:  # a failed request: its tokens and reason only
            return CompletionOutput(request.sample_index, "", token_ids, request.finish_reason)
        params = request.sampling_params
        text = ""
        ended_by_stop_string = isinstance(request.stop_reason, str)
        if request.detokenizer is not None and (ended_by_stop_string or not request.is_finished):
            text = request.detokenizer.text  # cut at the stop string, or so far (holds back half a character)
            if not request.is_finished and params.stop:
                # so far: hold back what a later token could still turn into a stop string
                text = text[: max(len(text) - max(map(len, params.stop)) + 1, 0)]
        elif self.tokenizer is not None and params.detokenize:
            text = output_text(self.tokenizer, params, request.token_ids, request.num_prompt_tokens)
        completion = CompletionOutput(request.sample_index, text, token_ids, request.finish_reason,
                                      request.stop_reason, cumulative_logprob=request.cumulative_logprob)
        if params.logprobs is not None and delta:
            # never needed again, so not kept (a stream's would live as long as it)
            completion.logprobs = self._logprobs(request.output_logprobs[start:], params.detokenize)
        elif params.logprobs is not None:  # kept, lest each output build them all again
            reported = request.reported_logprobs
            self._logprobs(request.output_logprobs[len(reported):], params.detokenize, reported)
            completion.logprobs = FlatLogprobs(reported)
        return completion

    def _logprobs(self, entries: list[dict[int, tuple[float, int]]], detokenize: bool,
                  into: FlatLogprobs | None = None) -> FlatLogprobs:
        """The engine's ``{token: (logprob, rank)}`` positions appended to ``into`` (or a new one)."""
        into = FlatLogprobs() if into is None else into
        decode = self.tokenizer is not None and detokenize
        for entry in entries:
            scores = entry.values()
            into.append_position(entry, [lp for lp, _ in scores], [rank for _, rank in scores],
                                 [self._token_text(t) for t in entry] if decode else [None] * len(entry))
        return into

    def _token_text(self, token_id: int) -> str:
        text = self.token_texts.get(token_id)
        if text is None:
            text = self.token_texts[token_id] = self.tokenizer.decode([token_id])
        return text


def _metrics(members: list[Request]) -> RequestMetrics:
    """The group's times: the earliest first ones and the latest last ones of its samples."""
    if len(members) == 1:  # (every streamed request, at every step)
        r = members[0]
        scheduled = r.first_scheduled_time
        return RequestMetrics(r.arrival_time, r.last_token_time, scheduled, r.first_token_time,
                              None if scheduled is None else scheduled - r.arrival_time, r.finished_time)

    def known(name: str) -> list[float]:
        return [t for m in members if (t := getattr(m, name)) is not None]

    scheduled = min(known("first_scheduled_time"), default=None)
    arrival = members[0].arrival_time
    finished = known("finished_time")
    return RequestMetrics(arrival, max(known("last_token_time"), default=None), scheduled,
                          min(known("first_token_time"), default=None),
                          None if scheduled is None else scheduled - arrival,
                          max(finished) if len(finished) == len(members) else None)


def add_delta(so_far: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """A request's output so far, with a delta output (``RequestOutputKind.DELTA``) added: text,
    tokens and logprobs appended, the rest the newest."""
    if so_far is None:
        return copy_output(delta)
    so_far.finished, so_far.metrics, so_far.error = delta.finished, delta.metrics, delta.error
    so_far.num_cached_tokens = delta.num_cached_tokens
    if delta.prompt_logprobs is not None:
        so_far.prompt_logprobs = delta.prompt_logprobs
    completions = {c.index: c for c in so_far.outputs}
    for new in delta.outputs:
        old = completions.get(new.index)
        if old is None:
            so_far.outputs.append(dataclasses.replace(new, token_ids=list(new.token_ids)))
        else:
            add_completion_delta(old, new)
    so_far.outputs.sort(key=lambda c: c.index)
    return so_far


def add_completion_delta(so_far: CompletionOutput, delta: CompletionOutput) -> None:
    """One sample's completion so far, with its delta added in place: text, tokens and logprobs
    appended, the rest the newest."""
    so_far.text += delta.text
    so_far.token_ids += delta.token_ids
    if delta.logprobs is not None:  # (in place: a new list each delta was quadratic in a long output)
        if so_far.logprobs is None:
            so_far.logprobs = FlatLogprobs()
        so_far.logprobs.extend(delta.logprobs)
    so_far.finish_reason, so_far.stop_reason, so_far.cumulative_logprob = \
        delta.finish_reason, delta.stop_reason, delta.cumulative_logprob


def copy_output(output: RequestOutput) -> RequestOutput:
    """A copy whose completions' lists a later ``add_delta`` does not change."""
    return dataclasses.replace(output, outputs=[
        dataclasses.replace(c, token_ids=list(c.token_ids),
                            logprobs=None if c.logprobs is None else FlatLogprobs(c.logprobs))
        for c in output.outputs])
