"""Every error the server sends, on every route, is OpenAI's error JSON:
``{"error": {"message", "type", "param", "code"}}``; the OpenAPI schema says so."""

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse
from pagedllm.errors import EngineDeadError, RequestFailedError

logger = logging.getLogger("pagedllm")

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 408: "RequestTimeoutError", 413: "RequestTooLargeError",
               503: "ServiceUnavailableError"}
# Routes vLLM or OpenAI serve for other kinds of model: a client that calls one is told why, not just "Not Found".
NOT_SERVED = {"/v1/embeddings": "embeddings", "/pooling": "pooling", "/classify": "classification",
              "/score": "scores", "/v1/score": "scores", "/rerank": "reranking", "/v1/rerank": "reranking",
              "/v2/rerank": "reranking", "/v1/audio/transcriptions": "transcription",
              "/v1/audio/translations": "translation", "/v1/images/generations": "image generation"}
# The errors each route documents (FastAPI's own 422 is never sent: invalid bodies get 400).
DOCUMENTED = {status: {"model": ErrorResponse, "description": ERROR_TYPES.get(status, "InternalServerError")}
              for status in (400, 401, 404, 408, 413, 500, 503)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status)).model_dump()


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def bad_value(err: ValueError, prompt_index: int | None = None, prompt_field: str = "prompt",
              structured_field: str = "structured_outputs") -> ApiError:
    """A ValueError from pagedllm's checks as a 400, with the request's field it is about: the
    sampling field it names (a structured output's as ``structured_field``, the one the request
    gave it in), else, for an error about a prompt, ``prompt_field`` (a completion's prompts are
    numbered, a chat's one prompt is its messages)."""
    numbered = prompt_index is not None and prompt_field == "prompt"
    message = f"prompt {prompt_index}: {err}" if numbered else str(err)
    field = re.search(r"SamplingParams\.(\w+)[.=]|^(response_format) ", message)
    param = next(filter(None, field.groups())) if field else prompt_field if prompt_index is not None else None
    return ApiError(400, message, structured_field if param == "structured_outputs" else param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        location = [str(p) for p in first.get("loc", ())]
        if first.get("type") == "json_invalid" or len(location) < 2:
            return error_response(400, f"the body is not a valid JSON object: {first.get('msg', 'cannot parse it')}")
        return error_response(400, f"invalid field {_problems(errors)}", location[1])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        status = exc.status_code
        message = exc.detail if status != 400 else f"cannot read the body: {exc.detail}"
        task = NOT_SERVED.get(request.url.path.rstrip("/")) if status == 404 else None
        if task:
            message = (f"{request.url.path} is not served: pagedllm runs generative models (/v1/completions, "
                       f"/v1/chat/completions, /v1/responses), not {task}")
        return error_response(status, str(message))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestFailedError)
    async def request_failed(request: Request, exc: RequestFailedError):
        return error_response(exc.status, f"the request failed in the engine: {exc}")

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError):
        return error_response(503, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def _problems(errors: list[dict]) -> str:
    """pydantic's errors as "field.path: message", one per place: a value that fits none of a
    union's types gets an error per type, named by the type (``prompt.list[int].0``), which is
    dropped from the path."""
    seen = []
    for error in errors:
        path = ".".join(str(p) for p in error.get("loc", ())[1:] if not _is_union_tag(p))
        problem = f"{path}: {error.get('msg', 'bad value')}"
        if problem not in seen:
            seen.append(problem)
    return "; or ".join(seen[:4])


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def openai_errors_in_schema(app: FastAPI) -> None:
    """Drop FastAPI's 422 and its validation-error schemas from the OpenAPI document: invalid
    bodies get 400 with OpenAI's error JSON, which every route documents instead."""
    make_schema = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make_schema()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
