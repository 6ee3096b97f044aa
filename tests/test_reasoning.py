"""--reasoning-parser: a reasoning model's thinking (between <think> and </think>) comes apart from
its answer, alike whole and streamed in chunks cut anywhere, on the live server."""

import copy
import functools
import re

import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_openai_server import start_server
from transformers import AutoTokenizer

from pagedllm import LLM, SamplingParams
from pagedllm.errors import RequestFailedError
from pagedllm.reasoning import (
    END,
    START,
    HarmonySplitter,
    ReasoningSplitter,
    harmony_token_ids,
    parser_for,
    starts_thinking,
    thinking_token_ids,
)
from pagedllm.testing import build_tiny_checkpoint, build_tokenizer

OPEN, CLOSED = "<|user|>hi<|assistant|><think>\n", "<|user|>hi<|assistant|><think>\n\n</think>\n\n"


@pytest.mark.parametrize("prompt, text, expected", [
    (OPEN, "Two and two.\n</think>\n\nFour.", ("Two and two.\n", "\n\nFour.")),  # DeepSeek-R1's template
    (OPEN, "still thinking when cut off", ("still thinking when cut off", None)),
    (OPEN, "</think>Four.", (None, "Four.")),  # nothing thought
    (CLOSED, "Four.", (None, "Four.")),  # Qwen3 with enable_thinking=False
    ("no tags", "\n<think>hmm</think>Four.", ("hmm", "Four.")),  # the model opens its thinking itself
    ("no tags", "Four. <think>is a tag</think>", (None, "Four. <think>is a tag</think>")),  # not first: answer
    (OPEN, "a</think>b</think>c", ("a", "b</think>c")),  # the first end tag ends it
    (None, "Four.", (None, "Four.")),  # a prompt of token ids
])
def test_a_whole_answer_splits_at_the_end_of_its_thinking(prompt, text, expected):
    assert ReasoningSplitter(starts_thinking(prompt)).feed(text, last=True) == expected


# tags whole and in parts, so that cuts fall inside them
PIECES = st.lists(st.sampled_from(["<think>", "</think>", "</th", "ink>", "<th", "</", "think", ">", "\n", " ", "ab"]),
                  max_size=12)


@settings(max_examples=300)
@given(PIECES, st.booleans(), st.lists(st.integers(0, 60), max_size=6))
def test_any_chunking_of_a_stream_splits_as_the_whole_answer(pieces, thinking, cuts):
    text = "".join(pieces)
    bounds = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    splitter = ReasoningSplitter(thinking)
    parts = [splitter.feed(c, last=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    streamed = tuple("".join(p[k] or "" for p in parts) or None for k in (0, 1))
    assert streamed == ReasoningSplitter(thinking).feed(text, last=True)
    assert not splitter.held


def test_the_prompt_says_whether_the_answer_starts_in_thinking():
    assert starts_thinking(OPEN) and not starts_thinking(CLOSED) and not starts_thinking("") \
        and not starts_thinking(None)


def test_an_assistants_earlier_reasoning_reaches_the_template_under_both_names(tmp_path, tokenizer):
    with_template = copy.deepcopy(tokenizer)
    with_template.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m.get('reasoning_content', '') }}|"
                                   "{{ m.get('reasoning', '') }}|{{ m['content'] }}\n{% endfor %}")
    llm = LLM(build_tiny_checkpoint("llama", str(tmp_path), tokenizer=with_template), device="cpu")
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "4", "reasoning": "2+2"},
                    {"role": "assistant", "content": "5", "reasoning_content": "2+3"}]
    out = llm.chat(conversation, SamplingParams(max_tokens=1), use_tqdm=False, add_generation_prompt=False)[0]
    assert out.prompt == "user:||q\nassistant:2+2|2+2|4\nassistant:2+3|2+3|5\n"


def _force(forced: list[int], output_ids: list[int], logits):
    """A logits processor that makes the sample write ``forced`` first."""
    if len(output_ids) < len(forced):
        logits = torch.full_like(logits, float("-inf"))
        logits[forced[len(output_ids)]] = 0.0
    return logits


