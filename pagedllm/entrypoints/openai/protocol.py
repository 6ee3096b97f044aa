"""Request and response bodies of the OpenAI API, as pydantic models (the fields pagedllm serves).

Requests are validated strictly, as OpenAI does: a number is not a string, a token id is not a
bool, and NaN or Infinity is no temperature. Unknown request fields are ignored, as OpenAI
clients send some we do not use. The bounds here are the ones the schema can state; the engine
checks the rest (the vocabulary, ``max_model_len``) and answers 400 as well.
"""

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from pydantic_core import to_json

from pagedllm.inputs import MAX_CACHE_SALT
from pagedllm.sampling_params import INT64_MAX, INT64_MIN, SamplingParams
from pagedllm.structured_outputs import StructuredOutputsParams

TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]

MAX_N = 1024  # samples per prompt: more than a batch holds (they wait their turn), not unbounded
# Sequences one request may start (prompts x samples): each costs the server memory and the event loop
# work from the moment it arrives, so one body of many small prompts must not take the server down.
MAX_REQUEST_SEQUENCES = 16384
# Messages in one conversation: more than a context holds (each takes a few tokens of the template at
# least); a body of 600,000 empty ones took 8 s to validate.
MAX_MESSAGES = 16384


def only_if_asked() -> Any:
    """A response field that is left out, not null, unless the request asked for it (vLLM's
    ``return_token_ids``): every other response keeps OpenAI's shape."""
    return Field(None, exclude_if=lambda value: value is None)


def prompt_type(prompt: object) -> str:
    """Which of a completion prompt's types a value is meant to be, from its first item: pydantic
    then validates it as that type alone. (As a plain union it tried every type, and a million
    prompts that fit none got an error for each item and type: 7.5 s.) The tags are the types'
    names, which error messages leave out of a field's path."""
    if isinstance(prompt, list) and prompt:
        return "list[str]" if isinstance(prompt[0], str) else "list[int]" if isinstance(prompt[0], int) \
            else "list[list[int]]"
    return "list[str]" if isinstance(prompt, list) else "str"


CompletionPrompt = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Field(max_length=MAX_REQUEST_SEQUENCES), Tag("list[str]")]
    | Annotated[list[TokenId], Tag("list[int]")]
    | Annotated[list[list[TokenId]], Field(max_length=MAX_REQUEST_SEQUENCES), Tag("list[list[int]]")],
    Discriminator(prompt_type)]
# Request fields that are SamplingParams fields of the same name and meaning.
_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "stop", "ignore_eos", "min_tokens", "skip_special_tokens",
                    "include_stop_str_in_output", "logit_bias", "allowed_token_ids", "bad_words",
                    "truncate_prompt_tokens", "spaces_between_special_tokens")


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(RequestBody):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class JsonSchemaFormat(RequestBody):
    name: str | None = None
    description: str | None = None
    json_schema: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestBody):
    """OpenAI's: free text, any JSON object, or JSON of a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class TopLevelBody(RequestBody):
    """A route's whole body: fields it does not take are kept aside (``model_extra``), for the server
    to say they were ignored (as vLLM does), not refused: clients send more than they need."""

    model_config = ConfigDict(extra="allow")


class SamplingFields(TopLevelBody):
    """What both endpoints take, OpenAI's fields and vLLM's extra ones."""

    model: str | None = None  # (vLLM's: none is the model served)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: taken, used for nothing here (as vLLM)
    # vLLM's extras
    top_k: int = Field(0, ge=-1, le=INT64_MAX)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=INT64_MAX)
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias in [-100, 100]
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=INT64_MAX)
    spaces_between_special_tokens: bool = True
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)  # prefixes shared within it only
    return_token_ids: bool = False  # vLLM's: the token ids beside the text (an RL rollout's exact tokens)
    # vLLM's, not served here: refused when asked for, rather than ignored
    use_beam_search: bool = False
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    response_format: ResponseFormat | None = None
    # vLLM's structured outputs: its own field, and the older guided_* ones
    structured_outputs: dict | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def structured_outputs_field(self) -> str:
        """The field the request's structured output came in, for an error to name."""
        given = [name for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None]
        return given[0] if len(given) == 1 and self.structured_outputs is None else "structured_outputs"

    def structured_outputs_spec(self) -> StructuredOutputsParams | dict | None:
        """The one constraint the request gives (a StructuredOutputsParams or its fields); None for free text."""
        specs = {}
        if self.response_format is not None:
            fmt = StructuredOutputsParams.from_response_format(self.response_format.model_dump(by_alias=True))
            if fmt is not None:
                specs["response_format"] = fmt
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                specs[name] = {kind: getattr(self, name)}
        if self.structured_outputs is not None:
            specs["structured_outputs"] = self.structured_outputs
        if len(specs) > 1:
            raise ValueError(f"give one of response_format, structured_outputs and guided_*, not {sorted(specs)}")
        return next(iter(specs.values()), None)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
                        defaults: dict | None = None, best_of: int | None = None) -> SamplingParams:
        """The request's SamplingParams; ``defaults`` (the model's generation config, as vLLM's
        server takes it) fill the sampling fields the request left out (max_tokens aside)."""
        given = {name: getattr(self, name) for name in _SAMPLING_FIELDS} | {
            "stop_token_ids": self.stop_token_ids or [], "max_tokens": max_tokens, "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs, "best_of": best_of,
            "structured_outputs": self.structured_outputs_spec()}
        omitted = {name: value for name, value in (defaults or {}).items()
                   if name not in self.model_fields_set and name != "max_tokens"}
        return SamplingParams(**given | omitted)


