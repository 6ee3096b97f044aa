"""Generation demo: LLM.generate through the real engine on a small model.

With no model given it builds a tiny random Llama checkpoint (no model hub is reachable
here), so its completions are random tokens: the point is the engine at work. Pass
``--model DIR`` (or a hub id in your local HF cache) for real text.
"""

import argparse
import os
import time

from pagedllm import LLM, SamplingParams
from pagedllm.testing import build_tiny_checkpoint

PROMPTS = [
    "def fibonacci(n):",
    "The paged KV cache stores keys and values in blocks,",
    "import",
    "Beautiful is better than ugly. Explicit is better than implicit.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or hub id (default: a tiny random Llama)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()

    model = args.model
    if model is None:
        model = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "tiny-llama")
        if not os.path.exists(os.path.join(model, "config.json")):
            print(f"building a tiny random Llama checkpoint in {model} ...")
            build_tiny_checkpoint("llama", model)

    llm = LLM(model, device=args.device)
    print(f"model {model} on {llm.llm_engine.config.device}, "
          f"{llm.llm_engine.block_manager.num_blocks} KV blocks of {llm.llm_engine.config.block_size} tokens")
    params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params)
    elapsed = time.perf_counter() - start
    for output in outputs:
        completion = output.outputs[0]
        print(f"\n--- {output.prompt!r}\n{completion.text!r}\n({len(completion.token_ids)} tokens, "
              f"finish_reason={completion.finish_reason})")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests, {num_tokens} tokens in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
