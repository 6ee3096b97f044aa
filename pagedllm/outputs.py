"""What ``LLM.generate`` returns, shaped like vLLM's outputs."""

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One generated sequence. ``finish_reason`` is "stop" (EOS or a stop token) or "length";
    ``stop_reason`` is the stop token id that ended it (None for EOS or length)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One request's prompt and completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
