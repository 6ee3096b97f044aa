"""The engine for servers: requests are added and aborted at any time from asyncio code, and each
one's outputs arrive on its own queue as tokens are made. The engine core runs in a process of its
own (as vLLM v1's), so that it never waits for the GIL while the HTTP side parses, frames and
sends; a thread here passes requests to it and hands its outputs (only what is new) to the
requests' queues, each summed up again for readers that want the whole output so far."""

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing.connection
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.data_parallel import DataParallelEngine
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.outputs import add_delta, copy_output
from pagedllm.engine.progress import merge_reports, report_finished
from pagedllm.engine.request_checks import first_come_first_served, refuse_lora
from pagedllm.errors import EngineDeadError, RequestFailedError
from pagedllm.inputs import PromptType, cache_salt, parse_prompt
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("pagedllm")


class AsyncLLM:
    """The engine for asyncio applications, as vLLM's ``AsyncLLM`` / ``AsyncLLMEngine``: requests
    from any number of coroutines are batched together. The engine core runs in a process of its
    own (``data_parallel_size`` of them, each on its own GPUs); with ``engine_process=False`` it
    runs in a thread of this process instead (an actor that is a process of its own already, or a
    test that reaches into the engine). Only that thread touches the engine. ``generate`` is an
    async iterator of the request's outputs; leaving it early (a client that disconnects) aborts
    the request and frees its blocks. An error pinned on one request ends that request's iterator
    with ``RequestFailedError``; an error the engine cannot survive (or the engine process dying)
    ends every iterator with ``EngineDeadError``, and ``on_dead`` is called (the server then exits,
    for a supervisor to restart it)."""

    def __init__(self, config: EngineConfig, on_dead: Callable[[], None] | None = None, engine_process: bool = True,
                 engine_connections: list | None = None):
        """``engine_connections``: pipes to engine processes another process started (one API-server
        process of several: ``data_parallel.start_replicas``)."""
        self.engine = DataParallelEngine(config, engine_connections) if engine_process or \
            config.data_parallel_size > 1 else LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.config = config
        self._on_dead = on_dead
        self.stats = self.engine.stats()
        self._commands: queue.Queue = queue.Queue()  # ("add", args) / ("abort", ids) / ("stop", None)
        self._wake_read, self._wake_write = os.pipe()  # readable while commands wait (a byte per command)
        os.set_blocking(self._wake_read, False)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # by the engine's ids
        # A running request's id -> the engine's id for it: the id and a number never used before, so that a
        # request id used again at once (its first request aborted) never gets the old request's outputs
        # that were still on their way (as vLLM v1's internal request ids).
        self._engine_ids: dict[str, str] = {}
        self._numbers = itertools.count()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @property
    def on_dead(self) -> Callable[[], None] | None:
        return self._on_dead

    @on_dead.setter
    def on_dead(self, callback: Callable[[], None] | None) -> None:
        """Set after the engine died (a server wires it up once the engine is built, and the engine
        process may die first), the callback is called at once: otherwise nothing would ever call it."""
        self._on_dead = callback
        if callback is not None and self.error is not None:
            callback()

    @classmethod
    def from_engine_args(cls, engine_args: EngineConfig) -> "AsyncLLM":
        """vLLM's constructor: ``AsyncLLM.from_engine_args(AsyncEngineArgs(model=...))``."""
        return cls(engine_args)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request could never run (the engine's own checks, thread-safe:
        they only read its configuration)."""
        self.engine.validate_request(prompt_token_ids, params)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str, *,
                       lora_request: Any = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine makes them (vLLM's signature; ``lora_request`` None
        only, ``priority`` 0 only): cumulative, so a reader that falls behind gets the newest; with
        ``RequestOutputKind.DELTA`` each output holds only what is new since the last one (all of it:
        a reader that falls behind gets the deltas that waited added up). A text prompt is tokenized
        in a worker thread."""
        refuse_lora(lora_request)
        first_come_first_served(priority)
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, not {type(sampling_params).__name__}")
        self._check_alive()
        if request_id in self._engine_ids:
            raise ValueError(f"request id {request_id!r} is already running")
        # the id is taken before the first await, so that a second request with it is refused, not mixed in
        engine_id = self._engine_ids[request_id] = f"{request_id}@{next(self._numbers)}"
        started, finished, so_far = False, False, None
        try:
            salt = cache_salt(prompt)
            if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                text, prompt_token_ids = parse_prompt(prompt, self.tokenizer)
            else:
                text, prompt_token_ids = await asyncio.to_thread(parse_prompt, prompt, self.tokenizer)
            if sampling_params.structured_outputs is None:
                self.validate(prompt_token_ids, sampling_params)
            else:  # compiling a schema or grammar may take a while: not on the event loop
                await asyncio.to_thread(self.validate, prompt_token_ids, sampling_params)
            if sampling_params.samples > sampling_params.n and \
                    sampling_params.output_kind != RequestOutputKind.FINAL_ONLY:
                raise ValueError(f"SamplingParams.best_of={sampling_params.best_of} is invalid: it needs output_kind="
                                 "RequestOutputKind.FINAL_ONLY (the best samples are known only at the end)")
            cumulative = sampling_params.output_kind == RequestOutputKind.CUMULATIVE
            if cumulative:  # the engine sends only what is new; it is summed up here
                sampling_params = dataclasses.replace(sampling_params, output_kind=RequestOutputKind.DELTA)
            waiting = _Waiting()
            self._streams[engine_id] = (asyncio.get_running_loop(), waiting)
            self._command("add", (engine_id, prompt_token_ids, sampling_params, text, salt))
            started = True
            self._check_alive()  # (an engine that stopped meanwhile ended the streams it knew of, not this one)
            while not finished:
                item = await waiting.get()
                output = item if isinstance(item, RequestOutput) else self.engine.output(item)
                if output is None:  # dropped here: its engine process died, and its failure is next
                    continue
                output.request_id = request_id
                if output.error is not None:
                    # (its text failed here: its engine process still runs it, and is told to stop below)
                    finished = isinstance(item, RequestOutput) or report_finished(item)
                    raise RequestFailedError(output.error)
                finished = output.finished
                if cumulative:
                    so_far = add_delta(so_far, output)
                    output = copy_output(so_far)
                yield output
        finally:
            self._streams.pop(engine_id, None)
            del self._engine_ids[request_id]
            if started and not finished:
                self._command("abort", [engine_id])

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error!r}")
        if not self._thread.is_alive():
            raise EngineDeadError("the engine was shut down")

    def abort(self, request_id: str | Iterable[str]) -> None:
        """vLLM's: end a request, or many, wherever they are."""
        ids = [request_id] if isinstance(request_id, str) else request_id
        self._command("abort", [self._engine_ids.get(i, i) for i in ids])

    def _command(self, command: str, arg) -> None:
        """Queue a command for the engine thread and wake it (it may be waiting on the engine)."""
        self._commands.put((command, arg))
        if self._thread.is_alive() and self._wake_write is not None:
            os.write(self._wake_write, b"\0")

    @property
    def num_unfinished_requests(self) -> int:
        return self.stats.num_running + self.stats.num_waiting

    def shutdown(self) -> None:
        """Stop the engine thread and free the engine; streams still open end with EngineDeadError."""
        if self._thread.is_alive():
            self._command("stop", None)
            self._thread.join(timeout=30)
        self.end_streams("the engine was shut down")
        self.engine.shutdown()
        if not self._thread.is_alive() and self._wake_write is not None:  # (kept for a thread that did not end)
            os.close(self._wake_read)
            os.close(self._wake_write)
            self._wake_write = None

    def end_streams(self, reason: str) -> None:
        """End every open stream with ``EngineDeadError(reason)`` (a server stopping); their requests
        are aborted as their readers leave."""
        self._deliver([(request_id, EngineDeadError(reason)) for request_id in list(self._streams)])

    def _loop(self) -> None:
        engine = self.engine
        in_process = isinstance(engine, LLMEngine)
        try:
            while True:
                if in_process and not engine.has_unfinished_requests():  # nothing to run: wait for a command
                    multiprocessing.connection.wait([self._wake_read])
                _drain(self._wake_read)
                if self._run_commands():
                    return
                # before waiting on it: the engine process may have been found gone already (the requests it
                # held failed in the last pass), even before this thread began (at the first stats read)
                if not in_process and not engine.alive:
                    raise RuntimeError("the engine process died (the error is above)")
                items = []
                if not in_process:  # waits for the engine process's next message, or a command
                    items = engine.step_reports(self._wake_read)
                elif engine.has_unfinished_requests():
                    items = engine.step()
                self.stats = engine.stats()  # first: a caller that got a request's last output sees it counted
                self._deliver([(item[0] if isinstance(item, tuple) else item.request_id, item) for item in items])
        except BaseException as err:  # the engine is broken: every waiting client gets the error
            logger.exception("the engine loop failed; the server stops")
            self.error = err
            self.end_streams(f"the engine stopped: {err!r}")
            if self._on_dead is not None:
                self._on_dead()

    def _run_commands(self) -> bool:
        """Run the commands that wait; True on "stop". Aborts go to the engine together, in one
        pass over its queues (a client leaving with many prompts sends one each)."""
        aborts: dict[str, None] = {}
        try:
            while True:
                try:
                    command, arg = self._commands.get_nowait()
                except queue.Empty:
                    return False
                if command == "stop":
                    return True
                if command == "add":
                    self._add(*arg)
                else:
                    aborts.update(dict.fromkeys(arg))
        finally:
            if aborts:
                self.engine.abort_request(list(aborts))

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None,
             salt: str | None) -> None:
        if request_id not in self._streams:  # its client left before it got here
            return
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, prompt=prompt, stream=True, cache_salt=salt)
        except ValueError as err:  # checked before it was queued, so only a bug gets here: this request's alone
            logger.exception("request %s could not be added", request_id)
            self._deliver([(request_id, RequestFailedError(str(err)))])

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Hand a step's outputs (or reports) to their streams: one wake-up of each event loop per
        step, not one per request (each wake-up is a write to the loop's self-pipe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiting, object]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                loop, waiting = stream
                by_loop.setdefault(loop, []).append((waiting, item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)


class _Waiting:
    """What a request's reader has not read yet, as one item, so that a reader that fell behind
    gets all that waited at once. An engine process's reports are merged as they come and built
    into an output only when read: once for every token that waited, where building an output a
    token cost ~5x as much per token (9.2 us against 1.9 on a 2-core x86 CPU, ten tokens a
    build), and a streaming server's readers fall behind under load. An in-process engine's
    delta outputs are added up. An exception ends the stream once what waited is read."""

    def __init__(self):
        self.item: tuple | RequestOutput | None = None
        self.own = False  # item is a RequestOutput copied here, which add_delta may change
        self.end: BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, item: tuple | RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self.end = item
        elif self.item is None or (isinstance(item, RequestOutput) and isinstance(self.item, tuple)):
            self.item, self.own = item, False  # (a failed output voids the reports of its request)
        elif isinstance(item, tuple) and isinstance(self.item, tuple):
            self.item = merge_reports(self.item, item)
        elif isinstance(item, RequestOutput):
            if not self.own:
                self.item, self.own = copy_output(self.item), True
            add_delta(self.item, item)
        self.ready.set()

    async def get(self) -> tuple | RequestOutput:
        while self.item is None:
            if self.end is not None:
                raise self.end
            self.ready.clear()
            await self.ready.wait()
        item, self.item = self.item, None
        return item


def _put_all(puts: list[tuple[_Waiting, object]]) -> None:
    for waiting, item in puts:
        waiting.put(item)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
