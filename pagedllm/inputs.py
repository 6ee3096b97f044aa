"""Prompts into token ids, checked one way for ``LLM``, the server and ``pagedllm generate``:
text (not lone surrogates), token ids (ints, not bools), chat messages (roles and text content)."""

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.sampling_params import is_int


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = True) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the text holds {text[err.start:err.end]!r} at character {err.start}, which is not "
                         "valid Unicode (a lone surrogate)") from None
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def token_ids(prompt: Sequence) -> list[int]:
    """A prompt's token ids as Python ints (numpy's are welcome); a bool, a float or a string is an error."""
    if all(type(t) is int for t in prompt):  # the common case, fast (a bool's type is not int)
        return list(prompt)
    bad = [t for t in prompt if not is_int(t)]
    if bad:
        raise ValueError(f"token ids must be ints, not {bad[:5]}")
    return [int(t) for t in prompt]


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Any, chat_template: str | None = None,
                add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """A conversation's prompt text and token ids. ``messages`` is a list of ``{"role", "content"}``
    with text content: a string, or OpenAI's content parts of type "text"."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    plain = [{"role": _role(i, m), "content": _content(i, m)} for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja's errors, the template's own raise_exception, a missing template
        raise ValueError(f"cannot render the chat template: {err}") from None
    return text, encode_text(tokenizer, text, add_special_tokens=False)


def _role(index: int, message: Any) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"message {index} must be an object with a string \"role\", not {message!r:.80}")
    return message["role"]


def _content(index: int, message: dict) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"message {index}: content must be a string or a list of text parts")
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"message {index}, content part {k}: must be {{\"type\": \"text\", \"text\": "
                             f"string}} (this model takes text only), not {part!r:.80}")
        texts.append(part["text"])
    return "".join(texts)