@pytest.fixture(scope="module")
def thinking_checkpoint(tmp_path_factory):
    """The tiny llama with <think> and </think> as tokens (ids 510, 511), and DeepSeek-R1's way of
    templating: the assistant's turn opens the thinking."""
    tokenizer = build_tokenizer(vocab_size=510)
    tokenizer.add_tokens([START, END])
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "assistant: <think>\n")
    return build_tiny_checkpoint("llama", str(tmp_path_factory.mktemp("thinking")), tokenizer=tokenizer)


@pytest.mark.parametrize("reasoning_parser", [None, "deepseek_r1"])
@pytest.mark.parametrize("opened", [True, False])
def test_structured_output_constrains_only_the_answer_after_the_thinking(reasoning_parser, opened,
                                                                         thinking_checkpoint):
    """The sample is made to think in tokens its regex forbids, then to end its thinking: with a
    reasoning parser and a prompt that opens the thinking, the regex holds from the token after
    </think>; otherwise from the first, where the forced token has nowhere to go."""
    llm = LLM(thinking_checkpoint, device="cpu", reasoning_parser=reasoning_parser)
    tokenizer = llm.get_tokenizer()
    start, end = thinking_token_ids(tokenizer, "deepseek_r1")
    upper = next(i for i in range(3, 500) if re.fullmatch("[A-Z]+", tokenizer.decode([i])))
    forced = [upper, upper, upper, end]
    params = SamplingParams(temperature=0, max_tokens=12, structured_outputs={"regex": "[a-z ]+"},
                            logits_processors=[functools.partial(_force, forced)])
    prompt = [5, 6, start] if opened else [5, 6]
    if reasoning_parser and opened:
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids[:4] == forced and out.finish_reason == "length"
        assert re.fullmatch("[a-z ]+", tokenizer.decode(out.token_ids[4:]))
    else:
        with pytest.raises(RequestFailedError, match="no token could follow"):
            llm.generate([prompt], params, use_tqdm=False)


def test_a_tokenizer_without_the_tags_is_refused_before_anything_runs(tiny_checkpoint):
    with pytest.raises(ValueError, match="reasoning_parser='qwen3' reads <think>, </think> as tokens of the model's "
                                         "tokenizer, and this one lacks <think>, </think>"):
        LLM(tiny_checkpoint("llama"), device="cpu", reasoning_parser="qwen3")


@pytest.fixture(scope="module")
def thinking_server(thinking_checkpoint):
    server, uv, url = start_server(thinking_checkpoint, "--reasoning-parser", "deepseek_r1", "--served-model-name", "x")
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    uv.should_exit = True
    server.engine.shutdown()


# a bias that has the tiny random model end its thinking after a few tokens, and an answer of words
ASKED = {"logit_bias": {"511": 5}, "structured_outputs": {"regex": "[a-z ]+"}, "return_token_ids": True}
MESSAGES = [{"role": "user", "content": "2 + 2?"}]


def test_server_splits_the_thinking_off_whole_and_streamed(thinking_server, thinking_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(thinking_checkpoint)
    done = thinking_server.chat.completions.create(model="x", messages=MESSAGES, max_tokens=30, temperature=0,
                                                   extra_body=ASKED).choices[0]
    message, written = done.message.model_dump(), tokenizer.decode(done.model_dump()["token_ids"])
    assert message["reasoning"] and message["content"] and re.fullmatch("[a-z ]+", message["content"])
    assert written == message["reasoning"] + END + message["content"]
    assert message["reasoning_content"] == message["reasoning"]
    chunks = list(thinking_server.chat.completions.create(model="x", messages=MESSAGES, max_tokens=30,
                                                          temperature=0, stream=True, extra_body=ASKED))
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    assert "".join(d.get("reasoning") or "" for d in deltas) == message["reasoning"]
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)


