"""LLM.chat renders the tokenizer's chat template; LLM.generate_stream yields outputs as tokens arrive."""

import copy

import pytest
from conftest import random_prompts

from pagedllm import LLM, SamplingParams
from pagedllm.testing import build_tiny_checkpoint

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory, tokenizer):
    with_template = copy.deepcopy(tokenizer)
    with_template.chat_template = TEMPLATE
    path = build_tiny_checkpoint("llama", str(tmp_path_factory.mktemp("chat")), tokenizer=with_template)
    return LLM(path, device="cpu")


def test_chat_renders_the_template_and_generates_from_it(chat_llm):
    rendered = "<s>system: Be brief.\n<s>user: def main():\n<s>assistant:"
    out = chat_llm.chat(CONVERSATION, GREEDY, use_tqdm=False)[0]
    tokenizer = chat_llm.get_tokenizer()
    assert out.prompt == rendered
    assert out.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert out.outputs[0].token_ids == chat_llm.generate([out.prompt_token_ids], GREEDY,
                                                         use_tqdm=False)[0].outputs[0].token_ids


def test_chat_takes_many_conversations_and_a_template_of_the_callers(chat_llm):
    second = [{"role": "user", "content": "import os"}]
    outs = chat_llm.chat([CONVERSATION, second], GREEDY, use_tqdm=False,
                         chat_template="{{ messages[-1]['content'] }}")
    assert [o.prompt for o in outs] == ["def main():", "import os"]


def test_chat_without_a_template_says_so(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    with pytest.raises(ValueError, match="conversation 0: .*chat_template"):
        llm.chat(CONVERSATION, GREEDY, use_tqdm=False)


def test_stream_yields_every_token_and_ends_as_generate_does(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("gpt2"), device="cpu")
    prompts = ["def main():"] + random_prompts([30, 4], seed=8)
    lengths = [5, 9, 3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    expected = llm.generate(prompts, params, use_tqdm=False)
    seen: dict[str, list] = {}
    for output in llm.generate_stream(prompts, params):
        seen.setdefault(output.request_id, []).append(output)
    streams = list(seen.values())
    assert [len(s) for s in streams] == lengths  # one output per token
    for stream, final in zip(streams, expected, strict=True):
        assert [len(o.outputs[0].token_ids) for o in stream] == list(range(1, len(stream) + 1))
        assert [o.finished for o in stream] == [False] * (len(stream) - 1) + [True]
        assert stream[-1].outputs[0].token_ids == final.outputs[0].token_ids
        assert stream[-1].outputs[0].text == final.outputs[0].text
        assert all(final.outputs[0].text.startswith(o.outputs[0].text) for o in stream)


def test_closing_a_stream_early_aborts_its_requests(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("gpt2"), device="cpu")
    stream = llm.generate_stream(random_prompts([10, 20]), SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
