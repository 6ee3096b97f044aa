"""A reasoning model's thinking apart from its answer (vLLM's ``reasoning_parser``), for the
models that think between ``<think>`` and ``</think>`` (DeepSeek-R1 and its distills, Qwen3, QwQ):
the server splits each chat answer's text (``ReasoningSplitter``), and the engine holds a
request's structured output back until its thinking ends (``AnswerStart``); and for gpt-oss,
whose harmony format puts its thinking in an ``analysis`` channel (``HarmonySplitter``, read from
the tokens, whose framing ones the text leaves out) and its answer in the ``final`` one.

Whether the answer starts in thinking is read from the prompt: a chat template that opens
``<think>`` for the model (DeepSeek-R1's, Qwen3's thinking models') leaves the prompt's last tag
open; one that closes it (Qwen3 with ``enable_thinking=False``) or has none starts in the answer
(for the server's split, unless the model opens ``<think>`` itself before anything else). The
same splitter serves a stream and a whole answer, so both split alike; a tag cut between two
chunks is held back until it is whole."""

import re
from dataclasses import dataclass

from pagedllm.tool_calls import ToolCall, ToolCallSplitter, held_back, tool_call

START, END = "<think>", "</think>"
# vLLM's names of the parsers of <think>...</think>
THINK_PARSERS = ("deepseek_r1", "qwen3")
HARMONY = "openai_gptoss"  # gpt-oss's harmony format: its own for gpt-oss models, as in vLLM
REASONING_PARSERS = (*THINK_PARSERS, HARMONY)
# harmony's tokens: each message is <|start|>ROLE<|channel|>NAME<|message|>TEXT<|end|> (or <|return|>
# / <|call|> for the last); the prompt's generation prompt is <|start|>assistant
HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")
HARMONY_FINAL = "<|channel|>final<|message|>"  # what opens harmony's answer


def starts_thinking(prompt_text: str | None) -> bool:
    """Whether the prompt leaves a ``<think>`` open for the model to go on in."""
    return bool(prompt_text) and prompt_text.rfind(START) > prompt_text.rfind(END)


def _token_ids(tokenizer, tags: tuple[str, ...], parser: str) -> list[int]:
    """The ids of ``tags``, which the parser's models hold as tokens; a ValueError naming those this
    tokenizer lacks."""
    ids = [tokenizer.convert_tokens_to_ids(tag) if tokenizer is not None else None for tag in tags]
    unknown = (None, getattr(tokenizer, "unk_token_id", None))
    missing = [tag for tag, i in zip(tags, ids, strict=True) if i in unknown]
    if missing:
        raise ValueError(f"reasoning_parser={parser!r} reads {', '.join(tags)} as tokens of the model's tokenizer, "
                         f"and this one lacks {', '.join(missing)}")
    return ids


def thinking_token_ids(tokenizer, parser: str) -> tuple[int, int]:
    """The ids of ``<think>`` and ``</think>``."""
    start, end = _token_ids(tokenizer, (START, END), parser)
    return start, end


def thinking_at_start(prompt_token_ids: list[int], start_id: int, end_id: int) -> bool:
    """``starts_thinking`` on token ids: whether the prompt's last tag is an open ``<think>``."""
    for token in reversed(prompt_token_ids):
        if token in (start_id, end_id):
            return token == start_id
    return False


@dataclass(frozen=True)
class AnswerStart:
    """Where a reasoning model's answer starts, for its structured output: after ``tokens`` (the
    ``</think>`` token; harmony's ``<|channel|>final<|message|>``)."""

    tokens: tuple[int, ...]
    think_tags: tuple[int, int] | None  # <think> and </think>: the prompt says whether thinking comes first

    @classmethod
    def of(cls, tokenizer, parser: str) -> "AnswerStart":
        if parser == HARMONY:
            harmony_token_ids(tokenizer)
            return cls(tuple(tokenizer.encode(HARMONY_FINAL, add_special_tokens=False)), None)
        start, end = thinking_token_ids(tokenizer, parser)
        return cls((end,), (start, end))

    def awaited(self, prompt_token_ids: list[int]) -> tuple[int, ...] | None:
        """The tokens a request with this prompt must write before its answer; None: it starts there
        (a prompt that leaves no <think> open; one that ends in harmony's final channel)."""
        if self.think_tags is not None:
            return self.tokens if thinking_at_start(prompt_token_ids, *self.think_tags) else None
        return None if tuple(prompt_token_ids[-len(self.tokens):]) == self.tokens else self.tokens


@dataclass
class ReasoningSplitter:
    """One choice's text, fed as it comes: ``feed`` returns the new (reasoning, answer) text."""

    thinking: bool  # whether the prompt left a <think> open
    begun: bool = False  # whether anything but whitespace has come (a <think> only opens before that)
    held: str = ""  # text that may begin a tag, waiting for the next chunk

    def feed(self, text: str, token_ids: list[int] | None = None, last: bool = False) -> tuple[str | None, str | None]:
        """The reasoning and answer in ``text`` (``last``: the final chunk, nothing held back; the
        tokens are read by ``HarmonySplitter`` only)."""
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
            keep = 0 if last else held_back(text, END)
            reasoning.append(text[: len(text) - keep])
            self.held = text[len(text) - keep:]
            break
        return "".join(reasoning) or None, "".join(answer) or None

    def take_calls(self) -> list[ToolCall]:
        """Always none: only harmony's messages are tool calls (``HarmonySplitter``'s); asked of every
        splitter alike."""
        return []