def test_responses_api_gives_the_thinking_a_reasoning_item_whole_and_streamed(thinking_server):
    """The Responses API (no logit bias there: the tiny model thinks until cut off, so all of its
    answer is thinking, as chat splits it)."""
    chat = thinking_server.chat.completions.create(model="x", messages=MESSAGES, max_tokens=8,
                                                   temperature=0).choices[0].message.model_dump()
    done = thinking_server.responses.create(model="x", input=MESSAGES[0]["content"], max_output_tokens=8,
                                            temperature=0)
    reasoning, message = done.output
    assert (reasoning.type, message.type) == ("reasoning", "message")
    assert reasoning.content[0].text == chat["reasoning"] and message.content[0].text == ""
    events = list(thinking_server.responses.create(model="x", input=MESSAGES[0]["content"], max_output_tokens=8,
                                                   temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == chat["reasoning"]
    finished = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.done"]
    assert finished == [(0, "reasoning"), (1, "message")]
    assert events[-1].response.output[0].content[0].text == chat["reasoning"]


def test_include_reasoning_false_leaves_the_thinking_out(thinking_server):
    done = thinking_server.chat.completions.create(model="x", messages=MESSAGES, max_tokens=30, temperature=0,
                                                   extra_body={**ASKED, "include_reasoning": False})
    message = done.choices[0].message.model_dump()
    assert re.fullmatch("[a-z ]+", message["content"]) and message.get("reasoning") is None


HARMONY_ANSWER = ("<|channel|>analysis<|message|>User asks 2+2. Easy: 4.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>The answer is 4.<|return|>")


def test_harmony_puts_the_analysis_channel_in_reasoning_whole_and_token_by_token(harmony_tokenizer):
    ids = harmony_tokenizer.encode(HARMONY_ANSWER, add_special_tokens=False)
    assert sum(i >= 504 for i in ids) == 7  # each of harmony's tokens is one token
    expected = ("User asks 2+2. Easy: 4.", "The answer is 4.")
    assert HarmonySplitter(harmony_tokenizer).feed("", ids, last=True) == expected
    splitter = HarmonySplitter(harmony_tokenizer)
    parts = [splitter.feed("", [token], last=i == len(ids) - 1) for i, token in enumerate(ids)]
    assert tuple("".join(p[k] or "" for p in parts) for k in (0, 1)) == expected


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>",
                                        "<|call|>", "analysis", "final", "assistant", " 4", "é", "ab"]), max_size=16),
       cuts=st.lists(st.integers(0, 40), max_size=5))
