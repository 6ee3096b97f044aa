"""Beam search, as vLLM's ``LLM.beam_search`` does it: each step asks the engine for one token of
every live beam with its 2 x beam_width most likely next tokens, keeps the beam_width best
continuations of each prompt, and sets aside those that end with EOS. The beams of a prompt share
their prefix's KV blocks through the prefix cache, so each step computes about one token a beam."""

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.outputs import Logprob
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagedllm.llm import LLM


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` holds the prompt's and the generated ones; ``text`` decodes them all."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    lora_request: Any = None
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """A prompt's best beams, best first (at most beam_width)."""

    sequences: list[BeamSearchSequence]


def beam_search(llm: "LLM", prompts: list[list[int]], params: BeamSearchParams,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """Each token-id prompt's best beams (``LLM.beam_search`` checks the prompts first)."""
    engine = llm.llm_engine
    width = params.beam_width
    step_params = SamplingParams(max_tokens=1, logprobs=2 * width, temperature=params.temperature, ignore_eos=True)
    eos_ids = set() if params.ignore_eos else engine.eos_token_ids
    live = [[BeamSearchSequence(list(prompt))] for prompt in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        beams = [(i, beam) for i, prompt_beams in enumerate(live) for beam in prompt_beams
                 if len(beam.tokens) < engine.config.max_model_len]
        if not beams:
            break
        outputs = llm.generate([{"prompt_token_ids": beam.tokens} for _, beam in beams], step_params,
                               use_tqdm=use_tqdm)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), output in zip(beams, outputs, strict=True):
            for token, logprob in output.outputs[0].logprobs[0].items():
                grown = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [output.outputs[0].logprobs[0]],
                                           cum_logprob=beam.cum_logprob + logprob.logprob)
                if token in eos_ids:
                    grown.finish_reason = "stop"
                    done[i].append(grown)
                else:
                    candidates[i].append(grown)
        live = [sorted(c, key=lambda b: b.cum_logprob, reverse=True)[:width] for c in candidates]
    tokenizer = engine.tokenizer
    results = []
    for finished, unfinished in zip(done, live, strict=True):
        for beam in unfinished:
            beam.finish_reason = "length"
        ranked = sorted(finished + unfinished, key=lambda b: _rank(b, eos_ids, params.length_penalty))
        for beam in ranked[:width]:
            beam.text = tokenizer.decode(beam.tokens) if tokenizer is not None else None
        results.append(BeamSearchOutput(ranked[:width]))
    return results


def _rank(beam: BeamSearchSequence, eos_ids: set[int], length_penalty: float) -> float:
    """Where a beam ranks, lowest first: its score is the cumulative logprob (<= 0) over the length
    (an ending EOS not counted) to the length penalty, and this is the log of minus that score (a
    penalty of 1,000 made ``length ** penalty`` overflow; in logs it cannot)."""
    length = len(beam.tokens) - (beam.tokens[-1] in eos_ids)
    if beam.cum_logprob >= 0:
        return -math.inf
    if beam.cum_logprob == -math.inf:  # (a token the model gave no chance, where the vocabulary is small)
        return math.inf
    return math.log(-beam.cum_logprob) - length_penalty * math.log(length)
