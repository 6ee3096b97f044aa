"""OpenAI's Responses API (``/v1/responses``), as vLLM serves it for a text model: the input (a
string, or messages) and ``instructions`` go through the chat template, the output is one
assistant message (after a reasoning item with the model's thinking, where the server splits it
off: ``reasoning_parser``), and its function calls as items of their own; sampling, ``text.format``
(structured output) and tools (``tool_calls``' parsers and forced calls) are chat's. Responses are
not stored, so ``previous_response_id`` and ``background`` are refused by name; a stream is
OpenAI's typed events (``response.created`` ... ``response.completed``)."""

import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from pagedllm.entrypoints.openai.errors import ApiError
from pagedllm.entrypoints.openai.logprobs import chat_logprobs
from pagedllm.entrypoints.openai.protocol import (
    INT64_MAX,
    MAX_MESSAGES,
    ChatMessage,
    RequestBody,
    TopLevelBody,
)
from pagedllm.inputs import MAX_CACHE_SALT
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.reasoning import split_answer
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_outputs import StructuredOutputsParams
from pagedllm.tool_calls import ToolCall, ToolCallSplitter

LOGPROBS = "message.output_text.logprobs"  # what include names to have them
# What OpenAI's include may name (its ResponseIncludable); only LOGPROBS applies to a text model's
# output, the rest name what this server never produces (tool results, images, reasoning)
Includable = Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                     "message.input_image.image_url", "computer_call_output.output.image_url",
                     "code_interpreter_call.outputs", "reasoning.encrypted_content", LOGPROBS]


class InputText(RequestBody):
    type: Literal["input_text", "output_text"]  # (a past assistant turn's text is output_text)
    text: str


class InputMessage(RequestBody):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]


class InputFunctionCall(RequestBody):
    """An earlier call of a function (the model's, from an earlier response)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class InputFunctionCallOutput(RequestBody):
    """What an earlier call returned."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


InputItem = Annotated[InputFunctionCall | InputFunctionCallOutput | InputMessage, Field(union_mode="left_to_right")]


class TextFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(RequestBody):
    format: TextFormat | None = None


