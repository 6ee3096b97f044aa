"""Prompts into token ids, checked one way for ``LLM``, ``AsyncLLM``, the server and ``pagedllm
generate``: text (not lone surrogates), token ids (ints, not bools), chat messages (roles and text
content). The prompt types are vLLM's."""

import json
from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict

from transformers import PreTrainedTokenizerBase

from pagedllm.sampling_params import is_int


class TextPrompt(TypedDict):
    prompt: str
    cache_salt: NotRequired[str]  # vLLM's: prefixes are shared only between prompts of the same salt


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]  # the text, for outputs, when the ids came from it
    cache_salt: NotRequired[str]


PromptType = str | list[int] | TextPrompt | TokensPrompt
# vLLM's prompt keys for inputs other than text: refused by name, where a prompt would run without them
UNSUPPORTED_PROMPT_KEYS = {"multi_modal_data": "multi-modal inputs", "mm_processor_kwargs": "multi-modal inputs",
                           "multi_modal_uuids": "multi-modal inputs", "prompt_embeds": "prompt embeddings"}


def parse_prompt(prompt: PromptType, tokenizer: PreTrainedTokenizerBase | None) -> tuple[str | None, list[int]]:
    """A prompt's text (None for bare token ids) and its token ids."""
    text, ids = _text_or_ids(prompt, tokenizer)
    return text, ids if ids is not None else tokenizer.encode(text)


ENCODE_BATCH = 1024  # texts a tokenizer call: their ids (and the tokenizer's own copies) are what it holds at once


def parse_prompts(prompts: list[PromptType], tokenizer: PreTrainedTokenizerBase | None
                  ) -> list[tuple[str | None, list[int]]]:
    """``parse_prompt`` of each, the texts tokenized a batch at a time: a fast tokenizer encodes a
    batch on every core, outside the GIL (``LLM.generate`` queued 200-word prompts at 0.42 ms each
    tokenized one at a time, 0.25 in batches, on a 2-core x86 CPU; more cores gain more). A bad
    prompt is a ValueError naming its index, before any is tokenized."""
    parsed = []
    for index, prompt in enumerate(prompts):
        try:
            parsed.append(_text_or_ids(prompt, tokenizer))
        except ValueError as err:
            raise ValueError(f"prompt {index}: {err}") from None
    texts = [index for index, (_, ids) in enumerate(parsed) if ids is None]
    for start in range(0, len(texts), ENCODE_BATCH):
        batch = texts[start:start + ENCODE_BATCH]
        encoded = tokenizer([parsed[i][0] for i in batch], return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
        for index, ids in zip(batch, encoded, strict=True):
            parsed[index] = parsed[index][0], ids
    return parsed


def _text_or_ids(prompt: PromptType, tokenizer: PreTrainedTokenizerBase | None) -> tuple[str | None, list[int] | None]:
    """A checked prompt's text and its token ids, None where the text is still to be tokenized."""
    if isinstance(prompt, dict):
        for key, what in UNSUPPORTED_PROMPT_KEYS.items():
            value = prompt.get(key)
            if value is not None and not (isinstance(value, (dict, list)) and not value):  # None, {} or []: none
                raise ValueError(f"the prompt's {key!r} is not supported: pagedllm runs text models, and {what} "
                                 "are not read (give text or token ids)")
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), token_ids(prompt["prompt_token_ids"])
        if "prompt" not in prompt:
            raise ValueError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: give prompts as token ids")
        check_text(prompt)
        return prompt, None
    if isinstance(prompt, (list, tuple)):
        return None, token_ids(prompt)
    raise ValueError(f"a prompt must be a str, a list of token ids or a dict, not {type(prompt).__name__}")


MAX_CACHE_SALT = 4096  # characters: a tenant's name or secret; the engine's thread hashes it for the request


def cache_salt(prompt: PromptType) -> str | None:
    """A prompt's ``cache_salt`` (vLLM's): its cached prefix blocks are shared only with prompts of
    the same salt, so that tenants of one server cannot learn each other's prompts from how fast
    theirs start (a prefix cache hit is faster)."""
    return checked_cache_salt(prompt.get("cache_salt") if isinstance(prompt, dict) else None)


def checked_cache_salt(salt: object) -> str | None:
    """``salt`` if it is one (a string of text, not too long), else a ValueError naming it."""
    if salt is None:
        return None
    try:
        valid = isinstance(salt, str) and 0 < len(salt) <= MAX_CACHE_SALT and salt.encode("utf-8") != b""
    except UnicodeEncodeError:  # a lone surrogate
        valid = False
    if not valid:
        raise ValueError(f"cache_salt={salt!r:.80} is invalid: it must be a string of text of 1 to {MAX_CACHE_SALT} "
                         "characters, or absent")
    return salt


