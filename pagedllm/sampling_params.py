"""How one request is sampled and when it stops: vLLM's ``SamplingParams``, field for field."""

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
        _check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0 (0 is greedy)")
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "must be an int >= 1")
        _check(self.n == 1 or self.temperature > 0, "n", self.n,
               "must be 1 with greedy sampling (temperature=0): greedy samples would all be the same")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        _check(
            isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1),
            "top_k", self.top_k, "must be an int >= 0, or -1 (0 and -1 turn it off)",
        )
        if self.top_k == -1:
            self.top_k = 0
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            _check(-2 <= getattr(self, name) <= 2, name, getattr(self, name), "must be in [-2, 2]")
        _check(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "must be > 0 (1 is off)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 0), name, value,
                   "must be an int >= 0, or None")
        _check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens", self.max_tokens, "must be an int >= 1, or None",
        )
        _check(
            isinstance(self.min_tokens, int) and self.min_tokens >= 0,
            "min_tokens", self.min_tokens, "must be an int >= 0",
        )
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                "min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})",
            )
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must be a non-empty string or a list of them")
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", self.stop_token_ids, "must be a list of non-negative ints",
        )
        _check(
            self.seed is None or isinstance(self.seed, int), "seed", self.seed, "must be an int or None"
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it {rule}")