class ResponsesRequest(TopLevelBody):
    model: str | None = None  # (vLLM's: none is the model served)
    input: str | Annotated[list[InputItem], Field(max_length=MAX_MESSAGES)]  # (a string: any length)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0)  # None: the model's generation config, else 1
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    text: TextConfig | None = None
    # Function tools ({"type": "function", "name", "parameters"}), as chat's: the calls come back as
    # function_call items ("auto" with the server's --tool-call-parser, or forced)
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool = True
    # Refused by name: this server keeps no responses, and runs none in the background.
    previous_response_id: str | None = None
    background: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)  # vLLM's: prefixes shared within it
    # each output token's logprob (and its top_logprobs alternatives) with include ["message.output_text.logprobs"]
    include: list[Includable] | None = Field(None, max_length=64)
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def format(self) -> TextFormat | None:
        return self.text.format if self.text is not None else None

    @property
    def logprobs(self) -> int | None:
        """The alternatives each output token's logprob comes with; None: no logprobs."""
        return (self.top_logprobs or 0) if LOGPROBS in (self.include or ()) else None

    def messages(self) -> list[ChatMessage]:
        """The conversation for the chat template: the instructions first, as a system message
        (a developer message is one too); earlier function calls as an assistant's tool calls (the
        calls in a row as one message's), their outputs as tool messages."""
        turns = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else []
        calls = None  # the tool calls of the last turn, where it is made of calls
        for item in [] if isinstance(self.input, str) else self.input:
            if isinstance(item, InputFunctionCall):
                if calls is None:
                    calls = []
                    turns.append({"role": "assistant", "content": None, "tool_calls": calls})
                calls.append({"id": item.call_id, "type": "function",
                              "function": {"name": item.name, "arguments": item.arguments}})
                continue
            calls = None
            if isinstance(item, InputFunctionCallOutput):
                turns.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:
                turns.append({"role": "system" if item.role == "developer" else item.role, "content": item.content
                              if isinstance(item.content, str) else "".join(part.text for part in item.content)})
        if self.instructions is not None:
            turns.insert(0, {"role": "system", "content": self.instructions})
        return [ChatMessage(**turn) for turn in turns]

    def chat_tools(self) -> list | None:
        """The tools as chat takes them: a function's fields under ``function``."""
        return None if self.tools is None else [
            {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
            if isinstance(t, dict) and t.get("type") == "function" and "function" not in t else t
            for t in self.tools]

    def chat_tool_choice(self) -> object:
        """The tool choice as chat takes it: a named function's name under ``function``."""
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
            return {"type": "function", "function": {"name": choice.get("name")}}
        return choice

    def sampling_params(self, defaults: dict) -> SamplingParams:
        """Temperature and top_p as given, else the model's generation config's (as chat's); the
        format as a structured output."""
        given = {name: value for name in ("temperature", "top_p") if (value := getattr(self, name)) is not None}
        fmt = self.format
        structured = None if fmt is None else StructuredOutputsParams.from_response_format(
            {"type": fmt.type, "json_schema": {"schema": fmt.json_schema}})
        return SamplingParams(**{name: value for name, value in defaults.items() if name != "max_tokens"} | given,
                              max_tokens=self.max_output_tokens, structured_outputs=structured,
                              logprobs=self.logprobs)

    def refused(self) -> None:
        """What this server does not do, named, rather than answered as if it were absent."""
        if self.previous_response_id is not None:
            raise ApiError(400, "previous_response_id: responses are not stored here; send the whole conversation "
                                "in input", "previous_response_id")
        if self.background:
            raise ApiError(400, "background responses are not supported: ask without background", "background")
        if self.format is not None and self.format.type == "json_schema" and self.format.json_schema is None:
            raise ApiError(400, "text.format of type json_schema needs its schema", "text")


# chat's shapes of a function tool and a named tool choice, and the Responses API's
_CHAT_SHAPES = {
    '{"type": "function", "function": {"name", "parameters"}}': '{"type": "function", "name", "parameters"}',
    '{"type": "function", "function": {"name": NAME}}': '{"type": "function", "name": NAME}',
    ".function.": ".",
}


def in_responses_terms(err: ApiError) -> ApiError:
    """A chat path's error named by the Responses API's fields: its messages and its one prompt are
    ``input``, its structured output is ``text``; tools are described as it writes them."""
    param = err.param if err.param not in ("messages", "prompt") else "input"
    if "SamplingParams.structured_outputs" in err.message:
        param = "text"
    message = err.message
    if param in ("tools", "tool_choice"):
        for chat, flat in _CHAT_SHAPES.items():
            message = message.replace(chat, flat)
    return ApiError(err.status, f"{param}: {message}" if param == "text" else message, param)


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = []
    logprobs: list = []


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(BaseModel):
    """The model's thinking (OpenAI's reasoning item, its text as open-weight models give it)."""

    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list = []
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


class FunctionCallItem(BaseModel):
    """A call of one of the request's functions."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    incomplete_details: dict | None = None
    error: dict | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[ReasoningItem | OutputMessage | FunctionCallItem]
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | dict = "none"
    tools: list[dict] = []
    text: dict
    metadata: dict = {}
    usage: ResponseUsage | None = None
    completed_at: int | None = None


class ResponseBuilder:
    """One response's objects as it goes: the same ids, times and settings in every event and at the end."""

    def __init__(self, body: ResponsesRequest, model: str, params: SamplingParams):
        self.top_logprobs = body.logprobs
        self.id, self.message_id, self.created_at = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", \
            int(time.time())
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"
        fmt = body.format
        self.fields = dict(instructions=body.instructions, max_output_tokens=body.max_output_tokens, model=model,
                           temperature=params.temperature, top_p=params.top_p, tools=body.tools or [],
                           tool_choice=body.tool_choice or ("auto" if body.tools else "none"),
                           parallel_tool_calls=body.parallel_tool_calls,
                           text={"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else
                                 {"type": "text"}})

    @staticmethod
    def function_call(call: ToolCall) -> FunctionCallItem:
        return FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=f"call_{uuid.uuid4().hex}", name=call.name,
                                arguments=call.arguments)

    def logprobs(self, completion: CompletionOutput) -> list[dict]:
        """The completion's tokens' logprobs, as chat gives them (each with its top alternatives)."""
        if self.top_logprobs is None:
            return []
        return [entry.model_dump() for entry in chat_logprobs(completion.logprobs, completion.token_ids,
                                                                self.top_logprobs).content]

    def message(self, text: str | None, finish_reason: str | None = None,
                logprobs: list | None = None) -> OutputMessage:
        """The output message: in progress without ``finish_reason``; ``text`` None: no part yet."""
        return OutputMessage(id=self.message_id, status=_status(finish_reason),
                             content=[] if text is None else [OutputText(text=text, logprobs=logprobs or [])])

    def reasoning(self, text: str | None, finish_reason: str | None = None) -> ReasoningItem:
        """The reasoning item, as ``message``."""
        return ReasoningItem(id=self.reasoning_id, status=_status(finish_reason),
                             content=[] if text is None else [ReasoningText(text=text)])

    def response(self, text: str | None = None, finish_reason: str | None = None, last: RequestOutput | None = None,
                 output_tokens: int = 0, logprobs: list | None = None, reasoning: str | None = None,
                 calls: list[FunctionCallItem] = (), order: list[str] | None = None) -> ResponseObject:
        """The response: in progress, or done (``last``: the request's last output, with
        ``output_tokens`` generated in all; ``reasoning``: its thinking, if split off; ``calls``: its
        function calls, after a message only where it has text; ``order``: the items' ids as a
        stream opened them)."""
        if last is None:
            return ResponseObject(id=self.id, created_at=self.created_at, status="in_progress", output=[],
                                  **self.fields)
        message = self.message(text, finish_reason, logprobs)
        thinking = [self.reasoning(reasoning, finish_reason)] if reasoning is not None else []
        items = [*thinking, *([message] if text or not calls else []), *calls]
        if order is not None:
            items.sort(key=lambda item: order.index(item.id) if item.id in order else len(order))
        prompt_tokens = len(last.prompt_token_ids)
        usage = ResponseUsage(input_tokens=prompt_tokens, output_tokens=output_tokens,
                              input_tokens_details=InputTokensDetails(cached_tokens=last.num_cached_tokens),
                              total_tokens=prompt_tokens + output_tokens)
        return ResponseObject(id=self.id, created_at=self.created_at, status=message.status,
                              output=items,
                              usage=usage, incomplete_details={"reason": "max_output_tokens"}
                              if message.status == "incomplete" else None, completed_at=int(time.time()),
                              **self.fields)


