"""Request bodies read and validated by the routes themselves, a large one in a process of its
own. FastAPI parses and validates every body on the event loop, and the work holds the GIL
throughout (JSON parsing and pydantic are C and Rust), so a worker thread would not help: a body
of 6 MB of nested one-token prompts took 3.3 s, during which every other client waited. The
OpenAPI schema still documents each route's body."""

import asyncio
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from pagedllm.entrypoints.openai.errors import ApiError

Body = TypeVar("Body", bound=BaseModel)
# Bodies up to this size are validated on the event loop: at most ~8 ms (nested one-token prompts,
# the slowest JSON per byte found), where a process's round trip costs about a millisecond.
INLINE_BYTES = 16 << 10
_REF = "#/components/schemas/{model}"
_ERRORS_KEPT = 16  # (the 400 names the first four)
_IGNORED_SAID = 1000  # ignored field names warned of, at most (a client can send endless new ones)
logger = logging.getLogger("pagedllm")


class BodyReader:
    """Validates bodies; those over ``INLINE_BYTES`` in a worker process (spawned: this process
    has threads), which takes ~2 s and ~300 MB to start: ``start`` starts it ahead (``pagedllm
    serve`` does, lest the first long prompt wait), else the first large body does."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None
        self._said: set[tuple[str, str]] = set()  # (route, field) already warned of

    def start(self) -> None:
        """Start the worker process now, in the background."""
        self._workers().submit(int)

    async def read(self, raw: Request, model: type[Body]) -> Body:
        """The request's body as ``model``; an invalid one raises FastAPI's RequestValidationError (a 400)."""
        data = await raw.body()
        if len(data) <= INLINE_BYTES:
            result = validated(model, data)
        else:
            try:
                result = await asyncio.wrap_future(self._workers().submit(validated, model, data))
            except BrokenProcessPool:  # the worker died (killed, out of memory): the next body gets a new one
                self._pool = None
                raise ApiError(500, "the process that validates large bodies died; send the request again") from None
        if isinstance(result, list):
            raise RequestValidationError(result)
        self._say_ignored(raw.url.path, result)
        return result

    def _say_ignored(self, route: str, body: BaseModel) -> None:
        """Warn, once per route and name, of fields a body had that the route does not take (a typo,
        or another server's field): they change nothing, and the client is not told."""
        for name in body.model_extra or ():
            if (route, name) not in self._said and len(self._said) < _IGNORED_SAID:
                self._said.add((route, name))
                logger.warning("%s: the field %r is not one this server takes: ignored (said once)", route,
                               name[:100])

    def _workers(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent)
        return self._pool

    def shutdown(self) -> None:
        """End the worker at once: it holds nothing, and one still starting (importing torch: 2.3 s on
        an idle 2-core machine) held its server's exit up as long."""
        if self._pool is not None:
            kill_workers = getattr(self._pool, "kill_workers", None)  # (Python 3.14's; before it, its processes)
            if kill_workers is not None:
                kill_workers()
            else:
                for process in list(self._pool._processes.values()):
                    process.kill()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _exit_with_parent() -> None:
    """In the worker: end when this server process ends, killed or not (nothing else tells it)."""
    def watch() -> None:
        mp.connection.wait([mp.parent_process().sentinel])
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def validated(model: type[Body], data: bytes) -> Body | list[dict]:
    """``data`` as ``model``, or its first errors as FastAPI locates them (under "body"): a list of a
    million prompts that fits no type of a union has an error for each."""
    try:  # json's parser, as FastAPI's: it takes a lone surrogate's escape, which the checks then name
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # (not UTF-8, not JSON, nested too deeply)
        return [{"type": "json_invalid", "loc": ("body",), "msg": f"{type(err).__name__}: {err}"}]
    try:
        return model.model_validate(value)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False, include_context=False)[:_ERRORS_KEPT]
        return [{**e, "loc": ("body", *e["loc"])} for e in errors]


def json_body(model: type[BaseModel]) -> dict:
    """A route's ``openapi_extra``: its body is ``model`` (``documented_bodies`` adds the schema)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def documented_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put the body models' JSON schemas (and those they use) in the app's OpenAPI components."""
    make_schema = app.openapi

    def openapi() -> dict:
        schema = make_schema()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            own = model.model_json_schema(ref_template=_REF)
            components.update(own.pop("$defs", {}))
            components[model.__name__] = own
        return schema

    app.openapi = openapi
