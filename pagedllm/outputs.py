"""What ``LLM.generate`` returns, shaped like vLLM's outputs."""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass


@dataclass
class Logprob:
    """A token's log-probability under the model, its rank among all tokens (1 is the most
    likely), and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class FlatLogprobs(Sequence):
    """Logprobs position by position, read as vLLM's ``list[dict[int, Logprob]]`` (an index gives
    its position's ``{token_id: Logprob}``, None for a position without any: a prompt's first
    token), held in five flat lists of plain values. As a list of dicts of Logprob objects (21 a
    token at ``logprobs=20``), a batch job's outputs were millions of objects that each full pass
    of the garbage collector went over (the demo model on this CPU, 2,000 prompts of 64 tokens:
    4.1 s of 54 in the collector); floats, ints and strings in lists are none it tracks. vLLM has
    the same layout behind its ``flat_logprobs`` option; here it is the only one."""

    __slots__ = ("starts", "token_ids", "logprobs", "ranks", "decoded_tokens")

    def __init__(self, positions: Iterable[Mapping[int, Logprob] | None] = ()):
        self.starts: list[int] = [0]  # position i's entries are [starts[i], starts[i + 1])
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.ranks: list[int | None] = []
        self.decoded_tokens: list[str | None] = []
        self.extend(positions)

    def append_position(self, token_ids: Iterable[int], logprobs: Iterable[float], ranks: Iterable[int | None],
                        decoded_tokens: Iterable[str | None]) -> None:
        """One position's entries, the four in the same order."""
        self.token_ids.extend(token_ids)
        self.logprobs.extend(logprobs)
        self.ranks.extend(ranks)
        self.decoded_tokens.extend(decoded_tokens)
        self.starts.append(len(self.token_ids))

    def append(self, position: Mapping[int, Logprob] | None) -> None:
        entries = list(position.items()) if position else []
        self.append_position([t for t, _ in entries], [lp.logprob for _, lp in entries],
                             [lp.rank for _, lp in entries], [lp.decoded_token for _, lp in entries])

    def extend(self, positions: Iterable[Mapping[int, Logprob] | None]) -> None:
        if not isinstance(positions, FlatLogprobs):
            for position in positions:
                self.append(position)
            return
        offset = len(self.token_ids) - positions.starts[0]
        self.starts += [start + offset for start in positions.starts[1:]]
        self.token_ids += positions.token_ids
        self.logprobs += positions.logprobs
        self.ranks += positions.ranks
        self.decoded_tokens += positions.decoded_tokens

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return FlatLogprobs(self[i] for i in range(start, stop, step))
            part = FlatLogprobs()
            if start < stop:
                lo, hi = self.starts[start], self.starts[stop]
                part.starts = [s - lo for s in self.starts[start:stop + 1]]
                part.token_ids, part.logprobs = self.token_ids[lo:hi], self.logprobs[lo:hi]
                part.ranks, part.decoded_tokens = self.ranks[lo:hi], self.decoded_tokens[lo:hi]
            return part
        i = range(len(self))[index]  # (negative indices; an IndexError past the end)
        lo, hi = self.starts[i], self.starts[i + 1]
        if lo == hi:
            return None
        return {self.token_ids[j]: Logprob(self.logprobs[j], self.ranks[j], self.decoded_tokens[j])
                for j in range(lo, hi)}

    def __iter__(self) -> Iterator[dict[int, Logprob] | None]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # (it changes)

    def __add__(self, other: Iterable[Mapping[int, Logprob] | None]) -> "FlatLogprobs":
        total = FlatLogprobs(self)
        total.extend(other)
        return total

    def __repr__(self) -> str:
        return f"FlatLogprobs({list(self)!r})"


@dataclass
class CompletionOutput:
    """One generated sequence. ``finish_reason`` is "stop" (EOS, a stop token or string), "length",
    "abort" or "error";
    ``stop_reason`` is the stop token id that ended it (None for EOS or length). With
    ``SamplingParams.logprobs``, ``logprobs[i]`` maps the i-th token and the most likely
    alternatives to their Logprob (a ``FlatLogprobs``, read as a list of such dicts), and
    ``cumulative_logprob`` sums the generated tokens'."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: FlatLogprobs | None = None

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
    prompt_logprobs: FlatLogprobs | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
