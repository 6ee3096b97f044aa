"""What structured outputs cost: a workload of benchmarks/throughput.py (W3 by default) run in one
process on the same prompts, free and with half the requests under the JSON schema
benchmarks/schemas/notes.json (nested objects, arrays, enums, required fields; 8 to 200 notes), both
sampled at temperature 1 with per-request seeds and EOS ignored. Random weights rarely close a
free string, so most constrained outputs run to their max_tokens: the JSON is valid as far as it
goes (a token the grammar refuses would end the request with an error: counted). The schema has
no string maxLength and no number range: xgrammar 0.2.8 checks most of the vocabulary at run time
in those states (mlc-ai/xgrammar#852: a bounded string is 2-300x slower per mask).

Random weights come without a tokenizer, and xgrammar's work per token grows with the tokenizer's
vocabulary: a byte-level BPE tokenizer of Qwen's size (151,643 tokens and <|endoftext|>) is
trained here on the Python sources of the machine it runs on (about 40 s on 2 cores) and stands
in for Qwen3's. A constrained request ends where its JSON does, so the throughput counts the
tokens each run generated. Recorded beside it, per run: the host's time in each phase of the steps
(scheduling, launching, reading back and waiting for the device, and of those, filling masks and
accepting tokens), against the wall time. The two runs alternate, REPEATS times each, after a
warm-up of the same kinds of requests (seeded, free and constrained: the kernels compile there);
the ratio is that of their total rates.

Usage: python benchmarks/structured.py [--workload W3] [--out DIR]
"""

import argparse
import glob
import json
import os
import shutil
import sys
import sysconfig
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, warm_up_gpu, write_result  # noqa: E402
from benchmarks.throughput import WORKLOADS, make_requests, model_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(ROOT, "benchmarks", "schemas", "notes.json")
TOKENIZER_SIZE = 151_643  # Qwen3's ordinary tokens
CORPUS_BYTES = 200_000_000
REPEATS = 2


def train_tokenizer(path: str) -> None:
    """A byte-level BPE tokenizer of TOKENIZER_SIZE tokens, saved in ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    paths = sysconfig.get_paths()
    files = sorted({f for key in ("stdlib", "purelib") for f in
                    glob.glob(os.path.join(paths[key], "**", "*.py"), recursive=True)})

    def texts():
        total = 0
        for name in files:
            try:
                with open(name, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            total += len(text)
            if total > CORPUS_BYTES:
                return
            yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=TOKENIZER_SIZE + 1, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(path)


class Timer:
    """Wraps a function and adds up the seconds spent in it."""

    def __init__(self, owner, name: str):
        self.owner, self.name, self.seconds, self.calls = owner, name, 0.0, 0
        self.inner = getattr(owner, name)
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        self.calls += 1
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def __get__(self, instance, owner):  # also as a method
        return self if instance is None else lambda *a, **k: self(instance, *a, **k)


def run(llm, prompts, output_lens, spec) -> dict:
    """One timed run: every second request under ``spec`` (all free when it is None)."""
    import xgrammar as xgr

    from pagedllm import SamplingParams
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.engine.scheduler import Scheduler
    from pagedllm.worker import executor, sampling_inputs

    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True,
                             structured_outputs=spec if i % 2 == 0 else None)
              for i, n in enumerate(output_lens)]
    timers = {"mask_fill_s": Timer(sampling_inputs, "fill_masks"),  # in xgrammar's threads
              "accept_token_s": Timer(xgr.GrammarMatcher, "accept_token"),
              "schedule_s": Timer(Scheduler, "schedule"),
              "launch_s": Timer(executor.Executor, "launch"),  # inputs, forward and sampling launched (fill included)
              "read_back_s": Timer(LLMEngine, "_finish_step"),  # wait, update (accept included), detokenize
              "wait_for_device_s": Timer(executor.PendingOutput, "wait")}
    try:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    finally:
        for timer in timers.values():
            setattr(timer.owner, timer.name, timer.inner)
    generated = [len(o.outputs[0].token_ids) for o in outputs]
    constrained = [o.outputs[0] for o, p in zip(outputs, params, strict=True) if p.structured_outputs is not None]
    return {"constrained_requests": len(constrained), "wall_s": wall, "output_tokens": sum(generated),
            "output_tokens_per_s": sum(generated) / wall, "steps": timers["launch_s"].calls,
            **{name: timer.seconds for name, timer in timers.items()},
            "constrained_finish_reasons": dict(Counter(c.finish_reason for c in constrained)),
            "constrained_stopped_as_valid_json": sum(c.finish_reason == "stop" and _is_json(c.text)
                                                     for c in constrained)}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> None:
    import torch
    from transformers import AutoConfig

    from pagedllm import LLM, SamplingParams, StructuredOutputsParams

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="W3")
    parser.add_argument("--num-requests", type=int, help="fewer requests than the workload's (a quick check)")
    parser.add_argument("--out", help="also write the JSON here (the device tool's $OUT)")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    with open(SCHEMA) as f:
        spec = StructuredOutputsParams(json=json.load(f), disable_any_whitespace=True)
    path = model_dir(workload)
    try:
        start = time.perf_counter()
        train_tokenizer(path)
        tokenizer_s = time.perf_counter() - start
        prompts, output_lens = make_requests(workload, AutoConfig.from_pretrained(path).vocab_size)
        prompts, output_lens = prompts[: args.num_requests], output_lens[: args.num_requests]
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            warm_up_gpu()
        llm = LLM(path, load_format="dummy", dtype=workload.dtype,
                  max_model_len=max(len(p) + o for p, o in zip(prompts, output_lens, strict=True)))
        llm.generate(prompts[:4], SamplingParams(temperature=1.0, seed=0, max_tokens=8, ignore_eos=True),
                     use_tqdm=False)
        start = time.perf_counter()  # the first constrained request: the compiler reads the vocabulary,
        # the schema compiles (cached from then on), and the masking kernel is built
        llm.generate(prompts[:4], SamplingParams(temperature=1.0, seed=0, max_tokens=8, ignore_eos=True,
                                                 structured_outputs=spec), use_tqdm=False)
        first_constrained_s = time.perf_counter() - start
        free, half = [], []
        for _ in range(REPEATS):
            free.append(run(llm, prompts, output_lens, None))
            half.append(run(llm, prompts, output_lens, spec))
    finally:
        shutil.rmtree(path, ignore_errors=True)

    def rate(runs: list[dict]) -> float:
        return sum(r["output_tokens"] for r in runs) / sum(r["wall_s"] for r in runs)
    payload = {"benchmark": "structured", "workload": workload.name, "model_config": workload.config,
               "num_requests": len(prompts), "schema": "benchmarks/schemas/notes.json",
               "tokenizer": f"byte-level BPE of {TOKENIZER_SIZE + 1} tokens trained on Python sources "
                            f"in {tokenizer_s:.0f} s", "environment": environment(),
               "warm_up_first_constrained_requests_s": first_constrained_s, "free": free,
               "half_constrained": half, "throughput_vs_free": rate(half) / rate(free)}
    print(json.dumps({k: payload[k] for k in ("warm_up_first_constrained_requests_s", "free", "half_constrained",
                                              "throughput_vs_free")}, indent=1))
    if on_gpu and args.num_requests is None:
        print(f"wrote {write_result(f'structured-{workload.name}', payload, args.out)}")


if __name__ == "__main__":
    main()
