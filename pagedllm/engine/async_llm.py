"""The engine loop in a background thread, for servers: requests are added and aborted at any
time from asyncio code, and each one's outputs arrive on its own queue as tokens are made."""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.errors import EngineDeadError
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger("pagedllm")


class AsyncLLM:
    """Owns an LLMEngine; only its thread touches it. ``generate`` is an async iterator of the
    request's cumulative outputs; leaving it early (a client that disconnects) aborts the request
    and frees its blocks."""

    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.config = config
        self._commands: queue.Queue = queue.Queue()  # ("add", args) / ("abort", id) / ("stop", None)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="pagedllm-engine", daemon=True)
        self._thread.start()

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request could never run (the engine's own checks, thread-safe:
        they only read its configuration)."""
        self.engine.validate_request(prompt_token_ids, params)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise EngineDeadError(f"the engine stopped: {self._error!r}")
        self.validate(prompt_token_ids, params)
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._commands.put(("add", (request_id, prompt_token_ids, params, prompt)))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                while not outputs.empty() and not isinstance(output, BaseException):
                    output = outputs.get_nowait()  # outputs are cumulative: a reader behind skips to the newest
                if isinstance(output, BaseException):
                    raise EngineDeadError(f"the engine stopped: {output!r}") from output
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
        scheduler = self.engine.scheduler
        return len(scheduler.running) + len(scheduler.waiting)

    def shutdown(self) -> None:
        self._commands.put(("stop", None))
        self._thread.join(timeout=30)
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
                        request_id, prompt_token_ids, params, prompt = arg
                        if request_id in self._streams:
                            engine.add_request(request_id, prompt_token_ids, params, prompt=prompt, stream=True)
                    else:
                        engine.abort_request(arg)
                if engine.has_unfinished_requests():
                    self._deliver([(output.request_id, output) for output in engine.step()])
        except BaseException as err:  # the engine is broken: every waiting client gets the error
            logger.exception("the engine loop failed")
            self._error = err
            self._deliver([(request_id, err) for request_id in list(self._streams)])

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
