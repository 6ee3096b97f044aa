"""``pagedllm generate --ray [ADDRESS] --replicas N``: the same JSONL job on a Ray cluster.

The lines not yet in the output go to Ray Data as JSON text (ids and prompts keep their JSON types
whatever Arrow would make of them); each replica parses its rows, generates, and the results come
back to this process as they finish, written and flushed one by one, so a rerun resumes as the
local run does. A line that cannot run (malformed, or refused by the engine, or failing in it) is
skipped and counted with ``--skip-bad-lines``, and otherwise stops the job with its line number.
"""

import argparse
import json
import sys

from pagedllm.engine.request_checks import one_completion
from pagedllm.entrypoints.generate import line_fields, new_lines, read_done, skip_bad_line
from pagedllm.entrypoints.server_args import engine_kwargs
from pagedllm.ray import ERROR_COLUMN, PagedLLMProcessorConfig, build_processor
from pagedllm.sampling_params import SamplingParams


def run(args: argparse.Namespace, fields: dict) -> int:
    """The job of ``generate.run`` on Ray; ``fields``: the job's SamplingParams fields."""
    import ray

    done = read_done(args.output)
    lines, numbers, seen, skipped = [], {}, set(done), 0

    def bad(number: int, reason: str) -> None:
        nonlocal skipped
        skip_bad_line(args, number, reason)
        skipped += 1

    for number, item, key in new_lines(args.input, done, seen, bad):
        try:
            # the line's own values, checked here (compiling a constraint is the replica's work)
            one_completion(SamplingParams(**line_fields(item, fields)))
        except ValueError as err:
            bad(number, str(err))
            continue
        seen.add(key)
        numbers[key] = number
        lines.append({"line": json.dumps(item | {"key": key})})
    if not ray.is_initialized():
        ray.init(address=None if args.ray == "local" else args.ray, log_to_driver=False)
    kwargs = engine_kwargs(args)
    model = kwargs.pop("model")
    gpus = 0 if kwargs.get("device") == "cpu" else 1
    config = PagedLLMProcessorConfig(model_source=model, engine_kwargs=kwargs, concurrency=args.replicas,
                                     num_gpus_per_replica=gpus, should_continue_on_error=True)
    processor = build_processor(config, preprocess=lambda row: _request(row["line"], fields),
                                postprocess=_result)
    generated = 0
    with open(args.output, "a", encoding="utf-8") as out:
        for row in processor(ray.data.from_items(lines)).iter_rows() if lines else ():
            result = json.loads(row["result"])
            if "bad" in result:  # the line could not run: skip it, or stop at it, as the local run does
                bad(numbers[result["key"]], result["bad"])
                continue
            del result["key"]
            out.write(json.dumps(result) + "\n")
            out.flush()
            generated += 1
    print(f"generated {generated} results into {args.output} on Ray ({args.replicas} replicas)"
          + (f", skipped {len(done)} already there" if done else "")
          + (f", skipped {skipped} bad lines" if skipped else ""), file=sys.stderr)
    return 0


def _request(line: str, fields: dict) -> dict:
    """A line's row for the replica: its prompt or messages, and its sampling fields."""
    item = json.loads(line)
    row = {"key": item["key"], "id": item["id"], "sampling_params": line_fields(item, fields)}
    return row | ({"messages": item["messages"]} if "messages" in item else {"prompt": item["prompt"]})


def _result(row: dict) -> dict:
    """The output line (as JSON text, one column of one type), or why the line could not run."""
    if row[ERROR_COLUMN] is not None:
        return {"result": json.dumps({"key": row["key"], "bad": row[ERROR_COLUMN]})}
    result = {"key": row["key"], "id": row["id"], "text": row["generated_text"],
              "prompt_tokens": row["num_input_tokens"], "completion_tokens": row["num_generated_tokens"],
              "finish_reason": row["finish_reason"]}
    return {"result": json.dumps(result)}
