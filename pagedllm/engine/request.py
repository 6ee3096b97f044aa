"""One request's state as the scheduler sees it."""

import enum
from dataclasses import dataclass, field

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams

# Stands in ``token_ids`` for the token a step still running on the device is sampling; the
# model runner feeds that step's sampled token in its place (see LLMEngine.step).
PENDING_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Tokens, progress and KV blocks of one request.

    ``num_computed_tokens`` counts the tokens whose K/V are in the cache (or are being written
    by the step in flight): the scheduler's one rule is to give each request the tokens it still
    lacks, whether they are prompt (prefill, maybe in chunks, maybe again after preemption) or
    the last sampled token (decode), which may still be ``PENDING_TOKEN``.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # sampling_params.max_tokens, or what max_model_len leaves
    stop_token_ids: frozenset[int]  # EOS (unless ignore_eos) and sampling_params.stop_token_ids
    prompt: str | None = None
    token_ids: list[int] = field(init=False)  # prompt then output
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache keys of its full, computed blocks
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first scheduled
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # with sampling_params.logprobs: per output token, {token id: (logprob, rank)}
    output_logprobs: list[dict[int, tuple[float, int]]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[dict[int, tuple[float, int]]] = field(default_factory=list)  # of prompt tokens 1..
    detokenizer: IncrementalDetokenizer | None = None  # requests with stop strings build text as they go
    stream: bool = False  # report every new token, not only the end
    group: "SampleGroup | None" = None  # the n samples of one request with sampling_params.n > 1
    sample_index: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def forks_now(self) -> bool:
        """Its next sample is the group's first: it is drawn n times, once per sample."""
        return self.group is not None and not self.group.forked

    def fork(self, index: int) -> "Request":
        """Sample ``index`` of the group, at the point where the prompt is computed: same tokens
        and progress, and the same blocks (the caller shares them)."""
        child = Request(f"{self.request_id}#{index}", self.prompt_token_ids, self.sampling_params, self.max_tokens,
                        self.stop_token_ids, self.prompt, num_computed_tokens=self.num_computed_tokens,
                        block_table=list(self.block_table), block_hashes=list(self.block_hashes),
                        num_cached_tokens=self.num_cached_tokens, status=self.status, stream=self.stream,
                        group=self.group, sample_index=index)
        if self.detokenizer is not None:
            child.detokenizer = IncrementalDetokenizer(self.detokenizer.tokenizer, self.detokenizer.skip_special_tokens)
        self.group.members.append(child)
        return child

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def tokens_banned_now(self) -> list[int]:
        """Stop tokens cannot be sampled before ``min_tokens`` outputs exist."""
        if self.num_output_tokens < self.sampling_params.min_tokens:
            return sorted(self.stop_token_ids)
        return []

    def append_output_token(self, token_id: int, logprobs: dict[int, tuple[float, int]] | None = None) -> None:
        """Add a sampled token (and its logprobs), in the pending slot its step left if there is one,
        and finish the request if it is a stop token or the last allowed."""
        if self.token_ids[-1] == PENDING_TOKEN:
            self.token_ids[-1] = token_id
        else:
            self.token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id][0]
        if self.num_output_tokens >= self.sampling_params.min_tokens and token_id in self.stop_token_ids:
            self.finish("stop", token_id if token_id in self.sampling_params.stop_token_ids else None)
        elif self.num_output_tokens >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason


@dataclass(eq=False)
class SampleGroup:
    """The n samples of one request: the first computes the prompt, then forks the others, which
    share its KV blocks."""

    request_id: str
    n: int
    members: list[Request] = field(default_factory=list)

    @property
    def forked(self) -> bool:
        return len(self.members) == self.n

    @property
    def is_finished(self) -> bool:
        return self.forked and all(m.is_finished for m in self.members)
