"""What an engine process tells its driver of a request at a step: its new tokens and where it
stands, as plain tuples, not a ``RequestOutput``. The driver (an API-server process, or data
parallelism's) keeps a copy of each request, decodes its text and builds its outputs there with the
same ``OutputBuilder`` as the in-process engine (vLLM v1's engine-core outputs and output
processor). Decoding, building dataclasses and pickling them cost a streamed token ~13 us in the
engine process on an H200's host and held its steps at 2.5x the offline engine's; a report and its
pickling cost a quarter of what an output did (1.9 us against 8.0 on a 2-core x86 CPU), and
several API-server processes share the rest.

A report: ``(request_id, finished, samples, num_cached_tokens, prompt_logprobs)``, each sample
``(index, new_token_ids, new_logprobs, cumulative_logprob, finish_reason, stop_reason, error,
first_scheduled_time, first_token_time, last_token_time, finished_time)``. A streamed request of one
sample without logprobs that goes on, once its first report is out, is reported as its progress
alone: ``(request_id, new_token_ids, cumulative_logprob, last_token_time)`` (the rest is known
and unchanged): built and pickled in a third of the time, and most of a flood's reports are such.
"""

import threading

from transformers import PreTrainedTokenizerBase

from pagedllm.engine.detokenizer import IncrementalDetokenizer, incremental_detokenizer, stop_string_hit
from pagedllm.engine.outputs import OutputBuilder
from pagedllm.engine.request import Request, RequestStatus, SampleGroup
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams


