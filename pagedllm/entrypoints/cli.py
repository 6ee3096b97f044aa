"""The ``pagedllm`` command (also ``python -m pagedllm``): generate, run-batch, serve, bench."""

import argparse
import importlib.util
import sys

from pagedllm.entrypoints import bench, generate
from pagedllm.entrypoints.openai import run_batch
from pagedllm.entrypoints.server_args import engine_args, engine_setting_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedllm", description="Fast LLM inference with a paged KV cache.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,run-batch,serve,bench}")
    parsers = {"generate": commands.add_parser(
        "generate", help="complete a JSONL file of prompts into a JSONL file of results (resumable)",
        description=generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)}
    generate.add_arguments(parsers["generate"])
    parsers["run-batch"] = commands.add_parser(
        "run-batch", help="run a JSONL file of OpenAI Batch API requests into a file of results (vLLM's run-batch)",
        description=run_batch.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_batch.add_arguments(parsers["run-batch"])
    serve_parser = parsers["serve"] = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve_parser.add_argument("model_tag", nargs="?", metavar="model", help="model directory or hub id")
    serve_parser.add_argument("--model", help="the same, as a flag (vllm serve takes both)")
    engine_args(serve_parser)
    parsers["bench"] = commands.add_parser("bench", help="a quick offline throughput run")
    bench.add_arguments(parsers["bench"])
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not (args.model_tag or args.model) or (args.model_tag and args.model and args.model_tag != args.model):
            parser.error("serve: give the model once, as `pagedllm serve MODEL` or `pagedllm serve --model MODEL`")
        args.model = args.model or args.model_tag
    bad = bad_setting(args)
    if bad is not None:
        parsers[args.command].error(bad)  # as argparse says a bad flag (status 2), not a traceback
    if args.command == "serve":
        from pagedllm.entrypoints.openai.api_server import serve  # fastapi is an optional extra

        return serve(args)
    if args.command == "run-batch":
        return run_batch.run(args)
    try:
        return (generate if args.command == "generate" else bench).run(args)
    except generate.BadLine as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def bad_setting(args: argparse.Namespace) -> str | None:
    """What is wrong with an engine or sampling setting that could never run, checked before
    anything loads (the engine's not with --ray: its workers, not this machine, have the model)."""
    from pagedllm.sampling_params import SamplingParams

    if args.command in ("serve", "run-batch") and importlib.util.find_spec("fastapi") is None:
        return f"{args.command} needs the server's packages: pip install 'pagedllm[server]'"
    if not getattr(args, "ray", None) and (error := engine_setting_error(args)):
        return error
    if args.command == "generate":
        try:
            SamplingParams(**generate.job_fields(args))
        except ValueError as err:
            return str(err)
        return generate.file_error(args.input, args.output)
    if args.command == "run-batch":
        return run_batch.setting_error(args)
    return None


if __name__ == "__main__":
    sys.exit(main())
