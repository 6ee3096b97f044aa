"""How one request is sampled and when it stops: vLLM's ``SamplingParams``, field for field."""

import math
import numbers
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """``n`` samples per prompt (they share the prompt's KV blocks; sample i of a seeded request
    uses seed + i). temperature 0 means greedy; top_k 0 or -1, top_p 1 and min_p 0 mean off.

    Penalties as in vLLM and the OpenAI API: ``presence_penalty`` and ``frequency_penalty``
    subtract from the logits of tokens already generated (once, or per occurrence);
    ``repetition_penalty`` > 1 divides positive (multiplies negative) logits of tokens in the
    prompt or the output. ``logprobs=k`` returns, per generated token, its log-probability under
    the model and the k most likely tokens'; ``prompt_logprobs=k`` does so for the prompt's tokens
    (such a request does not use the prefix cache: every prompt token must be scored). ``stop``
    strings end the text before them (after them with ``include_stop_str_in_output``).
    ``max_tokens=None`` generates until EOS or the model's context is full. ``seed`` makes one
    request's sampling reproducible whatever else is in the batch.
    """

    n: int = 1
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
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        """Check every field's type and range, so that a request fails here, named, and never in the engine."""
        _check(is_int(self.n) and 1 <= self.n <= INT64_MAX, "n", self.n, "must be an int >= 1")
        _check(_is_real(self.temperature) and 0 <= self.temperature < math.inf, "temperature", self.temperature,
               "must be a finite number >= 0 (0 is greedy)")
        _check(self.n == 1 or self.temperature > 0, "n", self.n,
               "must be 1 with greedy sampling (temperature=0): greedy samples would all be the same")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "must be a number in (0, 1]")
        _check(is_int(self.top_k) and -1 <= self.top_k <= INT64_MAX, "top_k", self.top_k,
               "must be an int >= 0, or -1 (0 and -1 turn it off)")
        if self.top_k == -1:
            self.top_k = 0
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "must be a number in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -2 <= value <= 2, name, value, "must be a number in [-2, 2]")
        _check(_is_real(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf, "repetition_penalty",
               self.repetition_penalty, "must be a finite number > 0 (1 is off)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (is_int(value) and 0 <= value <= INT64_MAX), name, value,
                   "must be an int >= 0, or None")
        _check(self.max_tokens is None or (is_int(self.max_tokens) and 1 <= self.max_tokens <= INT64_MAX),
               "max_tokens", self.max_tokens, "must be an int >= 1, or None")
        _check(is_int(self.min_tokens) and 0 <= self.min_tokens <= INT64_MAX, "min_tokens", self.min_tokens,
               "must be an int >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"must be <= max_tokens ({self.max_tokens})")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        _check(stop is None or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop)),
               "stop", self.stop, "must be a non-empty string or a list of them")
        self.stop = list(stop or [])
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        _check(isinstance(self.stop_token_ids, (list, tuple)) and all(is_int(t) and 0 <= t <= INT64_MAX
                                                                      for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "must be a list of non-negative ints")
        _check(self.seed is None or (is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX - self.n + 1),
               "seed", self.seed, "must be an int in [-2**63, 2**63 - n] (sample i uses seed + i), or None")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be True or False")
        for name in ("n", "top_k", "min_tokens", "max_tokens", "seed", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:  # numpy ints become Python ints
                setattr(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            setattr(self, name, float(getattr(self, name)))
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def is_int(value: object) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """An int or a float (numpy's too), not a bool, a string or NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it {rule}")
