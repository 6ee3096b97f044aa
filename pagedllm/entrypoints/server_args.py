"""The server's command-line options, named as vLLM names them (no server imports: cheap to define)."""

import argparse
import dataclasses
import os

API_KEY_ENV = "PAGEDLLM_API_KEY"


def engine_args(parser: argparse.ArgumentParser) -> None:
    """The server's options, and the engine's (each an ``EngineConfig`` field of the same name)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every "
                             "interface, then set an API key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on every route but /health and /metrics; set "
                             f"{API_KEY_ENV} instead, which other users cannot read in the process list")
    parser.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    parser.add_argument("--chat-template", help="a Jinja chat template, or a file holding one")
    parser.add_argument("--max-request-bytes", type=int, default=8 << 20,
                        help="largest request body accepted, in bytes (default 8 MiB; larger ones get 413)")
    parser.add_argument("--read-timeout", type=float, default=30.0,
                        help="seconds a client may take to send a request's head, or pause while sending its body "
                             "(default 30)")
    parser.add_argument("--tokenizer")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--max-logprobs", type=int, default=20, help="the most logprobs a request may ask for")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-kv-blocks", type=int)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                        help="read each step's tokens back before scheduling the next")


def engine_config(args: argparse.Namespace):
    """The EngineConfig the parsed options name."""
    from pagedllm.config import EngineConfig

    fields = [f.name for f in dataclasses.fields(EngineConfig) if f.init]
    return EngineConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})
