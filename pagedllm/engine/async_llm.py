"""The engine loop in a background thread, for servers: requests are added and aborted at any
time from asyncio code, and each one's outputs arrive on its own queue as tokens are made."""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.errors import EngineDeadError, RequestFailedError
from pagedllm.inputs import PromptType, parse_prompt
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("pagedllm")


class AsyncLLM:
    """The engine for asyncio applications, as vLLM's ``AsyncLLM`` / ``AsyncLLMEngine``: requests
    from any number of coroutines are batched together. It owns an LLMEngine; only its thread
    touches it. ``generate`` is an async iterator of the request's outputs; leaving it early (a
    client that disconnects) aborts the request and frees its blocks. An error pinned on one
    request ends that request's iterator with ``RequestFailedError``; an error the engine cannot
    survive ends every iterator with ``EngineDeadError``, and ``on_dead`` is called (the server
    then exits, for a supervisor to restart it)."""

    def __init__(self, config: EngineConfig, on_dead: Callable[[], None] | None = None):
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.config = config
        self.on_dead = on_dead
        self.stats = self.engine.stats()
        self._commands: queue.Queue = queue.Queue()  # ("add", args) / ("abort", id) / ("stop", None)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pagedllm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineConfig) -> "AsyncLLM":
        """vLLM's constructor: ``AsyncLLM.from_engine_args(AsyncEngineArgs(model=...))``."""
        return cls(engine_args)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request could never run (the engine's own checks, thread-safe:
        they only read its configuration)."""
        self.engine.validate_request(prompt_token_ids, params)

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine makes them (vLLM's signature): cumulative, so a reader
        that falls behind gets the newest; with ``RequestOutputKind.DELTA`` each output holds only
        what is new and none is skipped. A text prompt is tokenized in a worker thread."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error!r}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, prompt_token_ids = parse_prompt(prompt, self.tokenizer)
        else:
            text, prompt_token_ids = await asyncio.to_thread(parse_prompt, prompt, self.tokenizer)
        if sampling_params.structured_outputs is None:
            self.validate(prompt_token_ids, sampling_params)
        else:  # compiling a schema or grammar may take a while: not on the event loop
            await asyncio.to_thread(self.validate, prompt_token_ids, sampling_params)
        if sampling_params.samples > sampling_params.n and sampling_params.output_kind != RequestOutputKind.FINAL_ONLY:
            raise ValueError(f"SamplingParams.best_of={sampling_params.best_of} is invalid: it needs "
                             "output_kind=RequestOutputKind.FINAL_ONLY (the best samples are known only at the end)")
        skip_to_newest = sampling_params.output_kind != RequestOutputKind.DELTA
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", (request_id, prompt_token_ids, sampling_params, text)))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                while skip_to_newest and not outputs.empty() and not isinstance(output, BaseException):
                    output = outputs.get_nowait()  # outputs are cumulative: a reader behind skips to the newest
                if isinstance(output, BaseException):
                    raise output
                if output.error is not None:
                    finished = True
                    raise RequestFailedError(output.error)
                finished = output.finished
                yield output
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    @property
    def num_unfinished_requests(self) -> int:
        return self.stats.num_running + self.stats.num_waiting

    def shutdown(self) -> None:
        """Stop the engine thread and free the engine; streams still open end with EngineDeadError."""
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)
        self._deliver([(request_id, EngineDeadError("the engine was shut down")) for request_id in list(self._streams)])
        self.engine.shutdown()

    def _loop(self) -> None:
        engine = self.engine
        try:
            while True:
                # block for a command only when there is nothing to run
                block = not engine.has_unfinished_requests()
                while True:
                    try:
                        command, arg = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    block = False
                    if command == "stop":
                        return
                    if command == "add":
                        self._add(*arg)
                    else:
                        engine.abort_request(arg)
                if engine.has_unfinished_requests():
                    self._deliver([(output.request_id, output) for output in engine.step()])
                self.stats = engine.stats()
        except BaseException as err:  # the engine is broken: every waiting client gets the error
            logger.exception("the engine loop failed; the server stops")
            self.error = err
            self._deliver([(request_id, EngineDeadError(f"the engine stopped: {err!r}"))
                           for request_id in list(self._streams)])
            if self.on_dead is not None:
                self.on_dead()

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None) -> None:
        if request_id not in self._streams:  # its client left before it got here
            return
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, prompt=prompt, stream=True)
        except ValueError as err:  # checked before it was queued, so only a bug gets here: this request's alone
            logger.exception("request %s could not be added", request_id)
            self._deliver([(request_id, RequestFailedError(str(err)))])

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        """Hand a step's outputs to their streams: one wake-up of each event loop per step, not one
        per request (each wake-up is a write to the loop's self-pipe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                loop, outputs = stream
                by_loop.setdefault(loop, []).append((outputs, item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in puts:
        outputs.put_nowait(item)
