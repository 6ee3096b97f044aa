"""One request's state as the scheduler sees it."""

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.errors import ClientFault
from pagedllm.outputs import FlatLogprobs
from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedllm.engine.structured_output import SampleGrammar

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
    block_table: list[int] = field(default_factory=list)  # -1: released, out of every layer's sliding window
    num_released_blocks: int = 0  # its leading blocks released so (sliding-window models)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full, computed blocks
    window_blocks: "WindowBlocks | None" = None  # its blocks in the sliding layers' own pool, where there is one
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
    cache_salt: str | None = None  # its prefix blocks are shared only with requests of the same salt
    bad_words_token_ids: list[list[int]] = field(default_factory=list)  # sampling_params.bad_words, tokenized
    grammar: "SampleGrammar | None" = None  # structured outputs: its own place in its grammar
    needs_its_tokens: bool = field(init=False)
    may_ban: bool = field(init=False)
    tensors: "SamplingTensors | None" = None  # what its sampling reads of its own, made once (the engine's)
    num_reported_tokens: int = 0  # output tokens and characters already reported (output_kind DELTA)
    num_reported_chars: int = 0
    reported_logprobs: FlatLogprobs = field(default_factory=FlatLogprobs)  # output_logprobs as whole outputs give
    # them, each built once
    error: str | None = None  # why it failed (finish_reason "error"), if an error was pinned on it
    group: "SampleGroup | None" = None  # the n samples of one request with sampling_params.n > 1
    sample_index: int = 0  # its place in the group; a seeded sample draws from seed + sample_index
    # time.time() when it arrived, was first scheduled, got its first and last token, and finished
    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        p = self.sampling_params
        # Decided once (it is asked at every step): sampling its next token reads its output tokens
        # on the host (penalties, bad words of several tokens, logits processors).
        self.needs_its_tokens = p.penalized or bool(p.logits_processors) or any(
            len(w) > 1 for w in self.bad_words_token_ids)
        # and whether it ever bans tokens (stop tokens before min_tokens, bad words): most never do
        self.may_ban = p.min_tokens > 0 or bool(self.bad_words_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether it scores its prompt tokens: the first of a group does it for all its samples."""
        return self.sampling_params.prompt_logprobs is not None and self.sample_index == 0

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


    @property
    def before_min_tokens(self) -> bool:
        return self.num_output_tokens < self.sampling_params.min_tokens

    def tokens_banned_now(self, grammar_must_end: bool = False) -> list[int]:
        """Stop tokens cannot be sampled before ``min_tokens`` outputs exist, unless the request's
        grammar allows nothing else (``grammar_must_end``: a short schema, done; it then ends, as
        in vLLM); nor can the last token of a bad word whose other tokens the output ends with."""
        banned = sorted(self.stop_token_ids) if self.before_min_tokens and not grammar_must_end else []
        if self.bad_words_token_ids:
            num_output, end = self.num_output_tokens, len(self.token_ids)
            for word in self.bad_words_token_ids:
                head = word[:-1]  # the tokens the output must end with for the word's last to complete it
                if not head or (len(head) <= num_output and self.token_ids[end - len(head):] == head):
                    banned.append(word[-1])
        return banned

    def append_output_token(self, token_id: int, logprobs: dict[int, tuple[float, int]] | None = None,
                            token_logprob: float | None = None) -> None:
        """Add a sampled token (its raw logprob, and its top logprobs if asked), in the pending slot
        its step left if there is one, and finish the request if it is a stop token or the last allowed."""
        if self.token_ids[-1] == PENDING_TOKEN:
            self.token_ids[-1] = token_id
        else:
            self.token_ids.append(token_id)
        self.last_token_time = time.time()
        if self.first_token_time is None:
            self.first_token_time = self.last_token_time
        if token_logprob is not None:
            self.cumulative_logprob += token_logprob
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        grammar = self.grammar_now
        if self.grammar is not None and grammar is None:
            opening = self.grammar.thinking_until
            if tuple(self.token_ids[-len(opening):]) == opening:
                self.grammar.thinking_until = None  # the answer, which the grammar constrains, starts next
        if grammar is not None and not grammar.matcher.accept_token(token_id):  # its mask allowed no token
            self.error = self._grammar_dead_end(token_id)
            self.finish("error")
        elif grammar is not None and grammar.matcher.is_terminated():  # it took a stop token where it may end
            self.finish("stop", token_id if token_id in self.sampling_params.stop_token_ids else None)
        elif self.num_output_tokens >= self.sampling_params.min_tokens and token_id in self.stop_token_ids:
            self.finish("stop", token_id if token_id in self.sampling_params.stop_token_ids else None)
        elif self.num_output_tokens >= self.max_tokens:
            self.finish("length")

    @property
    def grammar_now(self) -> "SampleGrammar | None":
        """The grammar that constrains the next token: none while the sample still thinks."""
        return self.grammar if self.grammar is not None and self.grammar.thinking_until is None else None

    def _grammar_dead_end(self, token_id: int) -> str:
        """Why the grammar took no token: every token it allowed was banned by the request's other
        values (a ``ClientFault`` naming them), or, with none set, a fault of the engine's."""
        params = self.sampling_params
        message = f"structured outputs: no token could follow the output so far (sampled {token_id})"
        banning = [name for name, value in (("bad_words", self.bad_words_token_ids),
                                            ("allowed_token_ids", params.allowed_token_ids),
                                            ("logits_processors", params.logits_processors)) if value]
        if not banning:
            return message
        return ClientFault(f"{message}: {' and '.join(banning)} banned every token its grammar allowed next")

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finished_time = time.time()
        self.finish_reason, self.stop_reason = reason, stop_reason


@dataclass(frozen=True)
class SamplingTensors:
    """A request's own token lists that every step's sampling reads, as tensors made once when it
    is added and shared by its samples: as Python lists rebuilt each step, a logit_bias of 150,000
    tokens cost every step of a 256-row batch 181 ms of host time, and a repetition penalty over a
    1,000-token prompt 38 ms."""

    allowed_ids: torch.Tensor | None  # sampling_params.allowed_token_ids
    bias: tuple[torch.Tensor, torch.Tensor] | None  # sampling_params.logit_bias: token ids, biases (float32)
    prompt_ids: torch.Tensor | None  # the prompt's token ids, where penalties read them

    @classmethod
    def of(cls, params: SamplingParams, prompt_token_ids: list[int]) -> "SamplingTensors | None":
        if not (params.allowed_token_ids or params.logit_bias or params.penalized):
            return None
        bias = params.logit_bias
        return cls(None if not params.allowed_token_ids else torch.tensor(params.allowed_token_ids),
                   None if not bias else (torch.tensor(list(bias)), torch.tensor(list(bias.values()),
                                                                                 dtype=torch.float32)),
                   torch.tensor(prompt_token_ids) if params.penalized else None)


@dataclass(eq=False)
class SampleGroup:
    """The n samples of one request (``sampling_params.n > 1``): n requests of their own, scheduled
    like any others, reported together under the group's id. With prefix caching, samples 1..n-1
    wait until sample 0 has computed the prompt, then take its blocks from the cache."""

    request_id: str
    members: list[Request] = field(default_factory=list)  # in sample order
    prompt_computed: bool = False  # a member has sampled, so the prompt's full blocks are cached

    @property
    def is_finished(self) -> bool:
        return all(m.is_finished for m in self.members)


@dataclass(eq=False)
class WindowBlocks:
    """A request's blocks in the sliding layers' own pool (models that mix sliding and full
    layers), with the fields a ``BlockManager`` reads of a request, so that the pool's manager
    handles it as one (its prefix-cache keys are the request's own)."""

    request: Request
    block_table: list[int] = field(default_factory=list)  # -1: released, out of the window
    num_released_blocks: int = 0
    block_hashes: list[bytes] = field(default_factory=list)

    @property
    def num_computed_tokens(self) -> int:
        return self.request.num_computed_tokens

    @property
    def cache_salt(self) -> str | None:
        return self.request.cache_salt

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids
