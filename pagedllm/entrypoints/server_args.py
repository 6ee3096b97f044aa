"""Command-line options: the engine's follow from ``EngineConfig``'s fields (``max_model_len`` is
``--max-model-len``, with the field's help), the server's own are listed here."""

import argparse
import dataclasses
import json
import os
import socket
import types

from pagedllm.tool_calls import TOOL_CALL_PARSERS

API_KEY_ENV = "PAGEDLLM_API_KEY"
# HTTP processes at most: each holds pipes to the engine process and the watching one, so thousands run out of file
# descriptors (100,000 was an OSError after the model had loaded), and far fewer than that already share the cores
MAX_API_SERVERS = 128
# vLLM serve's flags for what the server does not do: taken, so that the command names what is missing
UNSUPPORTED_SERVER_FLAGS = {
    "lora_modules": "LoRA adapters are not supported (merge the adapter into the weights and serve that)",
}


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
        elif bool in getattr(f.type, "__args__", ()):  # a value, or the flag alone for True (vLLM's --hf-token)
            group.add_argument(flag, type=kind, nargs="?", const=True, default=f.default,
                               help=help_text + _shown_default(f.default))
        else:
            group.add_argument(flag, type=kind, default=f.default, help=help_text + _shown_default(f.default))


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                             "interface, then set an API key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on every route but the probes (/health, /ping, "
                             f"/version) and /metrics; set {API_KEY_ENV} instead, which other users cannot read in "
                             "the process list")
    parser.add_argument("--served-model-name", nargs="+",
                        help="the model name clients send (default: the model); given several, a request may name "
                             "any and responses carry the first, as vLLM's")
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
    parser.add_argument("--max-log-len", type=int, default=2000,
                        help="with --enable-log-requests: the most characters of a request's line logged (default "
                             "2000)")
    parser.add_argument("--ssl-keyfile", help="serve HTTPS: the server's private key file (with --ssl-certfile)")
    parser.add_argument("--ssl-certfile", help="serve HTTPS: the server's certificate file (with --ssl-keyfile)")
    parser.add_argument("--ssl-ca-certs", help="HTTPS: the CA certificates that client certificates are checked with")
    parser.add_argument("--ssl-cert-reqs", type=int, default=0, choices=[0, 1, 2],
                        help="HTTPS: client certificates 0 not asked for, 1 optional, 2 required (Python's "
                             "ssl.CERT_*, as uvicorn's and vLLM's flag)")
    parser.add_argument("--root-path", default="", help="the path prefix a proxy serves the server under (FastAPI's "
                                                        "root_path), as vLLM's flag")
    parser.add_argument("--allowed-origins", type=json.loads, default=[],
                        help="CORS: the origins whose web pages may call the server, a JSON list ('[\"*\"]': any). "
                             "None by default, where vLLM allows any: then a page of any site could use a server on "
                             "your machine")
    for what in ("methods", "headers"):
        parser.add_argument(f"--allowed-{what}", type=json.loads, default=["*"],
                            help=f"CORS: the {what} allowed, a JSON list (default any)")
    parser.add_argument("--allow-credentials", action="store_true", help="CORS: allow cookies and credentials")
    parser.add_argument("--enable-prompt-tokens-details", action="store_true",
                        help="accepted for vLLM commands: every usage has prompt_tokens_details here")
    parser.add_argument("--disable-frontend-multiprocessing", action="store_true",
                        help="accepted for vLLM commands: the engine runs in a process of its own here either way")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='chat\'s tool_choice "auto" (the default where tools are given): the model\'s own tool '
                             "calls, read out of its answers by --tool-call-parser, as vLLM's flag (\"required\" and "
                             "a named function are forced by a structured output, and need neither flag)")
    parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS,
                        help="with --enable-auto-tool-choice: the format the model writes its calls in (hermes: "
                             "Hermes, Qwen2.5, Qwen3, QwQ; llama3_json: Llama 3.1-3.3; mistral; openai: gpt-oss's "
                             "harmony), vLLM's names")
    for name, what in UNSUPPORTED_SERVER_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), nargs="+", help=f"refused: {what}")