def as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt or a list of them, told apart the way vLLM does."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):  # (a sequence of ints: it ran as those token ids)
        raise ValueError(f"prompts must be text, not {type(prompts).__name__}: decode them first")
    if not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a prompt or a list of them, not {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = True) -> list[int]:
    check_text(text)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_text(text: str) -> None:
    """A ValueError naming a lone surrogate (text no tokenizer can take) and where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the text holds {text[err.start:err.end]!r} at character {err.start}, which is not "
                         "valid Unicode (a lone surrogate)") from None


def token_ids(prompt: Sequence) -> list[int]:
    """A prompt's token ids as Python ints (numpy's are welcome); a bool, a float or a string is an error."""
    if set(map(type, prompt)) <= {int}:  # the common case, fast (a bool's type is not int)
        return list(prompt)
    bad = [t for t in prompt if not is_int(t)]
    if bad:
        raise ValueError(f"token ids must be ints, not {bad[:5]}")
    return [int(t) for t in prompt]


CONTENT_FORMATS = ("auto", "string", "openai")


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Any, chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
                content_format: str = "auto") -> tuple[str, list[int]]:
    """A conversation's prompt text and token ids. ``messages`` is a list of ``{"role", "content"}``
    with text content: a string, or OpenAI's content parts of type "text". ``tools`` and
    ``chat_template_kwargs`` (Qwen3's ``enable_thinking``, say) go to the template;
    ``continue_final_message`` leaves the last message open for the model to go on with. The
    template sees each content as one string, or with ``content_format="openai"`` as a list of
    ``{"type": "text", "text"}`` parts (vLLM's ``chat_template_content_format``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {\"role\", \"content\"} objects")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set: either the last "
                         "message goes on, or the assistant's turn starts")
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"chat_template_content_format={content_format!r:.100} is invalid: it must be one of "
                         f"{CONTENT_FORMATS}")
    plain = [{**_extra_fields(m), "role": _role(i, m), "content": _content(i, m, content_format)}
             for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, chat_template=chat_template, tools=tools,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             **(chat_template_kwargs or {}))
    except Exception as err:  # jinja's errors, the template's own raise_exception, a missing template
        raise ValueError(f"cannot render the chat template: {err}") from None
    return text, encode_text(tokenizer, text, add_special_tokens=False)


def _extra_fields(message: Any) -> dict:
    """What a message carries beside role and content (tool calls, a name) for the template; an
    assistant's earlier thinking under either of its names, ``reasoning`` (vLLM's) or
    ``reasoning_content`` (the older one, which Qwen3's and DeepSeek's templates read), under both."""
    if not isinstance(message, dict):
        return {}
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    if isinstance(extra.get("tool_calls"), list):
        extra["tool_calls"] = [_template_tool_call(call) for call in extra["tool_calls"]]
    thinking = extra.get("reasoning", extra.get("reasoning_content"))
    if thinking is not None:
        extra.setdefault("reasoning", thinking)
        extra.setdefault("reasoning_content", thinking)
    return extra


def _template_tool_call(call: Any) -> Any:
    """An earlier tool call with its arguments as a dict where they are a JSON object's text, as
    OpenAI sends them: templates write them out as JSON (Qwen's ``arguments | tojson``), which would
    quote the text again (vLLM hands them over parsed too)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}} if isinstance(arguments, dict) else call


def _role(index: int, message: Any) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValueError(f"message {index} must be an object with a string \"role\", not {message!r:.80}")
    return message["role"]


def _content(index: int, message: dict, content_format: str) -> str | list[dict]:
    """The message's text: one string, or with the "openai" format its text parts (a string content
    is one part)."""
    if "content" not in message and not message.get("tool_calls"):
        raise ValueError(f"message {index} has no content")
    content = message.get("content")
    if content is None or isinstance(content, str):
        texts = [] if content is None else [content]
    elif not isinstance(content, list):
        raise ValueError(f"message {index}: content must be a string or a list of text parts")
    else:
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"message {index}, content part {k}: must be {{\"type\": \"text\", \"text\": "
                                 f"string}} (this model takes text only), not {part!r:.80}")
            texts.append(part["text"])
    if content_format == "openai":
        return [{"type": "text", "text": text} for text in texts]
    return "".join(texts)
