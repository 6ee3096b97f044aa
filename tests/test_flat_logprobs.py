"""Logprobs in flat lists (``FlatLogprobs``) read exactly as vLLM's list of ``{token: Logprob}``
dicts, and leave the garbage collector nothing to go over."""

import gc
import os
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedllm import LLM, FlatLogprobs, Logprob, SamplingParams
from pagedllm.engine.outputs import add_delta

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "pagedllm-demo")

LOGPROB = st.builds(Logprob, st.floats(-50, 0), st.one_of(st.none(), st.integers(1, 9)),
                    st.one_of(st.none(), st.text(max_size=2)))
# a position: None (a prompt's first token) or its tokens' Logprobs
POSITION = st.one_of(st.none(), st.dictionaries(st.integers(0, 99), LOGPROB, min_size=1, max_size=3))
POSITIONS = st.lists(POSITION, max_size=6)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
@given(POSITIONS, POSITIONS, st.integers(-10, 10), st.integers(-10, 10), st.sampled_from([None, 1, 2, -1]))
def test_reads_as_the_list_of_dicts_it_was_given(positions, more, start, stop, step):
    flat = FlatLogprobs(positions)
    assert len(flat) == len(positions) and list(flat) == positions and flat == positions and positions == flat
    for i in range(-len(positions), len(positions)):
        assert flat[i] == positions[i]
    with pytest.raises(IndexError):
        flat[len(positions)]
    assert flat[start:stop:step] == positions[start:stop:step]
    assert isinstance(flat[start:stop], FlatLogprobs)
    assert flat + more == positions + more and flat + FlatLogprobs(more) == positions + more
    grown = FlatLogprobs(positions)
    grown.extend(FlatLogprobs(more)[1:])  # a slice's offsets start where it starts
    grown.append(None)
    assert grown == positions + more[1:] + [None]
    assert pickle.loads(pickle.dumps(flat)) == positions
    assert flat != positions + [None] and flat != "text"


def test_an_empty_position_reads_as_none():
    flat = FlatLogprobs([{1: Logprob(-0.5, 1, "a")}, {}, None])
    assert list(flat) == [{1: Logprob(-0.5, 1, "a")}, None, None]
    assert repr(flat) == "FlatLogprobs([{1: Logprob(logprob=-0.5, rank=1, decoded_token='a')}, None, None])"


def test_generate_keeps_no_logprob_objects():
    """A batch job at logprobs=20 held 21 Logprob objects a token, every one of them gone over by
    each full collection (2,000 prompts of 64 tokens: 4.1 s of 54 in the collector, this CPU)."""
    llm = LLM(DEMO, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    outputs = llm.generate(["def main():", "import os\n"], params, use_tqdm=False)
    gc.collect()
    assert not any(type(o) is Logprob for o in gc.get_objects())
    completion = outputs[0].outputs[0]
    assert len(completion.logprobs) == 8 and all(len(entry) in (5, 6) for entry in completion.logprobs)
    assert all(completion.logprobs[i][t].rank >= 1 for i, t in enumerate(completion.token_ids))
    assert outputs[0].prompt_logprobs[0] is None and len(outputs[0].prompt_logprobs) == len(outputs[0].prompt_token_ids)


def test_deltas_added_up_equal_the_whole_output():
    """The server sums a non-streamed request's delta outputs as they come: in place, not a new
    list each delta (quadratic in a long output's logprobs)."""
    from pagedllm import RequestOutputKind

    llm = LLM(DEMO, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    whole = llm.generate("The city", params, use_tqdm=False)[0].outputs[0]
    so_far, logprobs_objects = None, set()
    deltas = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2,
                            output_kind=RequestOutputKind.DELTA)
    for delta in llm.generate_stream("The city", deltas):
        so_far = add_delta(so_far, delta)
        logprobs_objects.add(id(so_far.outputs[0].logprobs))
    assert so_far.outputs[0].logprobs == whole.logprobs and so_far.outputs[0].token_ids == whole.token_ids
    assert len(logprobs_objects) == 1  # one, grown in place


def test_vllms_flat_logprobs_option_is_taken_and_checked():
    """vLLM's ``flat_logprobs=True`` picks the layout this engine always uses: a script passing it runs."""
    llm = LLM(DEMO, device="cpu")
    out = llm.generate("The city", SamplingParams(max_tokens=3, logprobs=1, flat_logprobs=True), use_tqdm=False)[0]
    assert isinstance(out.outputs[0].logprobs, FlatLogprobs) and len(out.outputs[0].logprobs) == 3
    with pytest.raises(ValueError, match="flat_logprobs"):
        SamplingParams(flat_logprobs="yes")
