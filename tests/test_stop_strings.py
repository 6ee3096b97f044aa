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


def test_incremental_text_goes_on_when_its_decode_stream_fails(tokenizer):
    """A fast tokenizer's text comes from its DecodeStream; should that raise (its text before the
    new tokens changed), the rest is re-decoded, and the text is still the whole decode's."""
    ids = tokenizer.encode(TEXT)
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    deltas = [detokenizer.update(ids[:1])]
    real, steps = detokenizer._stream, []
    assert real is not None

    class Failing:
        def step(self, backend, token):
            steps.append(token)
            if len(steps) == 9:
                raise Exception("DecodeStreamError: Invalid prefix encountered")
            return real.step(backend, token)

    detokenizer._stream = Failing()
    deltas += [detokenizer.update(ids[: i + 1]) for i in range(1, len(ids))]
    assert detokenizer._stream is None and len(steps) == 9
    assert "".join(deltas) == detokenizer.text == TEXT


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


def _sentencepiece_style_tokenizer():
    """A tokenizer that marks word starts with "▁" and drops the space of the first token it
    decodes, as Llama 2's, Mistral's, Gemma's and Phi-3's do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pagedllm.testing import SPECIAL_TOKENS, VOCAB_SIZE, _corpus

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def test_an_outputs_text_continues_its_prompts_under_a_sentencepiece_tokenizer(tmp_path):
    """prompt + text is the text of prompt and output tokens decoded together (as vLLM and HF's
    pipeline give it): the space before the output's first word is kept, offline, streamed and
    where stop strings are judged token by token."""
    import asyncio

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.sampling_params import RequestOutputKind
    from pagedllm.testing import build_tiny_checkpoint

    tokenizer = _sentencepiece_style_tokenizer()
    assert tokenizer.decode(tokenizer.encode("in Paris")[1:]) == "Paris"  # the space the old text lost
    path = build_tiny_checkpoint("llama", str(tmp_path), tokenizer=tokenizer)
    prompts = [f"The {word} of the" for word in ("result", "value", "number", "string", "list", "random")]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(path, device="cpu") as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        judged = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["\x00"]),
                              use_tqdm=False)
    for output, by_token in zip(outputs, judged, strict=True):
        ids = output.prompt_token_ids + output.outputs[0].token_ids
        assert output.prompt + output.outputs[0].text == tokenizer.decode(ids)
        assert by_token.outputs[0].text == output.outputs[0].text
    assert sum(o.outputs[0].text.startswith(" ") for o in outputs) >= 2  # (the test bites)

    async def streamed(engine: AsyncLLM, prompt: str) -> str:
        stream_params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                       output_kind=RequestOutputKind.DELTA)
        return "".join([o.outputs[0].text async for o in engine.generate(prompt, stream_params, prompt)])


    async def main() -> list[str]:
        engine = AsyncLLM(EngineConfig(model=path, device="cpu"))  # the server's: outputs built from reports
        try:
            return list(await asyncio.gather(*(streamed(engine, prompt) for prompt in prompts)))
        finally:
            engine.shutdown()

    assert asyncio.run(main()) == [o.outputs[0].text for o in outputs]


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_incremental_text_is_the_text_decoded_at_once_for_any_prompt_and_output(tokenizer, style):
    """Token by token after any prompt (one that ends in half a character too), the text is what
    ``output_text`` decodes at once, less a last half character still held back."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pagedllm.engine.detokenizer import output_text

    tok = tokenizer if style == "byte-level" else _sentencepiece_style_tokenizer()
    text_ids = tok.encode(TEXT)
    token = st.integers(0, len(tok) - 1)

    @settings(max_examples=150, deadline=None)
    @given(st.integers(0, len(text_ids)), st.lists(token, max_size=8), st.lists(token, min_size=1, max_size=16))
    def check(cut, prompt_tail, output):
        prompt = text_ids[:cut] + prompt_tail
        ids = prompt + output
        detokenizer = IncrementalDetokenizer(tok, skip_special_tokens=True)
        for i in range(len(output)):
            detokenizer.update(ids[: len(prompt) + i + 1], len(prompt))
        at_once = output_text(tok, SamplingParams(), ids, len(prompt))
        assert at_once == detokenizer.text or (at_once.endswith("\ufffd") and at_once.startswith(detokenizer.text))

    check()
