"""OpenAI-compatible HTTP server: ``python -m pagedllm.entrypoints.openai.api_server --model DIR``
(or ``pagedllm serve DIR``). Routes: /v1/completions, /v1/chat/completions, /v1/responses, /v1/models, /health
(and /ping), /version, /metrics, /tokenize, /detokenize. Streaming is server-sent events ending with
``data: [DONE]``, as OpenAI sends them; every error is OpenAI's error JSON."""

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import threading

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from pagedllm import __version__
from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.bodies import BodyReader, documented_bodies, json_body
from pagedllm.entrypoints.openai.errors import (
    DOCUMENTED,
    error_response,
    install_error_handlers,
    openai_errors_in_schema,
)
from pagedllm.entrypoints.openai.guards import ApiKeyCheck, BodyLimits, http_with_head_timeout
from pagedllm.entrypoints.openai.metrics import CONTENT_TYPE, MULTIPROCESS_DIR_ENV, ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from pagedllm.entrypoints.openai.responses import ResponseObject, ResponsesRequest
from pagedllm.entrypoints.openai.serving import OpenAIServing
from pagedllm.entrypoints.server_args import engine_args, engine_kwargs, engine_setting_error

logger = logging.getLogger("pagedllm")
SHUTDOWN_GRACE_S = 10  # a stopped server's running requests have this long to finish
# For tokenizers without a chat template (OPT, GPT-2): "role: content" lines, then "assistant:".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"}}


class OpenAIServer:
    """The server's routes over an engine, with the options of ``pagedllm serve`` (``args``)."""

    def __init__(self, engine: AsyncLLM, args: argparse.Namespace):
        self.engine = engine
        self.args = args
        self.metrics = ServerMetrics(engine)
        # vLLM's: a request may name any of them; responses carry the first
        self.model_names = args.served_model_name or [args.model]
        self.model_name = self.model_names[0]
        self.api_key = args.api_key
        self.max_request_bytes, self.read_timeout = args.max_request_bytes, args.read_timeout
        chat_template = args.chat_template
        if chat_template and os.path.isfile(chat_template):
            with open(chat_template) as f:
                chat_template = f.read()
        tokenizer = engine.tokenizer
        if chat_template is None and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            logger.warning("the tokenizer has no chat template: chat uses pagedllm's plain built-in one "
                           "(\"role: content\" lines, then \"assistant:\"); --chat-template FILE overrides it")
            chat_template = DEFAULT_CHAT_TEMPLATE
        if args.disable_frontend_multiprocessing:
            logger.info("--disable-frontend-multiprocessing: the engine runs in a process of its own here, whatever "
                        "the flag")
        self.serving = OpenAIServing(engine, self.model_names, chat_template, self.metrics, args)
        self.bodies = BodyReader()

    def shutdown(self) -> None:
        self.engine.shutdown()
        self.bodies.shutdown()

    def app(self) -> FastAPI:
        app = FastAPI(title="pagedllm OpenAI-compatible server", responses=DOCUMENTED)
        app.add_middleware(BodyLimits, max_bytes=self.max_request_bytes, read_timeout=self.read_timeout)
        if self.api_key:
            app.add_middleware(ApiKeyCheck, api_key=self.api_key)
        if self.args.allowed_origins:  # outermost: a browser's preflight is answered before the key is asked for
            app.add_middleware(CORSMiddleware, allow_origins=self.args.allowed_origins,
                               allow_methods=self.args.allowed_methods, allow_headers=self.args.allowed_headers,
                               allow_credentials=self.args.allow_credentials)
        install_error_handlers(app)
        documented_bodies(app, [TokenizeRequest, DetokenizeRequest, CompletionRequest, ChatCompletionRequest,
                                ResponsesRequest])
        openai_errors_in_schema(app)
        serving = self.serving

        @app.get("/health", response_model=HealthResponse)
        @app.get("/ping", response_model=HealthResponse)  # vLLM's (SageMaker's probe), GET and POST
        @app.post("/ping", response_model=HealthResponse)
        async def health():
            if self.engine.error is not None:
                return error_response(503, f"the engine stopped: {self.engine.error!r}; the server is shutting down")
            return HealthResponse()

        @app.get("/version", response_model=VersionResponse)
        async def version() -> VersionResponse:
            return VersionResponse(version=__version__)

        @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=CONTENT_TYPE)

        @app.get("/v1/models", response_model=ModelList)
        async def models() -> ModelList:
            return ModelList(data=[ModelCard(id=name, root=self.args.model,
                                             max_model_len=self.engine.config.max_model_len)
                                   for name in self.model_names])

        @app.post("/tokenize", response_model=TokenizeResponse, openapi_extra=json_body(TokenizeRequest))
        async def tokenize(raw: Request):
            return await serving.tokenize(await self.bodies.read(raw, TokenizeRequest))

        @app.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=json_body(DetokenizeRequest))
        async def detokenize(raw: Request):
            return await serving.detokenize(await self.bodies.read(raw, DetokenizeRequest))

        @app.post("/v1/completions", response_model=CompletionResponse, responses=STREAMED,
                  openapi_extra=json_body(CompletionRequest))
        async def completions(raw: Request):
            return await serving.completions(await self.bodies.read(raw, CompletionRequest), raw)

        @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED,
                  openapi_extra=json_body(ChatCompletionRequest))
        async def chat_completions(raw: Request):
            return await serving.chat(await self.bodies.read(raw, ChatCompletionRequest), raw)

        @app.post("/v1/responses", response_model=ResponseObject, responses=STREAMED,
                  openapi_extra=json_body(ResponsesRequest))
        async def responses(raw: Request):
            return await serving.responses(await self.bodies.read(raw, ResponsesRequest), raw)

        return app


