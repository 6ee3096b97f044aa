"""A vLLM user's offline script, as vLLM's own examples write it, with one change: the import line
(``from vllm import ...`` -> ``from pagedllm import ...``). It prints one JSON line per result;
tests/test_vllm_compat.py checks what each means. Usage: python offline_script.py MODEL_DIR"""

import asyncio
import json
import sys

from pagedllm import (
    LLM,
    AsyncEngineArgs,
    AsyncLLMEngine,
    BeamSearchParams,
    RequestOutputKind,
    SamplingParams,
    TextPrompt,
    TokensPrompt,
)

model = sys.argv[1]


def report(name, **values):
    print(json.dumps({"case": name, **values}), flush=True)


llm = LLM(model=model, tokenizer=None, tokenizer_mode="auto", trust_remote_code=False, revision=None,
          tokenizer_revision=None, dtype="auto", seed=0, max_model_len=256, gpu_memory_utilization=0.9,
          swap_space=4, cpu_offload_gb=0, enforce_eager=True, max_seq_len_to_capture=8192,
          disable_log_stats=True, max_logprobs=20, enable_chunked_prefill=True, enable_prefix_caching=True,
          num_gpu_blocks_override=None, skip_tokenizer_init=False, hf_overrides=None, kv_cache_dtype="auto",
          quantization=None, task="generate", download_dir=None, enable_lora=False, pipeline_parallel_size=1,
          distributed_executor_backend="mp", compilation_config=3, speculative_config=None, device="cpu")
tokenizer = llm.get_tokenizer()
assert llm.llm_engine.get_tokenizer() is tokenizer

prompts = ["def main():", "import os", "class Point:"]
greedy = SamplingParams(temperature=0.0, max_tokens=12)
outputs = llm.generate(prompts, greedy)
for output in outputs:
    report("greedy", prompt=output.prompt, text=output.outputs[0].text, token_ids=output.outputs[0].token_ids,
           cumulative_logprob=output.outputs[0].cumulative_logprob, metrics=vars(output.metrics))

# Prompt types, and the older keyword
ids = tokenizer.encode("def main():")
by_tokens = llm.generate(TokensPrompt(prompt_token_ids=ids), greedy, use_tqdm=False)[0]
by_text = llm.generate(TextPrompt(prompt="def main():"), greedy, use_tqdm=False)[0]
by_keyword = llm.generate(prompt_token_ids=[ids], sampling_params=greedy, use_tqdm=False)[0]
report("prompt_types", token_ids=[o.outputs[0].token_ids for o in (by_tokens, by_text, by_keyword)])

# Sampling parameters that change what may be sampled
favourite = tokenizer.encode(" return", add_special_tokens=False)[0]
report("logit_bias", favourite=favourite, token_ids=llm.generate(
    "x = 1", SamplingParams(temperature=1.0, seed=1, max_tokens=8, logit_bias={favourite: 100}),
    use_tqdm=False)[0].outputs[0].token_ids)
allowed = tokenizer.encode(" a b", add_special_tokens=False)
report("allowed_token_ids", allowed=allowed, token_ids=llm.generate(
    "x = 1", SamplingParams(temperature=1.0, seed=2, max_tokens=8, allowed_token_ids=allowed),
    use_tqdm=False)[0].outputs[0].token_ids)
plain = llm.generate("def main():\n    ", SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
word = plain.outputs[0].text.split()[0] if plain.outputs[0].text.split() else "return"
banned = llm.generate("def main():\n    ", SamplingParams(temperature=0, max_tokens=24, bad_words=[word]),
                      use_tqdm=False)[0]
report("bad_words", word=word, without=plain.outputs[0].text, banned=banned.outputs[0].text,
       banned_token_ids=banned.outputs[0].token_ids)


def only_token_7(token_ids, logits):
    forced = logits.clone().fill_(float("-inf"))
    forced[7] = 0.0
    return forced


seen_prompts = []


def remembers_prompt(prompt_token_ids, token_ids, logits):
    seen_prompts.append(list(prompt_token_ids))
    return logits


forced = llm.generate("x = 1", SamplingParams(temperature=1.0, max_tokens=5,
                                              logits_processors=[remembers_prompt, only_token_7]),
                      use_tqdm=False)[0]
report("logits_processors", token_ids=forced.outputs[0].token_ids, prompt=forced.prompt_token_ids,
       seen_prompt=seen_prompts[0])

# Prompt and output handling
long_prompt = "def f(x):\n    return x * 2\n" * 5
truncated = llm.generate(long_prompt, SamplingParams(max_tokens=4, truncate_prompt_tokens=10), use_tqdm=False)[0]
report("truncate_prompt_tokens", prompt_token_ids=truncated.prompt_token_ids,
       full=tokenizer.encode(long_prompt))
quiet = llm.generate("import os", SamplingParams(max_tokens=6, detokenize=False, temperature=0), use_tqdm=False)[0]
report("detokenize", text=quiet.outputs[0].text, token_ids=quiet.outputs[0].token_ids)
try:
    llm.generate("import os", SamplingParams(max_tokens=3, logprobs=-1), use_tqdm=False)
except ValueError as err:
    report("logprobs_all_under_max_logprobs", error=str(err))

# Several samples
best = llm.generate("def main():", SamplingParams(n=2, best_of=4, temperature=1.0, seed=3, max_tokens=8),
                    use_tqdm=False)[0]
all_four = llm.generate("def main():", SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8), use_tqdm=False)[0]
report("best_of", best=[[c.index, c.token_ids, c.cumulative_logprob] for c in best.outputs],
       all=[[c.token_ids, c.cumulative_logprob] for c in all_four.outputs])
