"""``pagedllm bench``: a quick offline throughput run on a model, with random prompts."""

import argparse
import time

import torch

from pagedllm.entrypoints.server_args import add_engine_args, count, engine_kwargs
from pagedllm.llm import LLM
from pagedllm.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or hub id (--load-format dummy: random "
                                                       "weights from its config.json)")
    parser.add_argument("--num-prompts", type=count, default=64)
    parser.add_argument("--input-len", type=count, default=128)
    parser.add_argument("--output-len", type=count, default=128)
    add_engine_args(parser)


def run(args: argparse.Namespace) -> int:
    llm = LLM(**engine_kwargs(args, max_model_len=args.max_model_len or args.input_len + args.output_len))
    vocab = llm.llm_engine.config.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab - 10, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    output_tokens = args.num_prompts * args.output_len
    print(f"{args.num_prompts} requests x ({args.input_len} in + {args.output_len} out) in {elapsed:.2f} s: "
          f"{args.num_prompts / elapsed:.2f} requests/s, {output_tokens / elapsed:.0f} output tokens/s, "
          f"{(output_tokens + args.num_prompts * args.input_len) / elapsed:.0f} total tokens/s")
    return 0
