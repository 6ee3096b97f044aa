"""The ``pagedllm`` command (also ``python -m pagedllm``): generate, serve, bench."""

import argparse
import sys

from pagedllm.entrypoints import bench, generate
from pagedllm.entrypoints.server_args import engine_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedllm", description="Fast LLM inference with a paged KV cache.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,serve,bench}")
    generate.add_arguments(commands.add_parser(
        "generate", help="complete a JSONL file of prompts into a JSONL file of results (resumable)",
        description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    serve_parser = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve_parser.add_argument("model_tag", nargs="?", metavar="model", help="model directory or hub id")
    serve_parser.add_argument("--model", help="the same, as a flag (vllm serve takes both)")
    engine_args(serve_parser)
    bench.add_arguments(commands.add_parser("bench", help="a quick offline throughput run"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not (args.model_tag or args.model) or (args.model_tag and args.model and args.model_tag != args.model):
            parser.error("serve: give the model once, as `pagedllm serve MODEL` or `pagedllm serve --model MODEL`")
        args.model = args.model or args.model_tag
        from pagedllm.entrypoints.openai.api_server import serve  # fastapi is an optional extra

        return serve(args)
    try:
        return (generate if args.command == "generate" else bench).run(args)
    except generate.BadLine as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
