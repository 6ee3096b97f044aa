"""Incremental detokenization and stop strings, across token boundaries and multi-byte characters."""

import copy

import pytest
from conftest import random_prompts

from pagedllm import LLM, SamplingParams
from pagedllm.engine.detokenizer import IncrementalDetokenizer, find_stop_string

TEXT = "héllo wörld, 日本語のテキスト ✓ naïve café — done"


def test_incremental_text_equals_full_decode_and_never_shows_half_a_character(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 3  # the CJK characters take several byte tokens each
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    deltas = [detokenizer.update(ids[: i + 1]) for i in range(len(ids))]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detokenizer.text == tokenizer.decode(ids) == TEXT
    assert "" in deltas  # some tokens completed no character on their own


@pytest.mark.parametrize("clean_up", [False, True])
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_text_equals_the_tokenizers_decode_with_its_options(tokenizer, clean_up, skip_special_tokens):
    """The fast path (the Rust tokenizer's decode) and the tokenizer's own decode (taken where it
    cleans up spaces) give what ``tokenizer.decode`` gives, special tokens skipped or not."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.clean_up_tokenization_spaces = clean_up
    ids = tokenizer.encode("a , b . c ' d") + [tokenizer.eos_token_id] + tokenizer.encode(TEXT)
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detokenizer.update(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_find_stop_string_only_looks_at_what_is_new():
    assert find_stop_string("abc日本語def", 3, ["語d", "zz"]) == ("語d", 5)
    assert find_stop_string("abc日本語def", 2, ["abc"]) is None  # ended before the new characters
    assert find_stop_string("xxSTOPyySTOP", 6, ["STOP", "yyS"]) == ("yyS", 6)


@pytest.fixture(scope="module")
def llm_and_free_run(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), device="cpu")
    prompt = random_prompts([9], seed=11)[0]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return llm, prompt, llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_a_token_boundary_cuts_the_text(llm_and_free_run, include, tokenizer):
    llm, prompt, free = llm_and_free_run
    boundary = len(tokenizer.decode(free.token_ids[:6]))
    stop = free.text[boundary - 2 : boundary + 2]
    assert len(stop) == 4
    start = free.text.find(stop)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "no such text"],
                            include_stop_str_in_output=include)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.text == free.text[: start + (len(stop) if include else 0)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    n = len(out.token_ids)  # generation stopped at the token that completed the stop string
    assert out.token_ids == free.token_ids[:n]
    assert stop in tokenizer.decode(out.token_ids) and stop not in tokenizer.decode(out.token_ids[:-1])


def test_stop_strings_wait_for_min_tokens(llm_and_free_run, tokenizer):
    llm, prompt, free = llm_and_free_run
    stop = tokenizer.decode(free.token_ids[:2])  # would end the output at once
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop, min_tokens=10)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 10 and out.token_ids == free.token_ids[: len(out.token_ids)]


def test_stop_strings_need_a_tokenizer(tiny_checkpoint, tmp_path):
    import shutil

    shutil.copy(f"{tiny_checkpoint('opt')}/config.json", tmp_path)
    llm = LLM(str(tmp_path), device="cpu", load_format="dummy")
    with pytest.raises(ValueError, match="prompt 0: stop strings and bad words need a tokenizer"):
        llm.generate([[5, 6]], SamplingParams(stop="x"), use_tqdm=False)


def test_streamed_text_never_shows_what_a_stop_string_later_cuts(llm_and_free_run, tokenizer):
    llm, prompt, free = llm_and_free_run
    boundary = len(tokenizer.decode(free.token_ids[:6]))
    stop = free.text[boundary - 2 : boundary + 2]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop)
    streamed = [o.outputs[0].text for o in llm.generate_stream([prompt], params)]
    final = streamed[-1]
    assert final == free.text[: free.text.find(stop)]
    assert all(final.startswith(text) for text in streamed)  # each partial text is a prefix of the final one
