"""OpenAI-compatible HTTP server: ``python -m pagedllm.entrypoints.openai.api_server --model DIR``
(or ``pagedllm serve DIR``). Routes: /v1/completions, /v1/chat/completions, /v1/models, /health,
/tokenize, /detokenize. Streaming is server-sent events ending with ``data: [DONE]``, as OpenAI
sends them; errors are OpenAI's error JSON."""

import argparse
import asyncio
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    random_id,
)
from pagedllm.entrypoints.server_args import engine_args
from pagedllm.errors import EngineDeadError
from pagedllm.outputs import RequestOutput

logger = logging.getLogger("pagedllm")
# For tokenizers without a chat template (OPT, GPT-2): "role: content" lines, then "assistant:".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            413: "BadRequestError"}.get(status, "InternalServerError")
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


def _bad_value(err: ValueError) -> ApiError:
    """A ValueError from pagedllm's checks, with the field it names."""
    message = str(err)
    field = re.match(r"(?:prompt \d+: )?SamplingParams\.(\w+)=", message)
    return ApiError(400, message, field.group(1) if field else "prompt" if message.startswith("prompt") else None)


class ApiKeyCheck:
    """Every /v1 route needs ``Authorization: Bearer <key>``. Plain ASGI: Starlette's
    ``BaseHTTPMiddleware`` would put a task group and a memory stream between each streamed chunk
    and the socket, about a quarter of the HTTP side's time at 200 streams (py-spy on the H200)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key: send 'Authorization: Bearer <key>'")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OpenAIServer:
    def __init__(self, engine: AsyncLLM, served_model_name: str, api_key: str | None = None,
                 chat_template: str | None = None):
        self.engine = engine
        self.metrics = ServerMetrics(engine)
        self.model_name = served_model_name
        self.api_key = api_key
        tokenizer = engine.tokenizer
        self.chat_template = chat_template
        if chat_template is None and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            logger.warning("the tokenizer has no chat template: chat uses pagedllm's plain built-in one "
                           "(\"role: content\" lines, then \"assistant:\"); --chat-template FILE overrides it")
            self.chat_template = DEFAULT_CHAT_TEMPLATE

    def app(self) -> FastAPI:
        app = FastAPI(title="pagedllm OpenAI-compatible server")

        if self.api_key:
            app.add_middleware(ApiKeyCheck, api_key=self.api_key)

        @app.exception_handler(RequestValidationError)
        async def invalid_body(request: Request, exc: RequestValidationError):
            first = exc.errors()[0] if exc.errors() else {}
            field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
            return error_response(400, f"invalid field {field}: {first.get('msg', 'bad request')}", field)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, exc: ApiError):
            return error_response(exc.status, exc.message, exc.param)

        @app.get("/health")
        async def health() -> Response:
            if self.engine._error is not None:
                return error_response(500, f"the engine stopped: {self.engine._error!r}")
            return Response(status_code=200)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models() -> ModelList:
            return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.engine.config.max_model_len)])

        @app.post("/tokenize")
        async def tokenize(body: dict):
            if "messages" in body:
                ids = self._chat_prompt(ChatCompletionRequest(model=self.model_name, **body))[1]
            else:
                ids = self._tokenizer().encode(str(body.get("prompt", "")))
            return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.config.max_model_len}

        @app.post("/detokenize")
        async def detokenize(body: dict):
            return {"prompt": self._tokenizer().decode(list(body.get("tokens", [])))}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, raw: Request):
            self._check_model(body.model)
            prompts = self._completion_prompts(body.prompt)
            params = self._params(body, body.max_tokens, body.logprobs)
            return await self._respond(raw, body, prompts, params, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, raw: Request):
            self._check_model(body.model)
            prompt = self._chat_prompt(body)
            params = self._params(body, body.max_completion_tokens or body.max_tokens, None)
            return await self._respond(raw, body, [prompt], params, chat=True)

        return app

    # requests

    def _tokenizer(self):
        if self.engine.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids")
        return self.engine.tokenizer

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`", "model")

    def _params(self, body, max_tokens, logprobs):
        try:
            return body.sampling_params(max_tokens, logprobs)
        except ValueError as err:
            raise _bad_value(err) from None

    def _completion_prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        return [(p, self._tokenizer().encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompt]

    def _chat_prompt(self, body: ChatCompletionRequest) -> tuple[str, list[int]]:
        tokenizer = self._tokenizer()
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template,
                                                 add_generation_prompt=body.add_generation_prompt)
        except Exception as err:
            raise ApiError(400, f"cannot render the chat template: {err}", "messages") from None
        return text, tokenizer.encode(text, add_special_tokens=False)

    # responses

    async def _respond(self, raw: Request, body, prompts, params, chat: bool):
        request_id = random_id("chatcmpl" if chat else "cmpl")
        for index, (_, token_ids) in enumerate(prompts):
            try:
                self.engine.validate(token_ids, params)
            except ValueError as err:
                raise _bad_value(ValueError(f"prompt {index}: {err}")) from None
        streams = [self._timed(self.engine.generate(f"{request_id}-{i}", ids, params, text))
                   for i, (text, ids) in enumerate(prompts)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._chat_events if chat else self._completion_events
            return StreamingResponse(_sse(events(request_id, body, prompts, streams, include_usage)),
                                     media_type="text/event-stream")
        finals = await _until_done_or_disconnect(raw, streams)
        if finals is None:
            return Response(status_code=499)  # the client left; its requests were aborted
        usage = _usage(finals)
        if chat:
            choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                  finish_reason=c.finish_reason) for c in finals[0].outputs]
            return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)
        choices = []
        for i, (final, (text, _)) in enumerate(zip(finals, prompts, strict=True)):
            for c in final.outputs:
                echo = (text or self._tokenizer().decode(final.prompt_token_ids)) if body.echo else ""
                choices.append(CompletionChoice(index=i * params.n + c.index, text=echo + c.text,
                                                logprobs=self._completion_logprobs(c, len(echo)),
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

    async def _timed(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """The stream, its latencies observed for /metrics."""
        arrival, token_times = time.monotonic(), []
        try:
            async for output in stream:
                token_times.append(time.monotonic())
                yield output
        finally:
            self.metrics.observe_request(arrival, token_times)
            await stream.aclose()

    def _completion_logprobs(self, completion, offset: int) -> CompletionLogprobs | None:
        if completion.logprobs is None:
            return None
        out = CompletionLogprobs()
        for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
            token = entry[token_id].decoded_token or ""
            out.tokens.append(token)
            out.token_logprobs.append(entry[token_id].logprob)
            out.top_logprobs.append({lp.decoded_token or "": lp.logprob for lp in entry.values()})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    async def _completion_events(self, request_id, body, prompts, streams, include_usage) -> AsyncIterator[str]:
        sent: dict[tuple[int, int], int] = {}
        finals: dict[int, RequestOutput] = {}
        async for prompt_index, output in _merge(streams):
            for c in output.outputs:
                key = (prompt_index, c.index)
                text = c.text[sent.get(key, 0):]
                if body.echo and key not in sent:
                    text = (prompts[prompt_index][0] or self._tokenizer().decode(output.prompt_token_ids)) + text
                sent[key] = len(c.text)
                if text or c.finish_reason:
                    choice = CompletionChoice(index=prompt_index * body.n + c.index, text=text,
                                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                    yield CompletionResponse(id=request_id, model=self.model_name, choices=[choice]).model_dump_json(
                        exclude_none=False)
            if output.finished:
                finals[prompt_index] = output
        if include_usage:
            usage = _usage([finals[i] for i in sorted(finals)])
            yield CompletionResponse(id=request_id, model=self.model_name, choices=[], usage=usage).model_dump_json()

    async def _chat_events(self, request_id, body, prompts, streams, include_usage) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            return ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices,
                                       usage=usage).model_dump_json()

        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(body.n)])
        sent: dict[int, int] = {}
        final = None
        async for _, output in _merge(streams):
            for c in output.outputs:
                text = c.text[sent.get(c.index, 0):]
                sent[c.index] = len(c.text)
                if text or c.finish_reason:
                    yield chunk([ChatChunkChoice(index=c.index, delta=ChatDelta(content=text or None),
                                                 finish_reason=c.finish_reason)])
            final = output
        if include_usage and final is not None:
            yield chunk([], _usage([final]))


def _text_of(content) -> str:
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


def _usage(finals: list[RequestOutput]) -> Usage:
    prompt_tokens = sum(len(f.prompt_token_ids) for f in finals)
    completion_tokens = sum(len(c.token_ids) for f in finals for c in f.outputs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def _merge(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
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

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a client that left: each stream's generator aborts its request


async def _until_done_or_disconnect(raw: Request, streams) -> list[RequestOutput] | None:
    finals: dict[int, RequestOutput] = {}

    async def collect():
        async for index, output in _merge(streams):
            if output.finished:
                finals[index] = output

    task = asyncio.create_task(collect())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            return None
    task.result()
    return [finals[i] for i in sorted(finals)]


async def _sse(events: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for event in events:
            yield f"data: {event}\n\n"
    except EngineDeadError as err:
        yield f"data: {error_response(500, str(err)).body.decode()}\n\n"
    yield "data: [DONE]\n\n"


def build_server(args: argparse.Namespace) -> OpenAIServer:
    config = EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, seed=args.seed,
        block_size=args.block_size, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks, load_format=args.load_format, enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size, enable_prefix_caching=args.enable_prefix_caching,
        async_scheduling=args.async_scheduling,
    )
    chat_template = args.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template) as f:
            chat_template = f.read()
    return OpenAIServer(AsyncLLM(config), args.served_model_name or args.model, args.api_key, chat_template)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    server = build_server(args)
    try:
        uvicorn.run(server.app(), host=args.host, port=args.port, log_level="info")
    finally:
        server.engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory, or hub id in the local HF cache")
    engine_args(parser)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
