"""Continuous batching: which requests run this step, and how many tokens each computes."""

import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.request import PENDING_TOKEN, Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's flat batch: ``requests[i]`` computes its next ``num_scheduled_tokens[i]`` tokens."""

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)


class WaitingQueue:
    """Requests waiting to run, first come first served, the preempted put back in front, as a
    deque holds them, but any one leaves it at once (an abort, a stop string, a request preempted
    while its last token was sampled), where a deque takes a pass over all: a batch job queues
    all its prompts (10^5 and more), and a server's clients that hang up abort theirs one by one
    (an abort took ~20 ms with 50,000 queued on a 2-core x86 CPU)."""

    def __init__(self) -> None:
        self._requests: OrderedDict[int, Request] = OrderedDict()  # by id(): alive while queued, so never reused

    def append(self, request: Request) -> None:
        self._requests[id(request)] = request

    def appendleft(self, request: Request) -> None:
        self._requests[id(request)] = request
        self._requests.move_to_end(id(request), last=False)

    def extendleft(self, requests: Iterable[Request]) -> None:
        """Each to the front in turn, as ``deque.extendleft``: the last given ends up first."""
        for request in requests:
            self.appendleft(request)

    def first(self) -> Request:
        return next(iter(self._requests.values()))

    def popleft(self) -> Request:
        return self._requests.popitem(last=False)[1]

    def remove(self, request: Request) -> None:
        del self._requests[id(request)]

    def discard(self, request: Request) -> None:
        self._requests.pop(id(request), None)

    def __contains__(self, request: Request) -> bool:
        return id(request) in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests.values())


class Scheduler:
    """vLLM v1's rule, without phases: every step, under a token budget, give each running
    request the tokens it lacks (a decode token, or the next prefill chunk), then admit
    waiting requests while budget, sequence slots and KV blocks last. When a running request
    cannot get a block, the newest running request is preempted: its blocks are freed and it
    goes back to the front of the queue, to be recomputed from its tokens later.

    A step is scheduled, launched, and then committed (``commit_step``: the scheduled tokens
    count as computed and each sampling request gets a ``PENDING_TOKEN``), so the next step can
    be scheduled while this one runs; ``update_from_output`` fills in the sampled tokens later.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # tokens run through the model, over the scheduler's life

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_output_tokens >= request.max_tokens:  # its last token is being sampled now
                index += 1
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            self.block_manager.release_outside_window(request)
            while not self.block_manager.allocate_slots(request, request.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                out.requests.append(request)
                out.num_scheduled_tokens.append(num_new)
                budget -= num_new
                index += 1
                continue
            break
        # Admit waiting requests only when memory was not short this step.
        held = []  # samples of a group waiting for its prompt to be cached
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.first()
            if self._waits_for_shared_prompt(request):
                held.append(self.waiting.popleft())
                continue
            if not request.block_table:  # new or preempted: start from its longest cached prefix
                request.num_computed_tokens = self.block_manager.take_cached_prefix(request)
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = request.num_computed_tokens
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            self.block_manager.release_outside_window(request)
            if not self.block_manager.allocate_slots(request, request.num_computed_tokens + num_new):
                self.block_manager.free(request)
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            self.running.append(request)
            out.requests.append(request)
            out.num_scheduled_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(held))
        return out

    def _waits_for_shared_prompt(self, request: Request) -> bool:
        """Samples 1..n-1 of a group start once the prompt is in the prefix cache, so that they
        share its blocks instead of computing it again."""
        group = request.group
        return (group is not None and request.sample_index > 0 and not group.prompt_computed
                and self.block_manager.enable_prefix_caching)

    def commit_step(self, out: SchedulerOutput) -> None:
        """The step is launched: its tokens count as computed, and each request it samples for
        holds a pending token until ``update_from_output`` brings the sampled one."""
        for request, num_new in zip(out.requests, out.num_scheduled_tokens, strict=True):
            if request.is_finished:  # ended (stop, abort) while the step was being launched
                continue
            request.num_computed_tokens += num_new
            self.num_computed_tokens += num_new
            if request.num_computed_tokens == request.num_tokens:
                request.token_ids.append(PENDING_TOKEN)

    def update_from_output(self, out: SchedulerOutput, sampled: list[int | None], logprobs: list | None = None,
                           token_logprobs: list[float | None] | None = None) -> list[Request]:
        """Give each request of a committed step its sampled token (None for a prefill chunk that
        does not reach the end), with the token's logprob and its top logprobs if it asked;
        requests that ended since (stop string, abort) are skipped. Returns the requests that finished."""
        finished = []
        logprobs = logprobs or [None] * len(sampled)
        token_logprobs = token_logprobs or [None] * len(sampled)
        for request, token_id, top, token_logprob in zip(out.requests, sampled, logprobs, token_logprobs, strict=True):
            if request.is_finished:
                continue
            self.block_manager.cache_full_blocks(request)
            if token_id is None:
                continue
            if request.group is not None:
                request.group.prompt_computed = True
            request.append_output_token(token_id, top, token_logprob)
            if request.is_finished:
                finished.append(request)
                self.waiting.discard(request)  # (preempted while its last token was being sampled)
        if finished:
            self.running = [r for r in self.running if not r.is_finished]
            for request in finished:
                self.block_manager.free(request)
        return finished

    def finish_request(self, request: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """End a request the engine decided is done (a stop string, an abort) and free its blocks."""
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        request.finish(reason, stop_reason)
        self.block_manager.free(request)

    def finish_requests(self, requests: list[Request], reason: str) -> None:
        """``finish_request`` for many at once, in one pass over the running batch (the waiting
        queue drops each at once): a client that leaves with 100,000 requests waiting must not cost
        100,000 passes (vLLM's ``finish_requests``)."""
        gone = {id(request) for request in requests}
        self.running = [r for r in self.running if id(r) not in gone]
        for request in requests:
            self.waiting.discard(request)
            request.finish(reason)
            self.block_manager.free(request)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
