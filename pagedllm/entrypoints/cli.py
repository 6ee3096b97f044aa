"""The ``pagedllm`` command: ``pagedllm serve MODEL [options]``."""

import argparse

from pagedllm.entrypoints.openai.api_server import engine_args, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pagedllm", description="Fast LLM inference with a paged KV cache.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve_parser.add_argument("model", help="model directory, or hub id in the local HF cache")
    engine_args(serve_parser)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args)


if __name__ == "__main__":
    main()