class ProgressReport:
    """Stands in an engine process for the engine's ``OutputBuilder``: a step reports the same
    requests (streams at each token, the rest when done), each as a report."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self.tokenizer = tokenizer

    def detokenizer(self, params: SamplingParams, stream: bool) -> IncrementalDetokenizer | None:
        """Text only where the engine must judge it (stop strings): the driver makes what it reports."""
        return incremental_detokenizer(self.tokenizer, params) if params.stop else None

    def output(self, request: Request) -> tuple:
        if (request.group is None and request.num_reported_tokens and not request.is_finished
                and request.sampling_params.logprobs is None):  # progress alone
            return request.request_id, _take_new_tokens(request), request.cumulative_logprob, request.last_token_time
        group = request.group
        members = group.members if group else [request]
        first = members[0]
        first_report = not any(m.num_reported_tokens for m in members)
        samples = []
        for m in members:
            start = m.num_reported_tokens
            new = _take_new_tokens(m)
            logprobs = None if m.sampling_params.logprobs is None else m.output_logprobs[start:]
            samples.append((m.sample_index, new, logprobs, m.cumulative_logprob, m.finish_reason, m.stop_reason,
                            m.error, m.first_scheduled_time, m.first_token_time, m.last_token_time, m.finished_time))
        prompt_logprobs = (list(first.prompt_logprobs) if first_report and first.sampling_params.prompt_logprobs
                           is not None else None)
        return (group.request_id if group else request.request_id, group.is_finished if group else request.is_finished,
                samples, first.num_cached_tokens or 0, prompt_logprobs)


def _take_new_tokens(request: Request) -> list[int]:
    """The output tokens not reported yet, now counted as reported."""
    new = request.token_ids[request.num_prompt_tokens + request.num_reported_tokens:]
    request.num_reported_tokens += len(new)
    return new


def report_finished(report: tuple) -> bool:
    """Whether the report ends its request (progress alone never does)."""
    return len(report) == 5 and report[1]


def merge_reports(so_far: tuple, new: tuple) -> tuple:
    """Two reports of one request as one (a driver that fell behind gets fewer, larger messages):
    tokens and logprobs added up, the rest the newest. Where one is progress alone, the request
    has one sample and no logprobs."""
    if len(new) == 4:
        if len(so_far) == 4:
            return new[0], so_far[1] + new[1], new[2], new[3]
        (s,) = so_far[2]
        return (*so_far[:2], [(*s[:1], s[1] + new[1], s[2], new[2], *s[4:9], new[3], s[10])], *so_far[3:])
    if len(so_far) == 4:
        (s,) = new[2]
        return (*new[:2], [(s[0], so_far[1] + s[1], *s[2:])], *new[3:])
    samples = {s[0]: s for s in so_far[2]}
    for s in new[2]:
        old = samples.get(s[0])
        samples[s[0]] = s if old is None else (s[0], old[1] + s[1], None if s[2] is None else old[2] + s[2], *s[3:])
    return new[0], new[1], [samples[i] for i in sorted(samples)], new[3], so_far[4] if new[4] is None else new[4]


class RequestCopies:
    """A driver's copies of the requests its engine processes run, brought up to date by their
    reports: their text is decoded, and their outputs built, here. Thread-safe: an ``AsyncLLM``
    builds each request's output in the thread that reads it, while its engine thread adds,
    drops and fails requests."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self.builder = OutputBuilder(tokenizer)
        self.requests: dict[str, Request] = {}  # request id -> its (first sample's) copy
        self._lock = threading.Lock()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None,
            stream: bool) -> None:
        """``prompt_token_ids`` as the engine runs them (truncated)."""
        with self._lock:
            self._add(request_id, prompt_token_ids, params, prompt, stream)

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None,
             stream: bool) -> None:
        group = SampleGroup(request_id) if params.samples > 1 else None
        for index in range(params.samples):
            copy = Request(f"{request_id}#{index}" if group else request_id, list(prompt_token_ids), params,
                           params.max_tokens or 0, frozenset(), prompt, stream=stream, group=group, sample_index=index)
            copy.detokenizer = self.builder.detokenizer(params, stream)
            if group is not None:
                group.members.append(copy)
        self.requests[request_id] = group.members[0] if group else copy

    def drop(self, request_id: str) -> None:
        with self._lock:
            self.requests.pop(request_id, None)

    def output(self, report: tuple) -> RequestOutput | None:
        """The request's output for a report (None if it was dropped here meanwhile). An error in its
        text fails it here (finished, with the error): its engine process is then told to abort it."""
        with self._lock:
            return self._output(report)

    def _output(self, report: tuple) -> RequestOutput | None:
        request_id = report[0]
        first = self.requests.get(request_id)
        if first is None:
            return None
        try:
            self._update(first, report)
            output = self.builder.output(first)
        except Exception as err:
            return self._failed(request_id, f"{type(err).__name__}: {err}")
        if output.finished:
            del self.requests[request_id]
        return output

    @staticmethod
    def _update(first: Request, report: tuple) -> None:
        """Bring a request's copies up to date with a report."""
        if len(report) == 4:  # progress alone
            _, tokens, first.cumulative_logprob, first.last_token_time = report
            _extend(first, tokens)
            return
        _, _, samples, first.num_cached_tokens, prompt_logprobs = report
        members = first.group.members if first.group else [first]
        if prompt_logprobs is not None:
            first.prompt_logprobs = prompt_logprobs
        for index, tokens, logprobs, cumulative, reason, stop_reason, error, *times in samples:
            copy = members[index]
            _extend(copy, tokens)
            if logprobs:
                copy.output_logprobs += logprobs
            copy.cumulative_logprob, copy.error = cumulative, error
            copy.first_scheduled_time, copy.first_token_time, copy.last_token_time, copy.finished_time = times
            if reason is not None:
                copy.status, copy.finish_reason, copy.stop_reason = RequestStatus.FINISHED, reason, stop_reason

    def failed(self, request_id: str, error: str) -> RequestOutput | None:
        """The request's last output, failed with ``error`` (its engine process died, or its text did)."""
        with self._lock:
            return self._failed(request_id, error)

    def _failed(self, request_id: str, error: str) -> RequestOutput | None:
        first = self.requests.pop(request_id, None)
        if first is None:
            return None
        for member in first.group.members if first.group else [first]:
            member.error = error
            member.finish("error")
        return self.builder.output(first)


def _extend(copy: Request, tokens: list[int]) -> None:
    """Add a copy's new tokens, and their text: one by one where stop strings are judged, so that
    the text is cut where the engine cut it."""
    if copy.detokenizer is None or not copy.sampling_params.stop:
        copy.token_ids += tokens
        if copy.detokenizer is not None and tokens:
            copy.detokenizer.update(copy.token_ids, copy.num_prompt_tokens)
        return
    for token in tokens:
        copy.token_ids.append(token)
        stop_string_hit(copy)