def test_any_token_stream_splits_in_chunks_as_whole_through_harmony(pieces, cuts, harmony_tokenizer):
    """Whatever tokens a gpt-oss writes (frames out of order, unfinished, none), cut anywhere."""
    ids = harmony_tokenizer.encode("".join(pieces), add_special_tokens=False)
    bounds = sorted({min(c, len(ids)) for c in cuts})
    chunks = [ids[a:b] for a, b in zip([0, *bounds], [*bounds, len(ids)], strict=True)]
    splitter = HarmonySplitter(harmony_tokenizer)
    parts = [splitter.feed("", c, last=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    streamed = tuple("".join(p[k] or "" for p in parts) or None for k in (0, 1))
    assert streamed == HarmonySplitter(harmony_tokenizer).feed("", ids, last=True)


@pytest.mark.parametrize("text, expected", [
    ("<|channel|>final<|message|>Just 4.<|return|>", (None, "Just 4.")),  # no thinking
    ("<|channel|>commentary<|message|>Let me look.<|end|>", (None, "Let me look.")),  # a preamble: the answer's
    ("<|channel|>analysis<|message|>cut off while thinking", ("cut off while thinking", None)),
    ("plain words, no frame", (None, "plain words, no frame")),  # a model that left the format
])
def test_harmony_channels_and_answers_outside_the_format(text, expected, harmony_tokenizer):
    ids = harmony_tokenizer.encode(text, add_special_tokens=False)
    assert HarmonySplitter(harmony_tokenizer).feed("", ids, last=True) == expected


@pytest.mark.parametrize("reasoning_parser", [None, "openai_gptoss"])
def test_harmony_structured_output_constrains_only_the_final_channel(reasoning_parser, harmony_tokenizer,
                                                                     tmp_path):
    """Made to think in the analysis channel in tokens its regex forbids, then to open the final
    channel: with harmony's parser the regex holds from there; without, from the first token."""
    llm = LLM(build_tiny_checkpoint("llama", str(tmp_path), tokenizer=harmony_tokenizer), device="cpu",
              reasoning_parser=reasoning_parser)
    upper = next(i for i in range(3, 500) if re.fullmatch("[A-Z]+", harmony_tokenizer.decode([i])))
    frame = harmony_tokenizer.encode("<|channel|>analysis<|message|>", add_special_tokens=False)
    final = harmony_tokenizer.encode("<|end|><|start|>assistant<|channel|>final<|message|>", add_special_tokens=False)
    forced = [*frame, upper, upper, *final]
    params = SamplingParams(temperature=0, max_tokens=len(forced) + 8, structured_outputs={"regex": "[a-z ]+"},
                            logits_processors=[functools.partial(_force, forced)])
    prompt = harmony_tokenizer.encode("<|start|>user<|message|>hi<|end|><|start|>assistant", add_special_tokens=False)
    if reasoning_parser:
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids[:len(forced)] == forced
        assert re.fullmatch("[a-z ]+", harmony_tokenizer.decode(out.token_ids[len(forced):]))
    else:
        with pytest.raises(RequestFailedError, match="no token could follow"):
            llm.generate([prompt], params, use_tqdm=False)


def test_a_gpt_oss_models_structured_output_waits_for_its_final_channel_without_a_flag(harmony_tokenizer,
                                                                                      tmp_path):
    llm = LLM(build_tiny_checkpoint("gpt-oss", str(tmp_path), tokenizer=harmony_tokenizer), device="cpu")
    opening = tuple(harmony_tokenizer.encode("<|channel|>final<|message|>", add_special_tokens=False))
    assert llm.llm_engine.answer_start.tokens == opening


def test_gpt_oss_is_read_through_harmony_where_its_tokenizer_has_the_tokens(harmony_tokenizer, tokenizer):
    assert parser_for(None, "gpt_oss", harmony_tokenizer) == "openai_gptoss"
    assert parser_for(None, "gpt_oss", tokenizer) is None  # (the tiny test model's plain tokenizer)
    assert parser_for(None, "llama", harmony_tokenizer) is None
    assert parser_for("qwen3", "gpt_oss", harmony_tokenizer) == "qwen3"
    with pytest.raises(ValueError, match="reasoning_parser='openai_gptoss' reads <\\|start\\|>.* and this one lacks"):
        harmony_token_ids(tokenizer)


def test_a_gpt_oss_server_reads_its_answers_through_harmony_whole_and_streamed(harmony_tokenizer, tmp_path):
    """No flag needed (as vLLM): the tiny random gpt-oss, its harmony tokens among those it samples,
    answers as a harmony splitter reads its tokens, alike whole and streamed."""
    path = build_tiny_checkpoint("gpt-oss", str(tmp_path), tokenizer=harmony_tokenizer)
    server, uv, url = start_server(path, "--served-model-name", "x")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        assert server.serving.reasoning_parser == "openai_gptoss"
        asked = dict(model="x", messages=MESSAGES, max_tokens=40, temperature=1.0, seed=3)
        done = client.chat.completions.create(**asked, extra_body={"return_token_ids": True}).choices[0]
        message = done.message.model_dump()
        expected = HarmonySplitter(harmony_tokenizer).feed("", done.model_dump()["token_ids"], last=True)
        assert (message.get("reasoning"), message["content"]) == expected
        chunks = list(client.chat.completions.create(**asked, stream=True))
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        streamed = tuple("".join(d.get(k) or "" for d in deltas) or None for k in ("reasoning", "content"))
        assert streamed == expected
    finally:
        uv.should_exit = True
        server.engine.shutdown()
