"""Engine output streams into HTTP: several prompts' streams merged, a non-streamed request
collected while watching for the client leaving, and server-sent events that end with an error
event when something fails after the stream began."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from pagedllm.engine.outputs import add_delta
from pagedllm.entrypoints.openai.errors import error_body
from pagedllm.errors import EngineDeadError, RequestFailedError
from pagedllm.outputs import RequestOutput

logger = logging.getLogger("pagedllm")
# Streams started in one turn of the event loop: each starts its engine request there (~0.1 ms), and a
# request may bring thousands of prompts, which all at once would hold up every other client for seconds.
_STARTS_PER_TURN = 64


async def merge(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several request streams as they come, tagged with the stream's index."""
    if len(streams) == 1:  # the common case, without a task and a queue between engine and client
        try:
            async for output in streams[0]:
                yield 0, output
        finally:
            await streams[0].aclose()  # a client that left: the stream's generator aborts its request
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, stream):
        try:
            async for output in stream:
                await queue.put((index, output))
        except BaseException as err:
            await queue.put((index, err))
            raise
        finally:
            await queue.put((index, None))

    tasks = []
    try:
        for start in range(0, len(streams), _STARTS_PER_TURN):  # a turn of the event loop between each few
            if start:
                await asyncio.sleep(0)
            tasks += [asyncio.create_task(pump(i, streams[i]))
                      for i in range(start, min(start + _STARTS_PER_TURN, len(streams)))]
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                if isinstance(item, RequestFailedError) and len(streams) > 1:
                    raise RequestFailedError(f"prompt {index}: {item}", status=item.status) from item
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a client that left: each stream's generator aborts its request


async def until_done_or_disconnect(raw: Request, streams) -> list[RequestOutput] | None:
    """Each stream's whole output, its delta outputs (or its final one) summed up as they come (a
    cumulative output copied what it held at each step: quadratic in a long request's logprobs);
    None if the client left first."""
    finals: dict[int, RequestOutput] = {}

    async def collect():
        async for index, output in merge(streams):
            finals[index] = add_delta(finals.get(index), output)

    task = asyncio.create_task(collect())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            return None
    task.result()
    return [finals[i] for i in sorted(finals)]


def event_stream(events: AsyncIterator[str], typed: bool = False) -> StreamingResponse:
    return StreamingResponse(sse(events, typed), media_type="text/event-stream")


async def sse(events: AsyncIterator[str], typed: bool = False) -> AsyncIterator[str]:
    """Server-sent events ending with ``[DONE]``; an error after the stream began becomes an error
    event (OpenAI's error JSON), so the client learns why its stream ended. ``typed``: each event
    comes whole (``event: TYPE`` and its data, the Responses API's), an error is an ``error``
    event, and no ``[DONE]`` follows."""
    try:
        async for event in events:
            yield f"{event}\n\n" if typed else f"data: {event}\n\n"
    except RequestFailedError as err:
        yield _error_event(err.status, f"the request failed in the engine: {err}", typed)
    except EngineDeadError as err:
        yield _error_event(503, str(err), typed)
    except Exception as err:  # a bug: the client still gets an answer, the server goes on
        logger.exception("a stream failed")
        yield _error_event(500, f"internal error: {type(err).__name__}: {err}", typed)
    if not typed:
        yield "data: [DONE]\n\n"


def _error_event(status: int, message: str, typed: bool) -> str:
    if typed:  # the Responses API's error event
        return f"event: error\ndata: {json.dumps({'type': 'error', 'code': str(status), 'message': message})}\n\n"
    return f"data: {json.dumps(error_body(status, message))}\n\n"