samples = {}
for output in llm.generate_stream(["def main():"], SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=6)):
    for c in output.outputs:
        samples.setdefault(c.index, []).append([c.text, c.token_ids])
report("stream_n", samples=samples)
deltas = [o.outputs[0] for o in llm.generate_stream(
    "def main():", SamplingParams(temperature=0, max_tokens=10, output_kind=RequestOutputKind.DELTA))]
finals = [o.outputs[0] for o in llm.generate_stream(
    "def main():", SamplingParams(temperature=0, max_tokens=10, output_kind=RequestOutputKind.FINAL_ONLY))]
report("output_kind", delta_texts=[d.text for d in deltas], delta_token_ids=[d.token_ids for d in deltas],
       final_only=[[f.text, f.token_ids] for f in finals])

# SamplingParams' helpers
base = SamplingParams(temperature=0.5, stop=["\n"], logit_bias={5: 1.0})
copy = base.clone()
copy.stop.append("x")
report("clone_from_optional", original_stop=base.stop, copy_stop=copy.stop,
       from_optional=vars(SamplingParams.from_optional(temperature=None, top_p=None, max_tokens=None, n=None))
       | {"output_kind": None, "logits_processors": None})

# Beam search, chat, the prefix cache, metrics, progress bars
beams = llm.beam_search([{"prompt": "def main():"}], BeamSearchParams(beam_width=3, max_tokens=6), lora_request=None)[0]
report("beam_search", sequences=[[b.tokens, b.cum_logprob, b.text, b.finish_reason] for b in beams.sequences],
       prompt=tokenizer.encode("def main():"))
single_beam = llm.beam_search(["def main():"], BeamSearchParams(beam_width=1, max_tokens=6))[0].sequences[0]
greedy_six = llm.generate("def main():", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
report("beam_width_1", tokens=single_beam.tokens,
       greedy=tokenizer.encode("def main():") + greedy_six[0].outputs[0].token_ids)
same = llm.generate(prompts, greedy, use_tqdm=False, lora_request=None, priority=[0, 0, 0])
report("generate_arguments", token_ids=[o.outputs[0].token_ids for o in same])
parts_template = "{% for m in messages %}{% for part in m['content'] %}[{{ part['text'] }}]{% endfor %}{% endfor %}"
in_parts = llm.chat([{"role": "user", "content": "hi"}], greedy, False, None, parts_template,
                    chat_template_content_format="openai", add_generation_prompt=False, mm_processor_kwargs=None)[0]
report("content_format", prompt=in_parts.prompt)
conversation = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]}]
as_parts = llm.chat(conversation, greedy, use_tqdm=False)[0]
as_string = llm.chat([conversation[0], {"role": "user", "content": "Hello!"}], greedy, use_tqdm=False)[0]
template = ("{% if tools %}tools: {{ tools | map(attribute='name') | join(',') }}\n{% endif %}"
            "{% if enable_thinking %}<think>\n{% endif %}"
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
rendered = llm.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "def"}], greedy,
                    use_tqdm=False, chat_template=template, add_generation_prompt=False, continue_final_message=True,
                    tools=[{"name": "search"}], chat_template_kwargs={"enable_thinking": True})[0]
report("chat", parts=as_parts.prompt_token_ids, string=as_string.prompt_token_ids, rendered=rendered.prompt)
try:
    llm.chat([{"role": "user"}], greedy, use_tqdm=False)
except ValueError as err:
    report("chat_without_content", error=str(err))
cached_prompt = "class Cache:\n    def get(self, key):\n        return self.data[key]\n\n    def put(self, key, value):"
llm.generate(cached_prompt, greedy, use_tqdm=False)
metrics = {m.name: m.value for m in llm.get_metrics()}
hits_before = llm.llm_engine.block_manager.num_cache_hits
llm.generate(cached_prompt, greedy, use_tqdm=False)
hits_again = llm.llm_engine.block_manager.num_cache_hits - hits_before
reset = llm.reset_prefix_cache()
hits_before = llm.llm_engine.block_manager.num_cache_hits
llm.generate(cached_prompt, greedy, use_tqdm=False)
report("prefix_cache", hits_again=hits_again, reset=reset,
       hits_after_reset=llm.llm_engine.block_manager.num_cache_hits - hits_before,
       generation_tokens=metrics["pagedllm:generation_tokens"],
       metric_names=sorted(metrics))


class CountingBar:
    updates = 0

    def __init__(self, *args, **kwargs):
        self.total = kwargs.get("total")

    def update(self, n=1):
        CountingBar.updates += n

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


llm.generate(prompts, greedy, use_tqdm=CountingBar)
report("use_tqdm_class", updates=CountingBar.updates)
llm.shutdown()

# Engine options that change the engine
small = LLM(model, device="cpu", seed=None, max_logprobs=-1, num_gpu_blocks_override=64,
            hf_overrides={"max_position_embeddings": 128}, skip_tokenizer_init=True)
vocab = small.llm_engine.config.hf_config.vocab_size
whole = small.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=2, logprobs=-1),
                       use_tqdm=False)[0].outputs[0]
report("engine_options", max_model_len=small.llm_engine.config.max_model_len,
       num_blocks=small.llm_engine.block_manager.num_blocks, vocab=vocab,
       logprob_entries=[len(entry) for entry in whole.logprobs], text=whole.text, tokenizer=small.get_tokenizer())
small.shutdown()


# The async engine, as vLLM's AsyncLLMEngine is used
async def ask():
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model, device="cpu", max_model_len=256))
    final = None
    async for output in engine.generate("def main():", SamplingParams(temperature=0, max_tokens=12), "request-0"):
        final = output
    engine.shutdown()
    return final.outputs[0].token_ids


report("async_engine", token_ids=asyncio.run(ask()))
