"""Command-line options: the engine's follow from ``EngineConfig``'s fields (``max_model_len`` is
``--max-model-len``, with the field's help), the server's own are listed here."""

import argparse
import dataclasses
import json
import os
import types

API_KEY_ENV = "PAGEDLLM_API_KEY"


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per ``EngineConfig`` option but ``model`` and ``exclude``; defaults are the config's."""
    from pagedllm.config import EngineConfig

    group = parser.add_argument_group("engine options (LLM's arguments)")
    for f in dataclasses.fields(EngineConfig):
        if not f.init or f.name == "model" or f.name in exclude:
            continue
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if f.metadata.get("compat"):
            help_text += f" (accepted for vLLM scripts: {f.metadata['compat']})"
        kind = _value_type(f.type)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=f.default, help=help_text + _shown_default(f.default))


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                             "interface, then set an API key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on every route but /health and /metrics; set "
                             f"{API_KEY_ENV} instead, which other users cannot read in the process list")
    parser.add_argument("--served-model-name", help="the model name clients send (default: the model)")
    parser.add_argument("--chat-template", help="a Jinja chat template, or a file holding one")
    parser.add_argument("--chat-template-content-format", default="auto", choices=["auto", "string", "openai"],
                        help="the chat template sees each message's content as a string (string; auto does the "
                             "same) or as OpenAI's list of text parts (openai), as vLLM's flag")
    parser.add_argument("--max-request-bytes", type=int, default=8 << 20,
                        help="largest request body accepted, in bytes (default 8 MiB; larger ones get 413)")
    parser.add_argument("--api-server-count", type=count, default=1,
                        help="HTTP processes sharing the port and the engine (default 1): a busy server's HTTP "
                             "work (parsing, framing, sending each streamed token) spread over cores")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn's log level (default info), as vLLM's flag")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="no log line per request (as vLLM's flag): less work per request in a busy server")
    parser.add_argument("--enable-log-requests", action="store_true",
                        help="log each request as it starts: its id, prompt tokens and sampling parameters (not "
                             "its text), as vLLM's flag")
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="accepted for vLLM commands: requests are logged only with --enable-log-requests")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a client may take to send a request's head, or pause while sending its body "
                             "(default 30)")


def engine_args(parser: argparse.ArgumentParser) -> None:
    """The server's options and the engine's."""
    add_server_args(parser)
    add_engine_args(parser)


def engine_kwargs(args: argparse.Namespace, **overrides) -> dict:
    """The parsed engine options as ``EngineConfig`` / ``LLM`` keyword arguments (model included)."""
    from pagedllm.config import EngineConfig

    names = [f.name for f in dataclasses.fields(EngineConfig) if f.init]
    return {name: getattr(args, name) for name in names if hasattr(args, name)} | overrides


def engine_setting_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the parsed engine options (a value out of range, a model directory that
    is not there), checked before anything loads, for a command to say as argparse says a bad flag."""
    from pagedllm.config import EngineConfig

    try:
        EngineConfig(**engine_kwargs(args))
    except (ValueError, OSError) as err:
        return str(err)
    return None


def _value_type(annotation) -> type:
    """The type a flag's text becomes: the annotation without None (a dtype is given by name)."""
    members = [t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None)]
    if isinstance(annotation, types.UnionType) and str in members:
        return str
    return json.loads if dict in members else members[0]  # (JSON: a dict, or a number where one is taken too)


def _shown_default(default) -> str:
    return "" if default is None else f" (default {default})"


def count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
