"""What ``LLM.generate`` returns, shaped like vLLM's outputs."""

from dataclasses import dataclass


@dataclass
class Logprob:
    """A token's log-probability under the model, its rank among all tokens (1 is the most
    likely), and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence. ``finish_reason`` is "stop" (EOS, a stop token or string), "length",
    "abort" or "error";
    ``stop_reason`` is the stop token id that ended it (None for EOS or length). With
    ``SamplingParams.logprobs``, ``logprobs[i]`` maps the i-th token and the most likely
    alternatives to their Logprob, and ``cumulative_logprob`` sums the generated tokens'."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When the request went through the engine (``time.time()`` seconds), as vLLM reports it.
    For n > 1 samples, the earliest first and the latest last times of any sample."""

    arrival_time: float
    last_token_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None  # from arrival to first scheduled
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """One request's prompt and completions; ``num_cached_tokens`` prompt tokens came from the
    prefix cache instead of being computed. With ``SamplingParams.prompt_logprobs``,
    ``prompt_logprobs[i]`` scores prompt token i (None for the first, which nothing predicts).
    ``error`` says why the request failed alone (its completions' finish_reason is "error")."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
