"""Structured outputs through xgrammar: each request's spec compiles once per engine (xgrammar
caches compiled grammars by their spec), each sample gets its own ``GrammarMatcher``. The engine
compiles in worker threads (``compile_later``; xgrammar lets go of the GIL) and queues a request
once its grammar is ready, as vLLM does: a regex of 50,000 alternatives took 12 s to compile, and
every other request waited for it while the engine loop compiled it itself. Before a
step samples, the constrained rows' matchers fill their rows of a token bitmask on the host, in
xgrammar's threads (``fill_masks``); the sampler applies it to those rows' logits on their device
in one kernel; the sampled token is then accepted by the matcher on the host
(``Request.append_output_token``), and a grammar that terminates ends its request.

The masks span the tokenizer's ids, not the model's padded vocabulary: xgrammar treats ids past
the tokenizer as special tokens and scans them on every accepted token (a 4k tokenizer under a
152k vocabulary made each accept 70 us); the sampler bans the ids past the masks itself.

A constrained request's next mask needs its last token accepted first. With async scheduling
the overlap is kept: a step holding constrained requests launches its forward pass, then the
engine reads the previous step back (the matchers accept its tokens) while the device computes,
and only then are the masks filled and the step's sampling launched (``LLMEngine.step``).
"""

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pagedllm.layers.sampler import GrammarMasks
from pagedllm.structured_outputs import StructuredOutputsParams


class GrammarCompiler:
    """The engine's compiler, built at the first constrained request (xgrammar reads the whole
    vocabulary once)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer = tokenizer
        # the ids a mask spans: the tokenizer's (added tokens included), within the model's vocabulary
        self.vocab_size = vocab_size if tokenizer is None else min(vocab_size, len(tokenizer))
        self.stop_token_ids = sorted(t for t in stop_token_ids if t < self.vocab_size)
        self._compiler = None
        self._lock = threading.Lock()  # the server validates requests in threads
        self._workers: ThreadPoolExecutor | None = None  # compile_later's, made at its first call

    def compile_later(self, params: StructuredOutputsParams) -> Future:
        """``compile`` in a worker thread: the future's result, or its ValueError."""
        with self._lock:
            if self._workers is None:
                # a few at least: one grammar that takes long holds up only the compiles queued behind it
                self._workers = ThreadPoolExecutor(max(4, (os.cpu_count() or 2) // 2), "grammar-compiler")
        return self._workers.submit(self.compile, params)

    def shutdown(self) -> None:
        """Stop the workers; compiles not yet begun are dropped."""
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of ``params``; a ValueError naming the field if it does not compile."""
        import xgrammar as xgr

        if self.tokenizer is None:
            raise ValueError("SamplingParams.structured_outputs needs the model's tokenizer, and this model has none")
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                self._compiler = xgr.GrammarCompiler(info)
        kind = params.kind
        try:
            if kind in ("json", "json_object"):  # json_object: any JSON object, as OpenAI's json_object mode
                schema = params.schema if kind == "json" else '{"type": "object"}'
                return self._compiler.compile_json_schema(schema, any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return self._compiler.compile_regex(params.regex)
            if kind == "choice":
                alternatives = " | ".join(json.dumps(choice, ensure_ascii=False) for choice in params.choice)
                return self._compiler.compile_grammar(f"root ::= {alternatives}")
            return self._compiler.compile_grammar(params.grammar)
        except (RuntimeError, ValueError, TypeError) as err:
            value = getattr(params, kind)
            shown = value if len(repr(value)) <= 200 else f"{repr(value)[:200]}..."
            raise ValueError(f"SamplingParams.structured_outputs.{kind}={shown!r} is invalid: "
                             f"{str(err).strip().splitlines()[-1]}") from None



@dataclass(eq=False)
class SampleGrammar:
    """One sample's place in its grammar (xgrammar's matcher) and the ids its masks span. With a
    reasoning model (``reasoning_parser``) that thinks first, ``thinking_until`` holds the tokens
    that open its answer (``</think>``; harmony's ``<|channel|>final<|message|>``) until the sample
    has written them: the grammar constrains only the answer after."""

    matcher: Any
    vocab_size: int
    thinking_until: tuple[int, ...] | None = None

    @classmethod
    def new(cls, compiled, thinking_until: tuple[int, ...] | None = None) -> "SampleGrammar":
        import xgrammar as xgr

        return cls(xgr.GrammarMatcher(compiled), compiled.tokenizer_info.vocab_size, thinking_until)


_fill_lock = threading.Lock()


@cache
def _batch_matcher():
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher()  # a pool of half the host's hardware threads


def fill_masks(grammars: list[SampleGrammar | None], pin: bool) -> GrammarMasks | None:
    """The next-token masks of a step's constrained rows (``None`` rows are free), filled in
    xgrammar's threads into a buffer no one has to clear: each row is written whole."""
    rows = [row for row, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    vocab_size = grammars[rows[0]].vocab_size  # one compiler per engine: one vocabulary
    bitmask = torch.empty((len(rows), (vocab_size + 31) // 32), dtype=torch.int32, pin_memory=pin)
    with _fill_lock:  # engines in threads of one process share the pool
        _batch_matcher().batch_fill_next_token_bitmask([grammars[row].matcher for row in rows], bitmask)
    return GrammarMasks(bitmask, rows, vocab_size)


def allows_only(masks: GrammarMasks, index: int, token_ids: frozenset[int]) -> bool:
    """Whether the ``index``-th mask allows no token outside ``token_ids`` (a grammar that can only
    end, where they are the stop tokens)."""
    words = masks.bitmask[index].numpy().view(np.uint32).copy()
    for token in token_ids:
        if token < masks.vocab_size:
            words[token >> 5] &= np.uint32(~(1 << (token & 31)) & 0xFFFFFFFF)
    if masks.vocab_size % 32:  # bits past the vocabulary
        words[-1] &= np.uint32((1 << (masks.vocab_size % 32)) - 1)
    return not words.any()
