"""OpenAI-compatible HTTP server: ``python -m pagedllm.entrypoints.openai.api_server --model DIR``
(or ``pagedllm serve DIR``). Routes: /v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics, /tokenize, /detokenize. Streaming is server-sent events ending with ``data: [DONE]``, as
OpenAI sends them; every error is OpenAI's error JSON."""

import argparse
import gc
import logging
import os
import sys

from fastapi import FastAPI, Request
from fastapi.responses import Response

from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.errors import (
    DOCUMENTED,
    error_response,
    install_error_handlers,
    openai_errors_in_schema,
)
from pagedllm.entrypoints.openai.guards import ApiKeyCheck, BodyLimits, http_with_head_timeout
from pagedllm.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
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
)
from pagedllm.entrypoints.openai.serving import OpenAIServing
from pagedllm.entrypoints.server_args import engine_args, engine_kwargs

logger = logging.getLogger("pagedllm")
# For tokenizers without a chat template (OPT, GPT-2): "role: content" lines, then "assistant:".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream"}}


class OpenAIServer:
    def __init__(self, engine: AsyncLLM, served_model_name: str, api_key: str | None = None,
                 chat_template: str | None = None, max_request_bytes: int = 8 << 20, read_timeout: float = 30.0):
        self.engine = engine
        self.metrics = ServerMetrics(engine)
        self.model_name = served_model_name
        self.api_key = api_key
        self.max_request_bytes, self.read_timeout = max_request_bytes, read_timeout
        tokenizer = engine.tokenizer
        if chat_template is None and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            logger.warning("the tokenizer has no chat template: chat uses pagedllm's plain built-in one "
                           "(\"role: content\" lines, then \"assistant:\"); --chat-template FILE overrides it")
            chat_template = DEFAULT_CHAT_TEMPLATE
        self.serving = OpenAIServing(engine, served_model_name, chat_template, self.metrics)

    def app(self) -> FastAPI:
        app = FastAPI(title="pagedllm OpenAI-compatible server", responses=DOCUMENTED)
        app.add_middleware(BodyLimits, max_bytes=self.max_request_bytes, read_timeout=self.read_timeout)
        if self.api_key:
            app.add_middleware(ApiKeyCheck, api_key=self.api_key)
        install_error_handlers(app)
        openai_errors_in_schema(app)
        serving = self.serving

        @app.get("/health", response_model=HealthResponse)
        async def health():
            if self.engine.error is not None:
                return error_response(503, f"the engine stopped: {self.engine.error!r}; the server is shutting down")
            return HealthResponse()

        @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=CONTENT_TYPE)

        @app.get("/v1/models", response_model=ModelList)
        async def models() -> ModelList:
            return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.engine.config.max_model_len)])

        @app.post("/tokenize", response_model=TokenizeResponse)
        async def tokenize(body: TokenizeRequest):
            return await serving.tokenize(body)

        @app.post("/detokenize", response_model=DetokenizeResponse)
        async def detokenize(body: DetokenizeRequest):
            return await serving.detokenize(body)

        @app.post("/v1/completions", response_model=CompletionResponse, responses=STREAMED)
        async def completions(body: CompletionRequest, raw: Request):
            return await serving.completions(body, raw)

        @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=STREAMED)
        async def chat_completions(body: ChatCompletionRequest, raw: Request):
            return await serving.chat(body, raw)

        return app


def build_server(args: argparse.Namespace) -> OpenAIServer:
    chat_template = args.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template) as f:
            chat_template = f.read()
    engine = AsyncLLM(EngineConfig(**engine_kwargs(args)))
    return OpenAIServer(engine, args.served_model_name or args.model, args.api_key, chat_template,
                        args.max_request_bytes, args.read_timeout)


def uvicorn_server(server: OpenAIServer, host: str, port: int, log_level: str = "info"):
    """uvicorn, with time limits on reading each request (head and body), and stopping when the
    engine dies."""
    import uvicorn

    config = uvicorn.Config(server.app(), host=host, port=port, log_level=log_level, http=http_with_head_timeout(
        server.read_timeout), timeout_keep_alive=5, timeout_graceful_shutdown=10)
    uv = uvicorn.Server(config)

    def stop() -> None:
        uv.should_exit = True  # uvicorn polls it: answers what it can, then returns

    server.engine.on_dead = stop
    return uv


def serve(args: argparse.Namespace) -> int:
    """Run until stopped; non-zero if the engine died, so that a supervisor restarts the server."""
    server = build_server(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("serving on %s without an API key: anyone who can reach it may use it (set %s)",
                       args.host, "PAGEDLLM_API_KEY")
    # the start-up heap (torch, transformers, the tokenizer: ~400k objects) is there while the server is: kept
    # out of the collector's full passes, which otherwise stall every stream for 100-300 ms a few times a second
    gc.collect()
    gc.freeze()
    try:
        uvicorn_server(server, args.host, args.port).run()
    finally:
        server.engine.shutdown()
        gc.unfreeze()  # (a process that goes on, as a test's, collects its objects again)
    if server.engine.error is not None:
        logger.error("exiting with status 1: the engine stopped (%r)", server.engine.error)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or hub id")
    engine_args(parser)
    sys.exit(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