def build_server(args: argparse.Namespace, engine_connections: list | None = None) -> OpenAIServer:
    """The server of ``args``; with ``engine_connections``, over engine processes already started
    (one API-server process of several)."""
    engine = AsyncLLM(EngineConfig(**engine_kwargs(args)), engine_connections=engine_connections)
    return OpenAIServer(engine, args)


def uvicorn_server(server: OpenAIServer, args: argparse.Namespace):
    """uvicorn on ``args``' address and log settings, with time limits on reading each request
    (head and body), and stopping when the engine dies. Stopped, it gives the requests that run
    ``SHUTDOWN_GRACE_S`` to finish, then ends the rest with a 503 (a stream with an error event),
    so that every client is told why: uvicorn would cancel them, a plain-text 500 or a stream cut
    short, with a traceback in the log."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            timer = asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, server.engine.end_streams,
                                                          "the server is shutting down")
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    config = uvicorn.Config(server.app(), host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            access_log=not args.disable_uvicorn_access_log,
                            http=http_with_head_timeout(server.read_timeout), timeout_keep_alive=5,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S + 5,  # (the time to send those 503s)
                            root_path=args.root_path, ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                            ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs)
    uv = Server(config)

    def stop() -> None:
        uv.should_exit = True  # uvicorn polls it: answers what it can, then returns

    server.engine.on_dead = stop
    return uv


def serve(args: argparse.Namespace) -> int:
    """Run until stopped; non-zero if the engine died, so that a supervisor restarts the server."""
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without an API key: anyone who can reach it may use it (set %s)",
                       args.host, "PAGEDLLM_API_KEY")
    if args.api_server_count > 1:
        return serve_in_processes(args)
    return _serve_here(args)


def _serve_here(args: argparse.Namespace, engine_connections: list | None = None, sock=None) -> int:
    """The server in this process (with ``sock``: listening on a socket shared with other API-server
    processes)."""
    server = build_server(args, engine_connections)
    # the start-up heap (torch, transformers, the tokenizer: ~400k objects) is there while the server is: kept
    # out of the collector's full passes, which otherwise stall every stream for 100-300 ms a few times a second
    gc.collect()
    gc.freeze()
    uv = uvicorn_server(server, args)
    previous = _stop_quietly(uv)
    try:
        server.bodies.start()  # once a stop is handled: killed before, it would leave the pool's semaphores behind
        uv.run(sockets=None if sock is None else [sock])
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.shutdown()
        gc.unfreeze()  # (a process that goes on, as a test's, collects its objects again)
    if server.engine.error is not None:
        logger.error("exiting with status 1: the engine stopped (%r)", server.engine.error)
        return 1
    return 0


def _stop_quietly(uv) -> dict:
    """Ctrl-C and SIGTERM stop uvicorn ``uv``, also before it has set its own handlers (a stop that
    came then was lost, and the server served on: a watching process waited 30 s, then killed it).
    Once uvicorn has stopped it raises the signal again for the handler it found, which would end
    the process with a KeyboardInterrupt's traceback (or killed by SIGTERM) before the engine is
    shut down: this one lets ``serve`` return 0 instead, as a stop is how a server ends. Returns
    the handlers it replaced (none off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def stop(*_) -> None:
        uv.should_exit = True  # (uvicorn looks at it once started, and then polls it)

    return {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}


def serve_in_processes(args: argparse.Namespace) -> int:
    """``--api-server-count N``: the engine processes, then N API-server processes accepting on one
    listening socket, each with its own pipe to every engine process (as vLLM's
    ``--api-server-count``); their Prometheus metrics are summed through a shared directory. This
    process watches them: a stop (Ctrl-C, SIGTERM) stops them all, status 0; any of them dying
    stops the rest, status 1."""
    import multiprocessing as mp
    import shutil
    import tempfile

    import uvicorn

    from pagedllm.engine.data_parallel import start_replicas, stop_replicas

    config = EngineConfig(**engine_kwargs(args))
    sock = uvicorn.Config(None, host=args.host, port=args.port).bind_socket()
    metrics_dir = tempfile.mkdtemp(prefix="pagedllm-metrics-")
    replicas, servers = [], []
    # Ctrl-C and SIGTERM both stop it, whatever it inherited: started with `&` from a script, its SIGINT
    # came ignored, and Python then leaves it so (a `kill -INT` did nothing; uvicorn's own handlers, in
    # each API server, are set whatever came before)
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        replicas, pipes = start_replicas(config, args.api_server_count)
        ctx = mp.get_context("spawn")  # a fresh interpreter each: nothing of this process's threads or state
        os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir  # (for them alone: prometheus_client reads it on import)
        try:
            for index, theirs in enumerate(pipes):
                servers.append(ctx.Process(target=_api_server_process, args=(args, theirs, sock),
                                           name=f"pagedllm-api{index}"))
                servers[-1].start()
        finally:
            del os.environ[MULTIPROCESS_DIR_ENV]
            for conn in [conn for theirs in pipes for conn in theirs]:
                conn.close()  # theirs alone now: a pipe closes when its API server dies
        logger.error("%s exited: stopping the server, status 1", ", ".join(_first_to_exit(servers, replicas)))
        status = 1
    except KeyboardInterrupt:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for process in servers:
            if process.is_alive():
                process.terminate()  # uvicorn's graceful shutdown: each answers what it can
        for process in servers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        stop_replicas(replicas)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _first_to_exit(servers: list, replicas: list) -> list[str]:
    """Wait until an API server or an engine process exits; name those that did. Meanwhile read
    what the engine processes send this one (each step's stats): unread, its full pipe would hold
    an engine up (a stop would then wait for it, and kill it 30 s later)."""
    import multiprocessing.connection

    watched = {p.sentinel: p.name for p in servers} | {r.process.sentinel: f"engine process {r.index}"
                                                        for r in replicas}
    pipes = [r.conn for r in replicas]
    while True:
        ready = multiprocessing.connection.wait(list(watched) + pipes)
        # by sentinel, not is_alive(): a process is reaped a moment after its sentinel closes
        gone = [watched[s] for s in ready if s in watched]
        if gone:
            return gone
        for conn in ready:
            try:
                conn.recv()
            except (EOFError, OSError):  # its process's sentinel follows
                pipes.remove(conn)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _api_server_process(args: argparse.Namespace, engine_connections: list, sock) -> None:
    os.setpgrp()  # Ctrl-C in a terminal reaches the watching process alone, which stops each of us once
    sys.exit(_serve_here(args, engine_connections, sock))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or hub id")
    engine_args(parser)
    args = parser.parse_args(argv)
    if error := engine_setting_error(args):
        parser.error(error)
    sys.exit(serve(args))


if __name__ == "__main__":
    main()
