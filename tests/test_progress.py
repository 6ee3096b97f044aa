"""An engine process reports new tokens (``progress``); its driver decodes them and builds the
outputs. Those must be the outputs the in-process engine builds, field for field, whatever the
request asks (stop strings, samples, logprobs, output kinds) and however the reports are merged
(a driver that falls behind gets several steps' reports as one)."""

import dataclasses
import os

import pytest

from pagedllm import SamplingParams
from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.progress import ProgressReport, RequestCopies, merge_reports, report_finished
from pagedllm.engine.request_checks import truncated_prompt
from pagedllm.sampling_params import RequestOutputKind

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "pagedllm-demo")
DELTA, CUMULATIVE, FINAL = RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY
CASES = [  # (prompt, params, stream)
    ("def main():", SamplingParams(temperature=0, max_tokens=12, logprobs=2, output_kind=DELTA), True),
    ("import os\n", SamplingParams(temperature=0, max_tokens=20, stop=["\n"], prompt_logprobs=1), False),
    ("class A:", SamplingParams(temperature=0, max_tokens=24, stop=["(", "self"], include_stop_str_in_output=True,
                                output_kind=DELTA), True),
    ("x = [i for i in", SamplingParams(temperature=0, max_tokens=16, stop=["]"], min_tokens=6,
                                       output_kind=CUMULATIVE), True),
    ("The city", SamplingParams(temperature=0.9, n=3, seed=7, max_tokens=10, logprobs=0, output_kind=DELTA), True),
    ("The city", SamplingParams(temperature=0.9, n=2, best_of=4, seed=1, max_tokens=8, output_kind=FINAL), True),
    ("for i in", SamplingParams(temperature=0, max_tokens=10, detokenize=False, output_kind=DELTA), True),
    ("def f(x):", SamplingParams(temperature=0, max_tokens=14, skip_special_tokens=False, output_kind=DELTA,
                                 stop=["return"]), True),
    ("while True:", SamplingParams(temperature=0, max_tokens=12, truncate_prompt_tokens=2), False),
    ("print(", SamplingParams(temperature=0, max_tokens=30, stop=["\n"], output_kind=FINAL), True),
]


@pytest.fixture(scope="module")
def engines():
    in_process = LLMEngine(EngineConfig(model=DEMO, device="cpu"))
    reporting = LLMEngine(EngineConfig(model=DEMO, device="cpu"))
    reporting.outputs = ProgressReport(reporting.tokenizer)
    return in_process, reporting


def comparable(output):
    """An output without its times (each engine has its own clock)."""
    return dataclasses.replace(output, metrics=None)


def run_all(engine, cases):
    outputs = []
    for i, (prompt, params, stream) in enumerate(cases):
        engine.add_request(f"r{i}", engine.tokenizer.encode(prompt), params, prompt=prompt, stream=stream)
    while engine.has_unfinished_requests():
        outputs.append(engine.step())
    return outputs


@pytest.mark.parametrize("merge_every", [1, 3, 1000])
def test_outputs_built_from_reports_equal_the_engines_own(engines, merge_every):
    in_process, reporting = engines
    expected = [o for step in run_all(in_process, CASES) for o in step]
    copies = RequestCopies(reporting.tokenizer)
    for i, (prompt, params, stream) in enumerate(CASES):
        ids = truncated_prompt(reporting.tokenizer.encode(prompt), params, reporting.config.max_model_len)
        copies.add(f"r{i}", ids, params, prompt, stream)
    steps = run_all(reporting, CASES)
    got, waiting = [], {}
    for number, reports in enumerate(steps, 1):
        for report in reports:  # merged as the engine process's outbox merges for a slow driver
            waiting[report[0]] = merge_reports(waiting[report[0]], report) if report[0] in waiting else report
        if number % merge_every == 0 or number == len(steps):
            got += [copies.output(report) for report in waiting.values()]
            waiting = {}
    assert not copies.requests
    by_request = {}
    for output in expected:
        by_request.setdefault(output.request_id, []).append(output)
    def delta(rid):
        return CASES[int(rid[1:])][1].output_kind == DELTA

    finals = {o.request_id: comparable(o) for o in got if o.finished and not delta(o.request_id)}
    assert finals == {rid: comparable(outputs[-1]) for rid, outputs in by_request.items() if not delta(rid)}
    if merge_every == 1:  # report by report, every output is the same
        assert [comparable(o) for o in got] == [comparable(o) for o in expected]
    for rid, outputs in by_request.items():  # merged or not, a stream's deltas add up to the same text and tokens
        if delta(rid):
            mine = [o for o in got if o.request_id == rid]
            for index in range(len(outputs[-1].outputs)):
                assert "".join(o.outputs[index].text for o in mine if index < len(o.outputs)) == \
                    "".join(o.outputs[index].text for o in outputs if index < len(o.outputs))
                assert sum((o.outputs[index].token_ids for o in mine if index < len(o.outputs)), []) == \
                    sum((o.outputs[index].token_ids for o in outputs if index < len(o.outputs)), [])


def test_the_engine_process_decodes_only_what_stop_strings_need(engines):
    _, reporting = engines
    detokenizer = reporting.outputs.detokenizer
    assert detokenizer(SamplingParams(), stream=True) is None
    assert detokenizer(SamplingParams(stop=["x"]), stream=False) is not None


def test_a_report_for_a_request_dropped_here_is_ignored_and_a_failed_text_fails_the_request(engines):
    _, reporting = engines
    copies = RequestCopies(reporting.tokenizer)
    copies.add("gone", [1, 2], SamplingParams(max_tokens=3), None, True)
    copies.drop("gone")
    sample = (0, [5], None, 0.0, None, None, None, None, None, None, None)
    assert copies.output(("gone", False, [sample], 0, None)) is None
    copies.add("bad", [1, 2], SamplingParams(max_tokens=3, output_kind=DELTA), "p", True)

    def boom(token_ids):
        raise RuntimeError("no text for these tokens")

    copies.requests["bad"].detokenizer.decode = boom
    out = copies.output(("bad", False, [sample], 0, None))
    assert out.finished and out.outputs[0].finish_reason == "error" and "no text" in out.error and out.prompt == "p"
    assert "bad" not in copies.requests


@pytest.mark.parametrize("merge", [False, True])
def test_progress_alone_carries_the_times_and_the_logprob_sum(engines, merge):
    """After its first report, a streamed request of one sample without logprobs is reported as its
    progress alone (new tokens, cumulative logprob, last token time): its outputs still give the
    engine's times and sums, merged with the full reports around them or not."""
    _, reporting = engines
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, output_kind=DELTA)
    ids = reporting.tokenizer.encode("def g():")
    copies = RequestCopies(reporting.tokenizer)
    copies.add("t", ids, params, "def g():", True)
    reporting.add_request("t", ids, params, prompt="def g():", stream=True)
    request = reporting.scheduler.waiting.first()
    shapes, tokens, waiting = [], [], None
    while reporting.has_unfinished_requests():
        for report in reporting.step():
            shapes.append(len(report))
            waiting = report if waiting is None else merge_reports(waiting, report)
            if merge and not report_finished(report) and len(shapes) % 2:
                continue
            out, waiting = copies.output(waiting), None
            tokens += out.outputs[0].token_ids
            assert (out.metrics.first_token_time, out.metrics.last_token_time, out.outputs[0].cumulative_logprob) == \
                (request.first_token_time, request.last_token_time, request.cumulative_logprob)
    assert shapes == [5, 4, 4, 4, 4, 5] and tokens == request.output_token_ids and out.finished