def _status(finish_reason: str | None) -> str:
    return "in_progress" if finish_reason is None else "incomplete" if finish_reason == "length" else "completed"


async def response_events(builder: ResponseBuilder, outputs: AsyncIterator[RequestOutput],
                          splitter=None, tools: ToolCallSplitter | None = None) -> AsyncIterator[str]:
    """OpenAI's typed stream events for one response, each ``event: TYPE`` and its JSON, numbered.
    ``outputs``: the request's delta outputs; ``splitter`` (a ``reasoning`` splitter): the model's
    thinking goes into a reasoning item of its own, opened at its first text, before the message;
    ``tools``: each function call the answer completes is an item of its own, sent whole (a
    named function's call as its arguments come)."""
    numbers = itertools.count()
    opened: dict[str, int] = {}  # item id -> its output index

    def event(kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": next(numbers)}
        payload |= {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in fields.items()}
        return f"event: {kind}\ndata: {json.dumps(payload)}"

    def where(item_id: str) -> dict:
        return {"item_id": item_id, "output_index": opened[item_id], "content_index": 0}

    def call_at(item: FunctionCallItem) -> dict:
        return {"item_id": item.id, "output_index": opened[item.id]}

    def call_done(item: FunctionCallItem) -> list[str]:
        return [event("response.function_call_arguments.done", arguments=item.arguments, **call_at(item)),
                event("response.output_item.done", output_index=opened[item.id], item=item)]

    def open_item(item, part) -> list[str]:
        opened[item.id] = len(opened)
        return [event("response.output_item.added", output_index=opened[item.id], item=item),
                event("response.content_part.added", part=part, **where(item.id))]

    yield event("response.created", response=builder.response())
    yield event("response.in_progress", response=builder.response())
    if splitter is None and tools is None:  # else the message opens at its first text (thinking or calls may come)
        for line in open_item(builder.message(None), OutputText(text="")):
            yield line
    texts, thoughts, tokens, last, logprobs, pending, calls = [], [], 0, None, [], [], []
    named = tools is not None and tools.mode == "named"  # its call streams in pieces, done at the end
    async for last in outputs:
        completion = last.outputs[0]
        finished = completion.finish_reason is not None
        tokens += len(completion.token_ids)
        pending += builder.logprobs(completion)  # (a token that completes no character waits for the next)
        thought, text, new_calls = split_answer(completion.text, completion.token_ids, finished, splitter, tools)
        if thought:
            if builder.reasoning_id not in opened:
                for line in open_item(builder.reasoning(None), ReasoningText(text="")):
                    yield line
            thoughts.append(thought)
            yield event("response.reasoning_text.delta", delta=thought, **where(builder.reasoning_id))
        if text:
            if builder.message_id not in opened:
                for line in open_item(builder.message(None), OutputText(text="")):
                    yield line
            texts.append(text)
            yield event("response.output_text.delta", delta=text, logprobs=pending, **where(builder.message_id))
            logprobs += pending
            pending = []
        for call in new_calls:
            if named and calls:  # the named call's next piece
                calls[0].arguments += call.arguments
                yield event("response.function_call_arguments.delta", delta=call.arguments, **call_at(calls[0]))
                continue
            item = builder.function_call(call)
            calls.append(item)
            opened[item.id] = len(opened)
            yield event("response.output_item.added", output_index=opened[item.id],
                        item=item.model_copy(update={"arguments": "", "status": "in_progress"}))
            yield event("response.function_call_arguments.delta", delta=item.arguments, **call_at(item))
            if not named:
                for line in call_done(item):
                    yield line
    if named and calls:
        for line in call_done(calls[0]):
            yield line
    text, reason, logprobs = "".join(texts), last.outputs[0].finish_reason, logprobs + pending
    thought = "".join(thoughts) if thoughts else None
    if thought is not None:
        at = where(builder.reasoning_id)
        yield event("response.reasoning_text.done", text=thought, **at)
        yield event("response.content_part.done", part=ReasoningText(text=thought), **at)
        yield event("response.output_item.done", output_index=at["output_index"],
                    item=builder.reasoning(thought, reason))
    if builder.message_id not in opened and not calls:  # (all thinking: an empty message still ends the response)
        for line in open_item(builder.message(None), OutputText(text="")):
            yield line
    if builder.message_id in opened:
        at = where(builder.message_id)
        yield event("response.output_text.done", text=text, logprobs=logprobs, **at)
        yield event("response.content_part.done", part=OutputText(text=text, logprobs=logprobs), **at)
        yield event("response.output_item.done", output_index=at["output_index"],
                    item=builder.message(text, reason, logprobs))
    done = builder.response(text, reason, last, tokens, logprobs, thought, calls, order=list(opened))
    yield event("response.completed" if done.status == "completed" else "response.incomplete", response=done)
