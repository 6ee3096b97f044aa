"""Generation demo: LLM.generate through the real engine, by default on the bundled demo model
(models/pagedllm-demo, a small Llama trained on Python's standard library: it writes Python).
Pass ``--model DIR`` (or a hub id in your local HF cache) to use another model.
"""

import argparse
import os
import time

from pagedllm import LLM, SamplingParams

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "pagedllm-demo")
PROMPTS = [
    "def fibonacci(n):",
    "import os\n\n\ndef list_python_files(path):",
    "class Stack:\n    def __init__(self):",
    "    def __repr__(self):",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL, help="model directory or hub id (default: the demo model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    args = parser.parse_args()

    llm = LLM(args.model, device=args.device)
    engine = llm.llm_engine
    print(f"model {args.model} on {engine.config.device}, {engine.block_manager.num_blocks} KV blocks "
          f"of {engine.config.block_size} tokens")
    params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params)
    elapsed = time.perf_counter() - start
    for output in outputs:
        completion = output.outputs[0]
        print(f"\n--- {len(completion.token_ids)} tokens, {completion.finish_reason}\n{output.prompt}{completion.text}")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests, {num_tokens} tokens in {elapsed:.2f} s")


if __name__ == "__main__":
    main()
