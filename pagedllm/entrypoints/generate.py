"""``pagedllm generate``: complete every prompt of a JSONL file into another, for building datasets.

Input lines: ``{"id": ..., "prompt": "text"}`` or ``{"id": ..., "messages": [{"role", "content"}, ...]}``,
with an optional OpenAI ``"response_format"`` or vLLM ``"structured_outputs"`` (``--json-schema FILE``
sets one for every line) and ``"sampling_params"`` (SamplingParams' fields, over the command line's).
Output lines: ``{"id", "text", "prompt_tokens", "completion_tokens", "finish_reason"}`` (or
``{"id", "error"}`` for a request that failed alone), written and flushed as each request
finishes, so a crash or Ctrl-C loses nothing already generated; a rerun skips the ids already in
the output file (resume), after removing a last line that a crash cut short.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from tqdm.auto import tqdm

from pagedllm.engine.request_checks import one_completion
from pagedllm.entrypoints.server_args import add_engine_args, engine_kwargs
from pagedllm.inputs import encode_text, render_chat
from pagedllm.llm import LLM
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_outputs import StructuredOutputsParams


class BadLine(ValueError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--input", required=True, help="JSONL file of prompts")
    parser.add_argument("--output", required=True, help="JSONL file of results (appended to; resumes)")
    parser.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of failing")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, help="per-request seed (each request's own, whatever the batch)")
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    parser.add_argument("--json-schema", metavar="FILE", help="every output is JSON of this schema (a line's own "
                                                               "\"response_format\" overrides it)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run on a Ray cluster (pagedllm[ray]): its address, or none for a local Ray")
    parser.add_argument("--replicas", type=int, default=1, help="with --ray: engine replicas (Ray actors)")
    add_engine_args(parser, exclude=("seed",))


def file_error(input_path: str | None, output_path: str | None,
               flags: tuple[str, str] = ("--input", "--output")) -> str | None:
    """What keeps a job from reading its input or writing its results, said before the model loads
    (each was a traceback, the output's after the model had loaded); ``flags`` name the two, and a
    path that is None (a URL, for run-batch) is not checked."""
    given, result = flags
    if input_path is not None and not os.path.isfile(input_path):
        return f"{given}: no file {input_path!r}"
    if output_path is None:
        return None
    if os.path.isdir(output_path):
        return f"{result}: {output_path!r} is a directory: name the results file"
    if input_path is not None and os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        return f"{result}: the same file as {given}: results go to a file of their own"
    folder = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(folder):
        return f"{result}: no folder {folder!r} to write {os.path.basename(output_path)!r} in"
    if not os.access(output_path if os.path.exists(output_path) else folder, os.W_OK):
        return f"{result}: {output_path!r} cannot be written here"
    return None


def read_prompts(path: str) -> Iterator[tuple[int, dict | BadLine]]:
    """(line number, parsed line or the reason it is malformed) for each non-blank line."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, BadLine(f"not valid JSON ({err.msg})")
                continue
            except RecursionError:
                yield number, BadLine("JSON nested too deeply")
                continue
            if not isinstance(item, dict) or "id" not in item:
                yield number, BadLine('needs an "id"')
            elif not isinstance(item.get("prompt"), str) and not isinstance(item.get("messages"), list):
                yield number, BadLine('needs a "prompt" string or a "messages" list')
            else:
                yield number, item


def id_key(value: object) -> str:
    """An id as the JSON value it is: 1, 1.0, true and "1" are four ids; lists and objects are ids too."""
    return json.dumps(value, sort_keys=True)


def read_done(path: str) -> set[str]:
    """The ids already in the output, as ``id_key``s. A last line cut short (power loss, full disk)
    is removed, so its id is generated again; a bad line before the last is an error."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    done, offset = set(), 0
    for index, line in enumerate(lines):
        if line.strip():
            try:
                done.add(id_key(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                if index != last:
                    raise BadLine(f"{path} line {index + 1} is not a result line: fix or remove it to resume") from None
                with open(path, "r+b") as f:
                    f.truncate(offset)
                print(f"{path}: its last line was cut short ({len(line)} bytes): removed it; its id runs again",
                      file=sys.stderr)
                return done
        offset += len(line) + 1
    if data and not data.endswith(b"\n"):  # a whole last line that lost its newline
        with open(path, "ab") as f:
            f.write(b"\n")
    return done


def read_schema(path: str) -> StructuredOutputsParams:
    try:
        with open(path, encoding="utf-8") as f:
            return StructuredOutputsParams(json=json.load(f))
    except (OSError, ValueError) as err:
        raise SystemExit(f"--json-schema {path}: {err}") from None


def job_fields(args: argparse.Namespace) -> dict:
    """The job's SamplingParams fields, from the command line (a line may add its own constraint)."""
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
            "max_tokens": args.max_tokens, "seed": args.seed, "stop": args.stop,
            "structured_outputs": read_schema(args.json_schema) if args.json_schema else None}


SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams) if f.init)