class HarmonySplitter:
    """gpt-oss's output, read token by token: the text of its ``analysis`` channel is its
    reasoning, every other channel's (``final``, ``commentary``) its answer; the tokens that frame
    the messages are neither. With ``tool_calls``, a message to ``functions.NAME`` is a call of NAME
    with its text as the arguments, kept for ``take_calls`` (the ``openai`` tool parser's). ``feed``
    takes the text too, to be called as ``ReasoningSplitter``."""

    def __init__(self, tokenizer, tool_calls: bool = False):
        from pagedllm.engine.detokenizer import IncrementalDetokenizer

        self._new_detokenizer = lambda: IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self._decode_header = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        self._decode_text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        ids = harmony_token_ids(tokenizer)
        self._message, self._ends = ids["<|message|>"], {ids["<|end|>"], ids["<|return|>"], ids["<|call|>"]}
        self._header: list[int] = []  # the message's tokens before <|message|>
        self._body: list[int] | None = None  # its text's tokens, once <|message|> has come
        self._detokenizer = None
        self._reasoning = False  # the message is in the analysis channel
        self._read_calls = tool_calls
        self._function: str | None = None  # the function the message calls
        self._calls: list[ToolCall] = []  # complete calls not yet taken

    def feed(self, text: str, token_ids: list[int], last: bool = False) -> tuple[str | None, str | None]:
        reasoning, answer = [], []
        for token in token_ids:
            if self._body is None:
                if token == self._message:
                    header = self._decode_header(self._header)
                    channel = re.search(r"<\|channel\|>\s*([^\s<]+)", header)
                    function = re.search(r"\bto=functions\.([^\s<]+)", header) if self._read_calls else None
                    self._function = function.group(1) if function else None
                    self._reasoning = channel is not None and channel.group(1) == "analysis"
                    self._body, self._detokenizer = [], self._new_detokenizer()
                else:
                    self._header.append(token)
            elif token in self._ends:
                self._end_call(answer)
                self._header, self._body = [], None
            else:
                self._body.append(token)
                if self._function is None:
                    (reasoning if self._reasoning else answer).append(self._detokenizer.update(self._body))
        if last and self._body is not None:
            self._end_call(answer)  # a call cut off: kept where its arguments are whole
        if last and self._body is None and self._header:  # text the model wrote outside harmony's frame
            answer.append(self._decode_text(self._header))
            self._header = []
        return "".join(reasoning) or None, "".join(answer) or None

    def _end_call(self, answer: list[str]) -> None:
        """The message's call, once it ends; arguments that are no JSON object go to the answer as text."""
        if self._function is not None:
            text = self._decode_text(self._body)
            call = tool_call(self._function, text)
            if call is None:
                answer.append(text)
            else:
                self._calls.append(call)
            self._function = None

    def take_calls(self) -> list[ToolCall]:
        """The calls completed since last taken."""
        calls, self._calls = self._calls, []
        return calls


def harmony_token_ids(tokenizer) -> dict[str, int]:
    """The ids of harmony's tokens."""
    return dict(zip(HARMONY_TOKENS, _token_ids(tokenizer, HARMONY_TOKENS, HARMONY), strict=True))


def parser_for(parser: str | None, model_type: str, tokenizer) -> str | None:
    """The server's parser: the one asked for, else harmony's for a gpt-oss model whose tokenizer
    has its tokens (vLLM reads gpt-oss's answers through harmony whatever the flags)."""
    if parser is not None or model_type != "gpt_oss":
        return parser
    try:
        harmony_token_ids(tokenizer)
    except ValueError:
        return None
    return HARMONY


def reasoning_splitter(parser: str, tokenizer, prompt_text: str | None,
                       tool_calls: bool = False) -> "ReasoningSplitter | HarmonySplitter":
    """A splitter of one answer for ``parser`` (``tool_calls``: harmony's read calls too)."""
    if parser == HARMONY:
        return HarmonySplitter(tokenizer, tool_calls)
    return ReasoningSplitter(starts_thinking(prompt_text))


def split_answer(text: str, token_ids: list[int] | None, last: bool,
                 splitter: ReasoningSplitter | HarmonySplitter | None,
                 tools: ToolCallSplitter | None) -> tuple[str | None, str | None, list[ToolCall]]:
    """One choice's new text split three ways: its thinking (by ``splitter``, where the server splits
    it off), the rest, and the tool calls complete in it (by ``tools``, which takes the calls
    harmony's splitter read from the tokens too)."""
    thought, rest = splitter.feed(text, token_ids, last) if splitter is not None else (None, text)
    if tools is None:
        return thought, rest, []
    found = splitter.take_calls() if splitter is not None else []
    rest, calls = tools.feed(rest or "", last=last, found=found)
    return thought, rest, calls
