"""``pagedllm generate``: complete every prompt of a JSONL file into another, for building datasets.

Input lines: ``{"id": ..., "prompt": "text"}`` or ``{"id": ..., "messages": [{"role", "content"}, ...]}``.
Output lines: ``{"id", "text", "prompt_tokens", "completion_tokens", "finish_reason"}``, written and
flushed as each request finishes, so a crash or Ctrl-C loses nothing already generated; a rerun
skips the ids already in the output file (resume).
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator

from tqdm.auto import tqdm

from pagedllm.llm import LLM
from pagedllm.sampling_params import SamplingParams


class BadLine(ValueError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory, or hub id in the local HF cache")
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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)


def read_prompts(path: str) -> Iterator[tuple[int, dict | BadLine]]:
    """(line number, parsed line or the reason it is malformed) for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, BadLine(f"not valid JSON ({err.msg})")
                continue
            if not isinstance(item, dict) or "id" not in item:
                yield number, BadLine('needs an "id"')
            elif not isinstance(item.get("prompt"), str) and not isinstance(item.get("messages"), list):
                yield number, BadLine('needs a "prompt" string or a "messages" list')
            else:
                yield number, item


def run(args: argparse.Namespace) -> int:
    done = set()
    if os.path.exists(args.output):
        with open(args.output, encoding="utf-8") as f:
            done = {json.loads(line)["id"] for line in f if line.strip()}
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization)
    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    skipped, seen, pending = 0, set(done), {}
    bar = tqdm(desc="Generated", unit=" req", dynamic_ncols=True)
    start, tokens = time.perf_counter(), 0

    def bad(number: int, reason: str) -> None:
        nonlocal skipped
        if not args.skip_bad_lines:
            raise BadLine(f"{args.input} line {number}: {reason} (--skip-bad-lines skips such lines)")
        skipped += 1
        tqdm.write(f"skipped line {number}: {reason}", file=sys.stderr)

    lines = read_prompts(args.input)
    with open(args.output, "a", encoding="utf-8") as out:
        while True:
            while len(pending) < 4 * args.max_num_seqs:  # keep the queue bounded: read as requests finish
                number, item = next(lines, (None, None))
                if item is None:
                    break
                if isinstance(item, BadLine):
                    bad(number, str(item))
                    continue
                if item["id"] in seen:
                    if item["id"] not in done:
                        bad(number, f"duplicate id {item['id']!r}")
                    continue
                try:
                    if "messages" in item:
                        text = tokenizer.apply_chat_template(item["messages"], tokenize=False,
                                                             add_generation_prompt=True)
                        token_ids = tokenizer.encode(text, add_special_tokens=False)
                    else:
                        text, token_ids = item["prompt"], tokenizer.encode(item["prompt"])
                    engine.validate_request(token_ids, params)
                except ValueError as err:
                    bad(number, str(err))
                    continue
                seen.add(item["id"])
                request_id = str(len(seen))
                pending[request_id] = item["id"]
                engine.add_request(request_id, token_ids, params, prompt=text)
            if not pending:
                break
            for output in engine.step():
                completion = output.outputs[0]
                out.write(json.dumps({"id": pending.pop(output.request_id), "text": completion.text,
                                      "prompt_tokens": len(output.prompt_token_ids),
                                      "completion_tokens": len(completion.token_ids),
                                      "finish_reason": completion.finish_reason}) + "\n")
                out.flush()
                tokens += len(completion.token_ids)
                bar.update(1)
                bar.set_postfix_str(f"{bar.n / (time.perf_counter() - start):.1f} req/s, "
                                    f"{tokens / (time.perf_counter() - start):.0f} tok/s", refresh=False)
    bar.close()
    print(f"generated {bar.n} results into {args.output}"
          + (f", skipped {len(done)} already there" if done else "")
          + (f", skipped {skipped} bad lines" if skipped else ""), file=sys.stderr)
    return 0