class CompletionRequest(SamplingFields):
    prompt: CompletionPrompt
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(None, ge=0, le=INT64_MAX)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="draw best_of, return the n most likely (no stream)")
    suffix: str | None = Field(None, description="not supported: refused (as vLLM refuses it), never ignored")
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS (or other special tokens) before a text prompt


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None  # OpenAI's participant name, for the template (others, e.g. tool calls, pass as given)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=INT64_MAX)
    add_generation_prompt: bool = True
    include_reasoning: bool = True  # vLLM's: with --reasoning-parser, false leaves the thinking out
    # vLLM's: the chat template's own arguments (Qwen3's enable_thinking), the last message left open
    chat_template_kwargs: dict | None = None
    continue_final_message: bool = False
    # Tools go to the chat template; the model's calls come back as tool_calls (pagedllm.tool_calls).
    # The legacy functions/function_call are refused rather than answered as plain chat.
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool = True  # false: one call at most
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    # vLLM's, refused (as vLLM refuses it without --trust-request-chat-template): a client's template
    # would run on the server, as long as it likes; the server's --chat-template sets the one used
    chat_template: str | None = Field(None, description="refused: start the server with --chat-template")


class TokenizeRequest(TopLevelBody):
    """vLLM's /tokenize: a ``prompt``, or chat ``messages`` rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(TopLevelBody):
    model: str | None = None
    tokens: list[TokenId]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # found in the prefix cache, not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # OpenAI's (vLLM's with --enable-prompt-tokens-details)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's ``prompt_logprobs`` entry: one token's logprob, rank and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = only_if_asked()
    token_ids: list[int] | None = only_if_asked()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object's text, as OpenAI's


class ToolCallInfo(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = only_if_asked()  # on the call's first chunk
    arguments: str


class DeltaToolCall(BaseModel):
    """A streamed call's part: a call read from the answer comes whole, in one chunk; a named
    function's call in pieces, its id, type and name with the first (OpenAI's and vLLM's)."""

    index: int  # the call's number in its choice
    id: str | None = only_if_asked()
    type: Literal["function"] | None = only_if_asked()
    function: DeltaFunctionCall


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    # with --reasoning-parser: the model's thinking (vLLM's field, and its older name, which clients still read)
    reasoning: str | None = only_if_asked()
    reasoning_content: str | None = only_if_asked()
    tool_calls: list[ToolCallInfo] | None = only_if_asked()  # where the model called tools


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | None = only_if_asked()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = only_if_asked()


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = only_if_asked()  # as ChatResponseMessage's
    reasoning_content: str | None = only_if_asked()
    tool_calls: list[DeltaToolCall] | None = only_if_asked()


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | None = only_if_asked()  # the chunk's own


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = only_if_asked()  # on the first chunk


class ChunkFrame:
    """A stream's chunks, which share their id, ``created`` and model (as OpenAI's do): the
    envelope is serialized once and each chunk's choices into it (half the time of a whole chunk
    model a token)."""

    def __init__(self, envelope: ChatCompletionChunk | CompletionResponse):
        self.created = envelope.created
        self.head, _, self.tail = envelope.model_dump_json().rpartition('"choices":[]')

    def __call__(self, choices: list[BaseModel], usage: Usage | None = None) -> str:
        return self._framed(",".join(c.model_dump_json() for c in choices), usage)

    def chat_text(self, index: int, text: str | None, finish_reason: str | None, usage: Usage | None = None) -> str:
        """A chat chunk of one choice's new text alone (no logprobs, thinking, calls or token ids):
        the JSON ``ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=...)``
        dumps, written out (pydantic's models took ~8 us a token, a tenth of the HTTP process's time
        for a plain stream)."""
        return self._framed(f'{{"index":{index},"delta":{{"role":null,"content":{to_json(text).decode()}}},'
                            f'"finish_reason":{to_json(finish_reason).decode()},"logprobs":null}}', usage)

    def completion_text(self, index: int, text: str, finish_reason: str | None, stop_reason: int | str | None,
                        usage: Usage | None = None) -> str:
        """``chat_text`` for a completion's chunk: ``CompletionChoice(index=index, text=text,
        finish_reason=..., stop_reason=...)``'s JSON."""
        return self._framed(f'{{"index":{index},"text":{to_json(text).decode()},"logprobs":null,"finish_reason":'
                            f'{to_json(finish_reason).decode()},"stop_reason":{to_json(stop_reason).decode()},'
                            '"prompt_logprobs":null}', usage)

    def _framed(self, choices: str, usage: Usage | None) -> str:
        tail = self.tail if usage is None else self.tail.replace('"usage":null', f'"usage":{usage.model_dump_json()}')
        return f'{self.head}"choices":[{choices}]{tail}'


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str  # vLLM's: the model it serves (directory or hub id), whatever name it is served under
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class VersionResponse(BaseModel):
    version: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
