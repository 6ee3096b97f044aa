"""Structured outputs through xgrammar: each request's spec compiles once per engine (xgrammar
caches compiled grammars by their spec), each sample gets its own ``GrammarMatcher``. Before a
step samples, every constrained row's matcher fills its row of a token bitmask on the host
(``worker/sampling_inputs.py``); the sampler applies it to the whole batch's logits on their
device at once; the sampled
token is then accepted by the matcher on the host (``Request.append_output_token``), and a
grammar that terminates ends its request.

A constrained request's next mask needs its last token accepted first. With async scheduling
the overlap is kept: a step holding constrained requests launches its forward pass, then the
engine reads the previous step back (the matchers accept its tokens) while the device computes,
and only then are the masks filled and the step's sampling launched (``LLMEngine.step``).
"""

import json
import threading

from transformers import PreTrainedTokenizerBase

from pagedllm.structured_outputs import StructuredOutputsParams


class GrammarCompiler:
    """The engine's compiler, built at the first constrained request (xgrammar reads the whole
    vocabulary once)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, stop_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._compiler = None
        self._lock = threading.Lock()  # the server validates requests in threads

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



def new_matcher(compiled):
    """A sample's own matcher over a compiled grammar: where its output is in the grammar."""
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled)

