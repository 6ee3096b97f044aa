"""A reasoning model's thinking apart from its answer (vLLM's ``reasoning_parser``), for the
models that think between ``<think>`` and ``</think>`` (DeepSeek-R1 and its distills, Qwen3, QwQ):
the server splits each chat answer's text (``ReasoningSplitter``), and the engine holds a
request's structured output back until its thinking ends (``thinking_token_ids``).

Whether the answer starts in thinking is read from the prompt: a chat template that opens
``<think>`` for the model (DeepSeek-R1's, Qwen3's thinking models') leaves the prompt's last tag
open; one that closes it (Qwen3 with ``enable_thinking=False``) or has none starts in the answer
(for the server's split, unless the model opens ``<think>`` itself before anything else). The
same splitter serves a stream and a whole answer, so both split alike; a tag cut between two
chunks is held back until it is whole."""

from dataclasses import dataclass

START, END = "<think>", "</think>"
# vLLM's names of the parsers of <think>...</think> (its others read other tags and are not taken)
REASONING_PARSERS = ("deepseek_r1", "qwen3")


def starts_thinking(prompt_text: str | None) -> bool:
    """Whether the prompt leaves a ``<think>`` open for the model to go on in."""
    return bool(prompt_text) and prompt_text.rfind(START) > prompt_text.rfind(END)


def thinking_token_ids(tokenizer, parser: str) -> tuple[int, int]:
    """The ids of ``<think>`` and ``</think>``, which a reasoning model's tokenizer holds as tokens;
    a ValueError where this one does not."""
    ids = [tokenizer.convert_tokens_to_ids(tag) if tokenizer is not None else None for tag in (START, END)]
    if any(i is None or i == getattr(tokenizer, "unk_token_id", None) for i in ids):
        raise ValueError(f"reasoning_parser={parser!r} needs {START} and {END} to be tokens of the model's tokenizer, "
                         "as a reasoning model's are; this model's tokenizer has none such")
    return ids[0], ids[1]


def thinking_at_start(prompt_token_ids: list[int], start_id: int, end_id: int) -> bool:
    """``starts_thinking`` on token ids: whether the prompt's last tag is an open ``<think>``."""
    for token in reversed(prompt_token_ids):
        if token in (start_id, end_id):
            return token == start_id
    return False


def _held_back(text: str, tag: str) -> int:
    """How many of text's last characters may begin ``tag`` (to wait for the next chunk)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ReasoningSplitter:
    """One choice's text, fed as it comes: ``feed`` returns the new (reasoning, answer) text."""

    thinking: bool  # whether the prompt left a <think> open
    begun: bool = False  # whether anything but whitespace has come (a <think> only opens before that)
    held: str = ""  # text that may begin a tag, waiting for the next chunk

    def feed(self, text: str, last: bool = False) -> tuple[str | None, str | None]:
        """The reasoning and answer in ``text`` (``last``: the final chunk, nothing held back)."""
        text, self.held = self.held + text, ""
        reasoning, answer = [], []
        while text:
            if not self.begun:
                stripped = text.lstrip()
                if not stripped or (START.startswith(stripped) and not last):  # only whitespace, or part of a tag
                    if last:
                        (reasoning if self.thinking else answer).append(text)
                    else:
                        self.held = text
                    break
                self.begun = True
                if stripped.startswith(START):  # the model opens its thinking itself
                    self.thinking, text = True, stripped[len(START):]
                continue
            if not self.thinking:
                answer.append(text)
                break
            end = text.find(END)
            if end >= 0:
                reasoning.append(text[:end])
                self.thinking, text = False, text[end + len(END):]
                continue
            keep = 0 if last else _held_back(text, END)
            reasoning.append(text[: len(text) - keep])
            self.held = text[len(text) - keep:]
            break
        return "".join(reasoning) or None, "".join(answer) or None


def split_reasoning(text: str, prompt_text: str | None) -> tuple[str | None, str | None]:
    """A whole answer's (reasoning, answer)."""
    return ReasoningSplitter(starts_thinking(prompt_text)).feed(text, last=True)