def line_fields(item: dict, fields: dict) -> dict:
    """The job's fields, with the line's own: its ``"sampling_params"`` (SamplingParams' fields over
    the command line's, as ``pagedllm.ray``'s rows carry them; null is the job's value) and its
    constraint, OpenAI's ``response_format`` or vLLM's ``structured_outputs``. Other keys of a line
    are the user's own and ignored; those named as SamplingParams fields are said once."""
    own = item.get("sampling_params")
    if own is not None and not isinstance(own, dict):
        raise ValueError(f'"sampling_params" must be an object of SamplingParams fields, not {type(own).__name__}')
    unknown = sorted(set(own or ()) - SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f'"sampling_params" has keys that are not SamplingParams fields: {unknown}')
    stray = sorted((SAMPLING_FIELDS & item.keys()) - {"structured_outputs"})
    if stray:
        warnings.warn(f"lines with {stray} at the top: a line's SamplingParams fields go under \"sampling_params\" "
                      "(these are ignored)", stacklevel=2)
    if own:
        fields = fields | {key: value for key, value in own.items() if value is not None}
    given = [key for key in ("response_format", "structured_outputs") if key in item]
    if not given:
        return fields
    if len(given) > 1:
        raise ValueError("give response_format or structured_outputs, not both")
    if given[0] == "response_format":
        return fields | {"structured_outputs": StructuredOutputsParams.from_response_format(item["response_format"])}
    return fields | {"structured_outputs": StructuredOutputsParams.coerce(item["structured_outputs"],
                                                                         "structured_outputs")}


def skip_bad_line(args: argparse.Namespace, number: int, reason: str) -> None:
    """Stop the job at a line that cannot run, or with --skip-bad-lines say that it is skipped."""
    if not args.skip_bad_lines:
        raise BadLine(f"{args.input} line {number}: {reason} (--skip-bad-lines skips such lines)")
    tqdm.write(f"skipped line {number}: {reason}", file=sys.stderr)


def new_lines(path: str, done: set, seen: set, bad: Callable[[int, str], None]) -> Iterator[tuple[int, dict, Any]]:
    """The input's lines as (line number, item, id key), less the malformed and those repeating an
    id (each passed to ``bad``) and those already done (skipped quietly); the caller adds a line's
    key to ``seen`` once it takes the line."""
    for number, item in read_prompts(path):
        if isinstance(item, BadLine):
            bad(number, str(item))
            continue
        key = id_key(item["id"])
        if key in seen:
            if key not in done:
                bad(number, f"duplicate id {key}")
            continue
        yield number, item, key


def run(args: argparse.Namespace) -> int:
    fields = job_fields(args)
    params = SamplingParams(**fields)  # the job's own values, checked before any work
    if args.ray:
        from pagedllm.entrypoints import generate_ray

        return generate_ray.run(args, fields)
    done = read_done(args.output)
    llm = LLM(**engine_kwargs(args))
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    skipped, failed, seen, pending = 0, 0, set(done), {}
    bar = tqdm(desc="Generated", unit=" req", dynamic_ncols=True)
    start, tokens = time.perf_counter(), 0

    def bad(number: int, reason: str) -> None:
        nonlocal skipped
        skip_bad_line(args, number, reason)
        skipped += 1

    lines = new_lines(args.input, done, seen, bad)
    with open(args.output, "a", encoding="utf-8") as out:
        while True:
            while len(pending) < 4 * engine.config.max_num_seqs:  # keep the queue bounded: read as requests finish
                number, item, key = next(lines, (None, None, None))
                if item is None:
                    break
                try:
                    if "messages" in item:
                        text, token_ids = render_chat(tokenizer, item["messages"])
                    else:
                        text, token_ids = item["prompt"], encode_text(tokenizer, item["prompt"])
                    line = line_fields(item, fields)
                    line_params = params if line is fields else SamplingParams(**line)
                    one_completion(line_params)
                    engine.validate_request(token_ids, line_params)
                except ValueError as err:
                    bad(number, str(err))
                    continue
                seen.add(key)
                request_id = str(len(seen))
                pending[request_id] = item["id"]
                engine.add_request(request_id, token_ids, line_params, prompt=text)
            if not pending:
                break
            for output in engine.step():
                completion = output.outputs[0]
                result = {"id": pending.pop(output.request_id)}
                if output.error is not None:  # failed alone: say so, and go on
                    failed += 1
                    result["error"] = output.error
                else:
                    result |= {"text": completion.text, "prompt_tokens": len(output.prompt_token_ids),
                               "completion_tokens": len(completion.token_ids),
                               "finish_reason": completion.finish_reason}
                out.write(json.dumps(result) + "\n")
                out.flush()
                tokens += len(completion.token_ids)
                bar.update(1)
                bar.set_postfix_str(f"{bar.n / (time.perf_counter() - start):.1f} req/s, "
                                    f"{tokens / (time.perf_counter() - start):.0f} tok/s", refresh=False)
    bar.close()
    print(f"generated {bar.n} results into {args.output}"
          + (f", skipped {len(done)} already there" if done else "")
          + (f", skipped {skipped} bad lines" if skipped else "")
          + (f"; {failed} requests failed (their lines hold \"error\")" if failed else ""), file=sys.stderr)
    return 0
