"""How one request is sampled and when it stops: vLLM's ``SamplingParams``, field for field."""

import copy
import enum
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from pagedllm.structured_outputs import GuidedDecodingParams, StructuredOutputsParams  # noqa: F401 (vLLM's path)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# stop strings, bad words or stop token ids a request: each is checked at every token, in the engine's
# one thread (100,000 stop strings slowed a batch of 8 four-fold, 84 ms a step)
MAX_STOPS = 1024
_NONE_IS_DEFAULT = ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
# vLLM's per-request logits processor: (output token ids, logits) -> logits, or
# (prompt token ids, output token ids, logits) -> logits; logits are one row, [vocab].
LogitsProcessor = Callable[..., Any]


class RequestOutputKind(enum.Enum):
    """What a streaming request reports at each step (vLLM's): everything so far, only what is new,
    or only the end."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """``n`` samples per prompt (they share the prompt's KV blocks; sample i of a seeded request
    uses seed + i); with ``best_of`` > n, best_of are drawn and the n of highest cumulative
    logprob returned. temperature 0 means greedy; top_k 0 or -1, top_p 1 and min_p 0 mean off.

    Penalties as in vLLM and the OpenAI API: ``presence_penalty`` and ``frequency_penalty``
    subtract from the logits of tokens already generated (once, or per occurrence);
    ``repetition_penalty`` > 1 divides positive (multiplies negative) logits of tokens in the
    prompt or the output. ``logit_bias`` adds to chosen tokens' logits (clamped to [-100, 100]),
    ``allowed_token_ids`` keeps only those tokens, ``bad_words`` bans the last token of each word
    where it would complete it, and ``logits_processors`` are vLLM's per-request callables.
    ``logprobs=k`` returns, per generated token, its log-probability under the model and the k
    most likely tokens' (-1: the whole vocabulary); ``prompt_logprobs=k`` does so for the prompt's
    tokens (such a request does not use the prefix cache: every prompt token must be scored).
    ``stop`` strings end the text before them (after them with ``include_stop_str_in_output``).
    ``max_tokens=None`` generates until EOS or the model's context is full. ``seed`` makes one
    request's sampling reproducible whatever else is in the batch. ``truncate_prompt_tokens=k``
    keeps the prompt's last k tokens (-1: as many as max_model_len allows). ``structured_outputs``
    constrains the output to a JSON schema, a regex, a choice or a grammar (``guided_decoding``
    is older vLLM's name for it).
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    flat_logprobs: bool = False  # vLLM's choice of layout: here logprobs are always FlatLogprobs (changes nothing)
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    logits_processors: list[LogitsProcessor] | None = None
    truncate_prompt_tokens: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None  # older vLLM's name: moved to structured_outputs
    extra_args: dict | None = None  # vLLM's: for custom sampling code and plugins; carried, used by none here

    def __post_init__(self) -> None:
        """Check every field's type and range, so that a request fails here, named, and never in the engine."""
        _check(is_int(self.n) and 1 <= self.n <= INT64_MAX, "n", self.n, "must be an int >= 1")
        _check(self.best_of is None or (is_int(self.best_of) and self.n <= self.best_of <= INT64_MAX), "best_of",
               self.best_of, f"must be an int >= n ({self.n}), or None")
        _check(is_real(self.temperature) and 0 <= self.temperature < math.inf, "temperature", self.temperature,
               "must be a finite number >= 0 (0 is greedy)")
        for name in ("n", "best_of"):
            _check((getattr(self, name) or 1) == 1 or self.temperature > 0, name, getattr(self, name),
                   "must be 1 with greedy sampling (temperature=0): greedy samples would all be the same")
        _check(is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be a number in (0, 1]")
        _check(is_int(self.top_k) and -1 <= self.top_k <= INT64_MAX, "top_k", self.top_k,
               "must be an int >= 0, or -1 (0 and -1 turn it off)")
        if self.top_k == -1:
            self.top_k = 0
        _check(is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "must be a number in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(is_real(value) and -2 <= value <= 2, name, value, "must be a number in [-2, 2]")
        _check(is_real(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf, "repetition_penalty",
               self.repetition_penalty, "must be a finite number > 0 (1 is off)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (is_int(value) and -1 <= value <= INT64_MAX), name, value,
                   "must be an int >= 0, -1 (the whole vocabulary), or None")
        _check(self.max_tokens is None or (is_int(self.max_tokens) and 1 <= self.max_tokens <= INT64_MAX),
               "max_tokens", self.max_tokens, "must be an int >= 1, or None")
        _check(is_int(self.min_tokens) and 0 <= self.min_tokens <= INT64_MAX, "min_tokens", self.min_tokens,
               "must be an int >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"must be <= max_tokens ({self.max_tokens})")
        self.stop = _strings(self.stop, "stop")
        self.bad_words = _strings(self.bad_words, "bad_words")
        self.stop_token_ids = _token_ids(self.stop_token_ids, "stop_token_ids")
        for name in ("stop", "bad_words", "stop_token_ids"):
            values = getattr(self, name)
            _check(len(values) <= MAX_STOPS, name, values, f"must hold at most {MAX_STOPS}, not {len(values)}: each "
                   "is checked at every token, in the engine's one thread")
        self.allowed_token_ids = _token_ids(self.allowed_token_ids, "allowed_token_ids", keep_none=True)
        _check(self.allowed_token_ids != [], "allowed_token_ids", self.allowed_token_ids,
               "must hold a token id at least, or be None")
        self.logit_bias = _logit_bias(self.logit_bias)
        _check(self.logits_processors is None or (isinstance(self.logits_processors, (list, tuple))
                                                  and all(callable(p) for p in self.logits_processors)),
               "logits_processors", self.logits_processors, "must be a list of callables")
        self.logits_processors = list(self.logits_processors or []) or None
        _check(self.truncate_prompt_tokens is None or (is_int(self.truncate_prompt_tokens) and
                                                       (self.truncate_prompt_tokens >= 1 or
                                                        self.truncate_prompt_tokens == -1)),
               "truncate_prompt_tokens", self.truncate_prompt_tokens, "must be an int >= 1, -1, or None")
        _check(self.seed is None or (is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX - self.samples + 1),
               "seed", self.seed, "must be an int in [-2**63, 2**63 - n] (sample i uses seed + i), or None")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "detokenize",
                     "spaces_between_special_tokens", "flat_logprobs"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be True or False")
        _check(self.detokenize or not self.stop, "stop", self.stop, "needs detokenize=True (stop strings are text)")
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind", self.output_kind,
               "must be a RequestOutputKind")
        _check(self.extra_args is None or isinstance(self.extra_args, dict), "extra_args", self.extra_args,
               "must be a dict or None")
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs, "structured_outputs")
        guided = StructuredOutputsParams.coerce(self.guided_decoding, "guided_decoding")
        if guided is not None:
            _check(self.structured_outputs is None, "guided_decoding", guided,
                   "must not be given with structured_outputs (it is the older name of the same thing)")
            self.structured_outputs, self.guided_decoding = guided, None
        for name in ("n", "best_of", "top_k", "min_tokens", "max_tokens", "seed", "logprobs", "prompt_logprobs",
                     "truncate_prompt_tokens"):
            if getattr(self, name) is not None:  # numpy ints become Python ints
                setattr(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            setattr(self, name, float(getattr(self, name)))

    @property
    def samples(self) -> int:
        """How many sequences are drawn: best_of (the n best are returned), else n."""
        return self.best_of or self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def clone(self) -> "SamplingParams":
        """A deep copy (logits processors are shared, as vLLM shares them)."""
        processors, self.logits_processors = self.logits_processors, None
        try:
            clone = copy.deepcopy(self)
        finally:
            self.logits_processors = processors
        clone.logits_processors = processors
        return clone

    @staticmethod
    def from_optional(**kwargs) -> "SamplingParams":
        """vLLM's constructor for OpenAI request bodies: None for n, temperature, top_p and the
        penalties means their default; other fields are taken as given."""
        unknown = sorted(set(kwargs) - {f.name for f in fields(SamplingParams)})
        if unknown:
            raise ValueError(f"SamplingParams has no field {unknown[0]!r}")
        return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None or k not in _NONE_IS_DEFAULT})


def is_int(value: object) -> bool:
    """An int (numpy's too), not a bool. (Plain ints first: the ABC check costs ~10x as much, and
    a logit_bias may hold the whole vocabulary.)"""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def is_real(value: object) -> bool:
    """An int or a float (numpy's too), not a bool, a string or NaN."""
    if type(value) in (int, float):
        return value == value
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def _strings(value: object, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    _check(items is None or (isinstance(items, (list, tuple)) and all(isinstance(s, str) and s for s in items)),
           name, value, "must be a non-empty string or a list of them")
    return list(items or [])


def _token_ids(value: object, name: str, keep_none: bool = False) -> list[int] | None:
    if value is None:
        return None if keep_none else []
    _check(isinstance(value, (list, tuple)) and all(is_int(t) and 0 <= t <= INT64_MAX for t in value),
           name, value, "must be a list of non-negative ints")
    return [int(t) for t in value]


def _logit_bias(value: object) -> dict[int, float] | None:
    """Token id (an int, or its digits as OpenAI bodies send them) -> bias in [-100, 100]."""
    if value is None:
        return None
    _check(isinstance(value, dict), "logit_bias", value, "must be a dict of token id -> bias")
    bias = {}
    for token, amount in value.items():
        token_id = int(token) if isinstance(token, str) and token.isdigit() else token
        if not (is_int(token_id) and 0 <= token_id <= INT64_MAX and is_real(amount) and math.isfinite(amount)):
            _check(False, "logit_bias", {token: amount}, "must map token ids (ints >= 0) to finite numbers")
        bias[int(token_id)] = min(100.0, max(-100.0, float(amount)))
    return bias


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        shown = repr(value)
        if len(shown) > 200:  # (a list of a million strings, say: the error names it, not repeats it)
            shown = f"{shown[:200]}... ({len(shown)} characters)"
        raise ValueError(f"SamplingParams.{name}={shown} is invalid: it {rule}")


@dataclass
class BeamSearchParams:
    """vLLM's: ``beam_width`` beams, at most ``max_tokens`` new tokens each; ``length_penalty``
    divides a finished beam's cumulative logprob by its length to that power."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name, ok, rule in (
                ("beam_width", is_int(self.beam_width) and self.beam_width >= 1, "an int >= 1"),
                ("max_tokens", is_int(self.max_tokens) and self.max_tokens >= 1, "an int >= 1"),
                ("ignore_eos", isinstance(self.ignore_eos, bool), "True or False"),
                ("temperature", is_real(self.temperature) and 0 <= self.temperature < math.inf, "a finite number >= 0"),
                ("length_penalty", is_real(self.length_penalty) and math.isfinite(self.length_penalty),
                 "a finite number"),
                ("include_stop_str_in_output", isinstance(self.include_stop_str_in_output, bool), "True or False")):
            if not ok:
                raise ValueError(f"BeamSearchParams.{name}={getattr(self, name)!r} is invalid: it must be {rule}")