def engine_args(parser: argparse.ArgumentParser) -> None:
    """The server's options and the engine's, with the server's step budget."""
    from pagedllm.config import SERVER_MAX_NUM_BATCHED_TOKENS

    add_server_args(parser)
    add_engine_args(parser)
    parser.set_defaults(max_num_batched_tokens=SERVER_MAX_NUM_BATCHED_TOKENS)


def engine_kwargs(args: argparse.Namespace, **overrides) -> dict:
    """The parsed engine options as ``EngineConfig`` / ``LLM`` keyword arguments (model included)."""
    from pagedllm.config import EngineConfig

    names = [f.name for f in dataclasses.fields(EngineConfig) if f.init]
    return {name: getattr(args, name) for name in names if hasattr(args, name)} | overrides


def engine_setting_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the parsed engine options (a value out of range, a model directory that
    is not there), and the server's if it has them, checked before anything loads, for a command to
    say as argparse says a bad flag."""
    from pagedllm.config import EngineConfig

    if hasattr(args, "allowed_origins") and (error := _server_setting_error(args)):
        return error
    try:
        config = EngineConfig(**engine_kwargs(args))
        if config.reasoning_parser:  # its tags must be the tokenizer's tokens: said now, not from the engine process
            from pagedllm.engine.llm_engine import load_tokenizer
            from pagedllm.reasoning import AnswerStart

            AnswerStart.of(load_tokenizer(config), config.reasoning_parser)
        if getattr(args, "enable_auto_tool_choice", False) and args.tool_call_parser == "openai":
            from pagedllm.engine.llm_engine import load_tokenizer
            from pagedllm.reasoning import HARMONY, harmony_token_ids

            if config.reasoning_parser not in (None, HARMONY):
                return f"--tool-call-parser openai reads gpt-oss's harmony messages, which --reasoning-parser " \
                       f"{config.reasoning_parser} does not read: give openai_gptoss, or none"
            try:
                harmony_token_ids(load_tokenizer(config))
            except ValueError as err:
                return f"--tool-call-parser openai reads gpt-oss's harmony messages: {err}"
    except (ValueError, OSError) as err:
        return str(err)
    return None


def _server_setting_error(args: argparse.Namespace) -> str | None:
    for name, what in UNSUPPORTED_SERVER_FLAGS.items():
        if getattr(args, name):
            return f"--{name.replace('_', '-')}: {what}"
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        return "--enable-auto-tool-choice needs --tool-call-parser: the format the model writes its tool calls in " \
               f"({', '.join(TOOL_CALL_PARSERS)})"
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        return "--ssl-keyfile and --ssl-certfile: give both, to serve HTTPS"
    for flag in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            return f"--{flag.replace('_', '-')}: no file {path!r}"
    for flag in ("allowed_origins", "allowed_methods", "allowed_headers"):
        value = getattr(args, flag)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"--{flag.replace('_', '-')}: give a JSON list of strings, not {value!r:.80}"
    if args.max_log_len < 0:
        return f"--max-log-len: must be >= 0, not {args.max_log_len}"
    if args.api_key is not None and not args.api_key.strip():
        return f"--api-key (or {API_KEY_ENV}) is empty, which would serve without a key: give one, or set neither"
    if args.served_model_name and not all(name.strip() for name in args.served_model_name):
        return f"--served-model-name: a name must not be empty, not {args.served_model_name!r}"
    if args.max_request_bytes < 1:
        return f"--max-request-bytes: must be at least 1, not {args.max_request_bytes}"
    if not args.read_timeout > 0:
        return f"--read-timeout: must be more than 0 seconds, not {args.read_timeout}"
    if not 0 <= args.port <= 65535:
        return f"--port: must be between 0 and 65535, not {args.port}"
    if args.api_server_count > MAX_API_SERVERS:
        return f"--api-server-count: at most {MAX_API_SERVERS}, not {args.api_server_count}"
    try:
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        return f"--host: cannot listen on {args.host!r}: {err}"
    template = args.chat_template
    if template and not os.path.isfile(template) and "{" not in template:  # a path with a typo, not a template
        return f"--chat-template: no file {template!r} (and no Jinja in it, to be a template itself)"
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
