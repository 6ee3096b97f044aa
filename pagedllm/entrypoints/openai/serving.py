"""What the routes do: bodies into engine requests, engine outputs into OpenAI responses and
server-sent events. Tokenizing and chat templates run in worker threads, so that a huge prompt
never stalls the event loop (and every other client with it)."""

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.outputs import add_completion_delta
from pagedllm.entrypoints.openai.errors import ApiError, bad_value
from pagedllm.entrypoints.openai.logprobs import add_completion_logprobs, chat_logprobs, vllm_prompt_logprobs
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    MAX_REQUEST_SEQUENCES,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    ChunkFrame,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCall,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    ToolCallInfo,
    Usage,
    prompt_type,
    random_id,
)
from pagedllm.entrypoints.openai.responses import (
    ResponseBuilder,
    ResponsesRequest,
    in_responses_terms,
    response_events,
)
from pagedllm.entrypoints.openai.streams import event_stream, merge, until_done_or_disconnect
from pagedllm.inputs import TokensPrompt, checked_cache_salt, encode_text, render_chat
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.reasoning import (
    HARMONY,
    HarmonySplitter,
    ReasoningSplitter,
    parser_for,
    reasoning_splitter,
    split_answer,
)
from pagedllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from pagedllm.tool_calls import ToolCall, ToolCallSplitter, ToolUse, needs_special_tokens, tool_use

logger = logging.getLogger("pagedllm")
Prompt = tuple[str | None, list[int]]  # text (None for token ids) and token ids


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, model_names: list[str], chat_template: str | None, metrics: ServerMetrics,
                 args: argparse.Namespace):
        self.engine = engine
        self.model_names = model_names  # a request may name any; responses carry the first
        self.model_name = model_names[0]
        self.chat_template = chat_template
        self.content_format = args.chat_template_content_format  # how the template sees each message's content
        self.metrics = metrics
        # None: a model's thinking stays in its content
        self.reasoning_parser = parser_for(args.reasoning_parser, engine.config.hf_config.model_type, engine.tokenizer)
        self.tool_parser = args.tool_call_parser if args.enable_auto_tool_choice else None  # for tool_choice "auto"
        if self.tool_parser == "openai":  # gpt-oss's calls are harmony messages, read by its splitter
            self.reasoning_parser = HARMONY
        self.log_requests = args.enable_log_requests
        self.max_log_len = args.max_log_len

    # routes

    async def completions(self, body: CompletionRequest, raw: Request):
        self._check_model(body.model)
        echo_only = body.echo and body.max_tokens == 0  # score the prompt, generate nothing (lm-eval)
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens=0 is only valid with echo (to score the prompt)", "max_tokens")
        prompt_logprobs = body.prompt_logprobs
        if body.echo and body.logprobs is not None:  # the echoed prompt's tokens are scored too
            prompt_logprobs = max(prompt_logprobs or 0, body.logprobs)
        if body.suffix is not None:
            raise ApiError(400, "suffix (text to insert before) is not supported", "suffix")
        if body.stream and body.best_of is not None and body.best_of > body.n:
            raise ApiError(400, "best_of cannot be streamed: the best samples are known only at the end", "best_of")
        params = await self._params(body, 1 if echo_only else body.max_tokens, body.logprobs, prompt_logprobs,
                                    body.best_of)
        num_prompts = 1 if prompt_type(body.prompt) in ("str", "list[int]") else len(body.prompt)
        if num_prompts * params.samples > MAX_REQUEST_SEQUENCES:
            raise ApiError(400, f"{num_prompts} prompts x {params.samples} samples is more than the "
                                f"{MAX_REQUEST_SEQUENCES} sequences one request may start: send them in several "
                                "requests (they run together)", "prompt")
        # the n best are known only at the end; else what is new (a response is summed up as it comes)
        params.output_kind = RequestOutputKind.FINAL_ONLY if params.samples > params.n else RequestOutputKind.DELTA
        prompts = await asyncio.to_thread(self._completion_prompts, body.prompt, body.add_special_tokens)
        request_id = random_id("cmpl")
        streams = await self._start(request_id, prompts, params, body.cache_salt,
                                    ("prompt", body.structured_outputs_field))
        if body.stream:
            return event_stream(self._completion_events(request_id, body, prompts, streams, echo_only))
        finals = await until_done_or_disconnect(raw, streams)
        if finals is None:
            return Response(status_code=499)  # the client left; its requests were aborted

        def response() -> CompletionResponse:
            choices = [self._completion_choice(i * body.n + c.index, body, prompt, final, c, echo_only)
                       for i, (prompt, final) in enumerate(zip(prompts, finals, strict=True)) for c in final.outputs]
            return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=_usage(finals, echo_only))

        return await json_response_off_the_loop(response)

    async def chat(self, body: ChatCompletionRequest, raw: Request):
        self._check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        for legacy in ("functions", "function_call"):
            if getattr(body, legacy) is not None:
                raise ApiError(400, f"{legacy} (OpenAI's legacy function calling) is not supported", legacy)
        if body.chat_template is not None:
            raise ApiError(400, "chat_template in a request is not accepted: a client's template would run on the "
                                "server (vLLM also refuses it unless trusted); the server's --chat-template sets it",
                           "chat_template")
        try:
            tools = tool_use(body.tools, body.tool_choice, self.tool_parser, body.parallel_tool_calls)
        except ValueError as err:
            raise ApiError(400, *err.args) from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = await self._params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None,
                                    body.prompt_logprobs)
        params.output_kind = RequestOutputKind.DELTA
        if tools is not None:
            self._use_tools(tools, params)
        prompt = await asyncio.to_thread(self._chat_prompt, body.messages, body.add_generation_prompt,
                                         body.continue_final_message, body.tools, body.chat_template_kwargs)
        request_id = random_id("chatcmpl")
        streams = await self._start(request_id, [prompt], params, body.cache_salt,
                                    ("messages", "tools" if tools and tools.schema else body.structured_outputs_field))
        if body.stream:
            return event_stream(self._chat_events(request_id, body, prompt, streams, tools))
        finals = await until_done_or_disconnect(raw, streams)
        if finals is None:
            return Response(status_code=499)
        k = body.top_logprobs or 0

        ids = body.return_token_ids

        def choice(c: CompletionOutput) -> ChatChoice:
            message = self._message(body, prompt[0], c, tools)
            finish = tools.finish_reason(bool(message.tool_calls), c.finish_reason) if tools else c.finish_reason
            return ChatChoice(index=c.index, message=message, finish_reason=finish,
                              logprobs=chat_logprobs(c.logprobs, c.token_ids, k),
                              token_ids=c.token_ids if ids else None)

        def response() -> ChatCompletionResponse:
            choices = [choice(c) for c in finals[0].outputs]
            return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=_usage(finals),
                                          prompt_token_ids=finals[0].prompt_token_ids if ids else None)

        return await json_response_off_the_loop(response)

    async def responses(self, body: ResponsesRequest, raw: Request):
        """OpenAI's Responses API over the chat path (``responses``)."""
        self._check_model(body.model)
        body.refused()
        try:
            tools = tool_use(body.chat_tools(), body.chat_tool_choice(), self.tool_parser, body.parallel_tool_calls)
        except ValueError as err:
            raise in_responses_terms(ApiError(400, *err.args)) from None
        try:
            params = body.sampling_params(self.engine.engine.default_sampling_fields)
        except ValueError as err:
            raise in_responses_terms(bad_value(err)) from None
        params.output_kind = RequestOutputKind.DELTA
        if tools is not None:
            try:
                self._use_tools(tools, params)
            except ApiError as err:
                raise in_responses_terms(err) from None
        builder = ResponseBuilder(body, self.model_name, params)
        try:
            prompt = await asyncio.to_thread(self._chat_prompt, body.messages(), True, False, body.chat_tools())
            streams = await self._start(builder.id, [prompt], params, body.cache_salt,
                                        ("input", "tools" if tools and tools.schema else "text"))
        except ApiError as err:
            raise in_responses_terms(err) from None
        splitter = self._splitter(prompt[0], tools) if self.reasoning_parser else None
        if body.stream:
            return event_stream(response_events(builder, (output async for _, output in merge(streams)), splitter,
                                                tools.splitter() if tools else None), typed=True)
        finals = await until_done_or_disconnect(raw, streams)
        if finals is None:
            return Response(status_code=499)
        completion = finals[0].outputs[0]
        reasoning, text, calls = split_answer(completion.text, completion.token_ids, True, splitter,
                                              tools.splitter() if tools is not None else None)
        return await json_response_off_the_loop(lambda: builder.response(
            text or "", completion.finish_reason, finals[0], len(completion.token_ids),
            builder.logprobs(completion), reasoning, [builder.function_call(call) for call in calls]))

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self._check_model(body.model)
        if (body.messages is None) == (body.prompt is None):
            raise ApiError(400, "give either prompt or messages", "prompt")

        def encode() -> list[int]:
            if body.messages is not None:
                return self._chat_prompt(body.messages, body.add_generation_prompt)[1]
            return self._encode(body.prompt, "prompt", body.add_special_tokens)

        ids = await asyncio.to_thread(encode)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.engine.config.max_model_len)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(body.model)
        tokenizer = self._tokenizer()
        vocab_size = max(self.engine.config.hf_config.vocab_size, len(tokenizer))
        bad = [t for t in body.tokens if t >= vocab_size]
        if bad:
            raise ApiError(400, f"tokens outside the vocabulary [0, {vocab_size}): {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))

    # requests

    def _tokenizer(self):
        if self.engine.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids")
        return self.engine.tokenizer

    def _check_model(self, model: str | None) -> None:
        """A request may name any served model, or none (as vLLM takes it)."""
        if model is not None and model not in self.model_names:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                                f"{' or '.join(f'`{name}`' for name in self.model_names)}", "model")

    async def _params(self, body, max_tokens, logprobs, prompt_logprobs, best_of=None):
        """The body's SamplingParams; checking thousands of values (a logit_bias of the whole vocabulary:
        ~0.2 s) in a worker thread, lest every other client wait."""
        values = sum(len(v) for v in (body.stop, body.stop_token_ids, body.logit_bias, body.allowed_token_ids,
                                      body.bad_words) if isinstance(v, (list, dict)))
        args = (body, max_tokens, logprobs, prompt_logprobs, best_of)
        return await asyncio.to_thread(self._make_params, *args) if values > 1024 else self._make_params(*args)

    def _make_params(self, body, max_tokens, logprobs, prompt_logprobs, best_of):
        if body.use_beam_search:
            raise ApiError(400, "use_beam_search is not served (offline, LLM.beam_search is)", "use_beam_search")
        if body.priority:
            raise ApiError(400, "priority scheduling is not supported: requests are served first come, first "
                                "served (priority 0)", "priority")
        try:
            return body.sampling_params(max_tokens, logprobs, prompt_logprobs,
                                        self.engine.engine.default_sampling_fields, best_of)
        except ValueError as err:
            raise bad_value(err, structured_field=body.structured_outputs_field) from None

    def _encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return encode_text(self._tokenizer(), text, add_special_tokens)
        except ValueError as err:
            raise ApiError(400, f"{field}: {err}", field) from None

    def _completion_prompts(self, prompt, add_special_tokens: bool = True) -> list[Prompt]:
        if prompt_type(prompt) in ("str", "list[int]"):  # one prompt
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        return [(p, self._encode(p, "prompt", add_special_tokens)) if isinstance(p, str) else (None, list(p))
                for p in prompt]

    def _chat_prompt(self, messages, add_generation_prompt: bool, continue_final_message: bool = False,
                     tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> Prompt:
        plain = [m.model_dump(exclude_none=True) for m in messages]
        try:
            return render_chat(self._tokenizer(), plain, self.chat_template, add_generation_prompt,
                               continue_final_message, tools, chat_template_kwargs, self.content_format)
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None

    async def _start(self, request_id: str, prompts: list[Prompt], params, salt: str | None = None,
                     named: tuple[str, str] = ("prompt", "structured_outputs")) -> list[AsyncIterator[RequestOutput]]:
        """Check every prompt, then start one engine request each (nothing starts if one is bad).
        A structured output's check compiles its grammar, which may take seconds, and thousands of
        prompts, or a million tokens, take a while too: not on the event loop. ``salt``: the
        request's ``cache_salt``; ``named``: the request's fields its prompts and its structured
        output came in, for an error to name."""
        try:
            checked_cache_salt(salt)
        except ValueError as err:
            raise ApiError(400, str(err), "cache_salt") from None
        if params.structured_outputs is not None or len(prompts) > 1 or len(prompts[0][1]) > 16384:
            await asyncio.to_thread(self._check, prompts, params, named)
        else:
            self._check(prompts, params, named)
        if self.log_requests:  # cut: a client's values (stop strings, logit biases) may be as long as its body
            line = f"request {request_id}: {[len(ids) for _, ids in prompts]} prompt tokens, {params!r}"
            logger.info("%s", line if len(line) <= self.max_log_len else line[:self.max_log_len] + "...")
        prompts = [TokensPrompt(prompt_token_ids=ids) | ({"prompt": text} if text else {}) |
                   ({"cache_salt": salt} if salt else {}) for text, ids in prompts]
        delta = params.output_kind == RequestOutputKind.DELTA
        return [self._observed(self.engine.generate(prompt, params, f"{request_id}-{i}"), delta)
                for i, prompt in enumerate(prompts)]

    def _check(self, prompts: list[Prompt], params, named: tuple[str, str]) -> None:
        for index, (_, token_ids) in enumerate(prompts):
            try:
                self.engine.validate(token_ids, params)
            except ValueError as err:
                raise bad_value(err, index, *named) from None

    async def _observed(self, stream: AsyncIterator[RequestOutput], delta: bool) -> AsyncIterator[RequestOutput]:
        """The stream, its latencies and its end observed for /metrics."""
        arrival, token_times, last, generated = time.monotonic(), [], None, 0
        try:
            async for output in stream:
                token_times.append(time.monotonic())
                last = output
                new = sum(len(c.token_ids) for c in output.outputs)
                generated = generated + new if delta else new
                yield output
        finally:
            self.metrics.observe_request(arrival, token_times, last, generated)
            await stream.aclose()

    # responses

    def _completion_choice(self, index: int, body: CompletionRequest, prompt: Prompt, final: RequestOutput,
                           completion: CompletionOutput, echo_only: bool) -> CompletionChoice:
        text, token_ids, entries = completion.text, completion.token_ids, completion.logprobs
        if echo_only:
            text, token_ids, entries = "", [], []
        prompt_text = ""
        if body.echo:
            prompt_text = prompt[0] if prompt[0] is not None else self._tokenizer().decode(final.prompt_token_ids)
        logprobs = None
        if body.logprobs is not None:
            logprobs = CompletionLogprobs()
            if body.echo:
                add_completion_logprobs(logprobs, final.prompt_token_ids, final.prompt_logprobs,
                                        self._first_token_text(final), 0)
            add_completion_logprobs(logprobs, token_ids, entries, None, len(prompt_text))
        scored_prompt = vllm_prompt_logprobs(final) if body.prompt_logprobs is not None else None
        ids = body.return_token_ids
        return CompletionChoice(index=index, text=prompt_text + text, logprobs=logprobs,
                                finish_reason="length" if echo_only else completion.finish_reason,
                                stop_reason=None if echo_only else completion.stop_reason,
                                prompt_logprobs=scored_prompt, prompt_token_ids=final.prompt_token_ids if ids else None,
                                token_ids=list(token_ids) if ids else None)

    def _first_token_text(self, final: RequestOutput) -> str:
        """The text of the prompt's first token, which nothing scores."""
        tokenizer = self.engine.tokenizer
        return tokenizer.decode(final.prompt_token_ids[:1]) if tokenizer is not None else ""

    async def _completion_events(self, request_id, body: CompletionRequest, prompts: list[Prompt], streams,
                                 echo_only: bool) -> AsyncIterator[str]:
        frame = ChunkFrame(CompletionResponse(id=request_id, model=self.model_name, choices=[]))
        deltas, continuous = _Deltas(), _continuous_usage(body)

        def chunk(choices):  # with the usage so far where the client asked for it on every chunk
            return frame(choices, deltas.usage(echo_only) if continuous else None)

        echoed: set[tuple[int, int]] = set()
        ids_sent: set[tuple[int, int]] = set()  # choices whose prompt token ids went (return_token_ids)
        sent_chars: dict[tuple[int, int], int] = {}  # text sent, for the logprobs' offsets
        async for prompt_index, output in merge(streams):
            if body.echo:
                for c in output.outputs:
                    if (prompt_index, c.index) not in echoed:
                        echoed.add((prompt_index, c.index))
                        choice = self._completion_choice(prompt_index * body.n + c.index, body, prompts[prompt_index],
                                                         output, c, echo_only=True)
                        choice.finish_reason = choice.stop_reason = None
                        sent_chars[prompt_index, c.index] = len(choice.text)  # offsets go on after the prompt
                        yield chunk([choice])
            for c in deltas.ready(prompt_index, output):
                index, key = prompt_index * body.n + c.index, (prompt_index, c.index)
                if echo_only:
                    if c.finish_reason:
                        yield chunk([CompletionChoice(index=index, text="", finish_reason="length")])
                    continue
                if body.logprobs is None and not body.return_token_ids:  # text is all the chunk holds
                    yield frame.completion_text(index, c.text, c.finish_reason, c.stop_reason,
                                                deltas.usage(echo_only) if continuous else None)
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = CompletionLogprobs()
                    add_completion_logprobs(logprobs, c.token_ids, c.logprobs, None, sent_chars.get(key, 0))
                sent_chars[key] = sent_chars.get(key, 0) + len(c.text)
                id_fields = {}
                if body.return_token_ids:  # the prompt's with a choice's first chunk, then each chunk's own
                    id_fields = {"token_ids": c.token_ids} | ({} if key in ids_sent else
                                                             {"prompt_token_ids": prompts[prompt_index][1]})
                    ids_sent.add(key)
                yield chunk([CompletionChoice(index=index, text=c.text, logprobs=logprobs,
                                              finish_reason=c.finish_reason, stop_reason=c.stop_reason, **id_fields)])
        if body.stream_options and body.stream_options.include_usage:
            yield CompletionResponse(id=request_id, model=self.model_name, created=frame.created, choices=[],
                                     usage=deltas.usage(echo_only)).model_dump_json()

    def _splitter(self, prompt_text: str | None, tools: ToolUse | None = None) -> ReasoningSplitter | HarmonySplitter:
        harmony_calls = tools is not None and tools.choice == "auto" and tools.parser == "openai"
        return reasoning_splitter(self.reasoning_parser, self.engine.tokenizer, prompt_text, harmony_calls)

    def _use_tools(self, tools: ToolUse, params) -> None:
        """A forced call's structured output (its JSON schema), or for the model's own calls its tags
        kept in the text where they are special tokens (as vLLM's parsers ask)."""
        if tools.schema is not None:
            if params.structured_outputs is not None:
                raise ApiError(400, f'tool_choice "{tools.choice}" forces the answer\'s form: give no structured '
                                    "output beside it (response_format, structured_outputs, guided_*; text.format "
                                    "on /v1/responses)", "tool_choice")
            try:
                # compact JSON: whitespace anywhere is a loop a model can fall into (a tiny one did, to max_tokens)
                params.structured_outputs = StructuredOutputsParams(json=tools.schema, disable_any_whitespace=True)
            except ValueError as err:
                raise ApiError(400, f"tools: a function's parameters: {err}", "tools") from None
        elif needs_special_tokens(self.engine.tokenizer, tools.parser):
            params.skip_special_tokens = False

    def _message(self, body: ChatCompletionRequest, prompt_text: str | None, c: CompletionOutput,
                 tools: ToolUse | None) -> ChatResponseMessage:
        """A whole answer, its thinking and its tool calls apart where the server splits them off."""
        splitter = self._splitter(prompt_text, tools) if self.reasoning_parser is not None else None
        reasoning, content, calls = split_answer(c.text, c.token_ids, True, splitter,
                                                 tools.splitter() if tools is not None else None)
        reasoning = reasoning if body.include_reasoning else None
        if tools is not None:
            content = content if content and (content.strip() or not calls) else None
        return ChatResponseMessage(content=content, reasoning=reasoning, reasoning_content=reasoning,
                                   tool_calls=[_call_info(call) for call in calls] if calls else None)

    def _delta(self, body: ChatCompletionRequest, splitters: dict[int, ReasoningSplitter | HarmonySplitter] | None,
               tool_splitters: dict[int, ToolCallSplitter] | None, c: CompletionOutput) -> ChatDelta:
        """A chunk's new text, its thinking and its completed tool calls (a named call's next piece)
        apart where the server splits them off."""
        tool_splitter = tool_splitters[c.index] if tool_splitters is not None else None
        before = len(tool_splitter.calls) if tool_splitter is not None else 0
        reasoning, content, new = split_answer(c.text or "", c.token_ids, c.finish_reason is not None,
                                               splitters[c.index] if splitters is not None else None, tool_splitter)
        reasoning = reasoning if body.include_reasoning else None
        if tool_splitter is not None and tool_splitter.mode == "named":  # call 0's next piece, named on its first
            calls = [_delta_call(call, 0, before == 0) for call in new]
        else:
            calls = [_delta_call(call, before + i, True) for i, call in enumerate(new)]
        return ChatDelta(content=content or None, reasoning=reasoning, reasoning_content=reasoning,
                         tool_calls=calls or None)

    async def _chat_events(self, request_id, body: ChatCompletionRequest, prompt: Prompt, streams,
                           tools: ToolUse | None) -> AsyncIterator[str]:
        prompt_text, prompt_token_ids = prompt
        frame = ChunkFrame(ChatCompletionChunk(id=request_id, model=self.model_name, choices=[]))
        deltas, continuous = _Deltas(), _continuous_usage(body)
        deltas.prompt_tokens[0] = len(prompt_token_ids)
        splitters = None if self.reasoning_parser is None else {i: self._splitter(prompt_text, tools)
                                                                for i in range(body.n)}
        tool_splitters = None if tools is None else {i: tools.splitter() for i in range(body.n)}

        def chunk(choices):  # with the usage so far where the client asked for it on every chunk
            return frame(choices, deltas.usage() if continuous else None)

        roles = [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(body.n)]
        if body.return_token_ids:  # the prompt's token ids with the first chunk
            yield ChatCompletionChunk(id=request_id, model=self.model_name, created=frame.created, choices=roles,
                                      usage=deltas.usage() if continuous else None,
                                      prompt_token_ids=prompt_token_ids).model_dump_json()
        else:
            yield chunk(roles)
        plain = splitters is None and tools is None and not body.return_token_ids  # text is all a chunk holds
        async for _, output in merge(streams):
            for c in deltas.ready(0, output):
                if plain and c.logprobs is None:
                    if c.text or c.finish_reason is not None:  # (else a token whose text is not out yet)
                        yield frame.chat_text(c.index, c.text or None, c.finish_reason,
                                              deltas.usage() if continuous else None)
                    continue
                logprobs = None if c.logprobs is None else chat_logprobs(c.logprobs, c.token_ids,
                                                                          body.top_logprobs or 0)
                delta = self._delta(body, splitters, tool_splitters, c)
                finish = c.finish_reason if tools is None else \
                    tools.finish_reason(bool(tool_splitters[c.index].calls), c.finish_reason)
                if delta == ChatDelta() and finish is None and logprobs is None and not body.return_token_ids:
                    continue  # nothing to send yet: text held back (a tag cut off, forced calls not yet whole)
                yield chunk([ChatChunkChoice(index=c.index, delta=delta, finish_reason=finish, logprobs=logprobs,
                                             token_ids=c.token_ids if body.return_token_ids else None)])
        if body.stream_options and body.stream_options.include_usage and deltas.prompt_tokens:
            yield ChatCompletionChunk(id=request_id, model=self.model_name, created=frame.created, choices=[],
                                      usage=deltas.usage()).model_dump_json()


def _call_info(call: ToolCall) -> ToolCallInfo:
    return ToolCallInfo(id=random_id("chatcmpl-tool"), function=FunctionCall(name=call.name, arguments=call.arguments))


def _delta_call(call: ToolCall, index: int, first: bool) -> DeltaToolCall:
    """A call's chunk: whole, or a named call's piece, its id and name on the first only."""
    if not first:
        return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=call.arguments))
    return DeltaToolCall(index=index, id=random_id("chatcmpl-tool"), type="function",
                         function=DeltaFunctionCall(name=call.name, arguments=call.arguments))


def json_response(body: BaseModel) -> Response:
    """The response as its model dumps it, where FastAPI would dump it to a dict, validate that
    against the route's response model and encode it again. (With the deltas summed as they come,
    a response of 64 samples of 400 tokens with 20 logprobs each, 14 MB, took the HTTP process
    3.1-3.7 s of CPU instead of 3.6-4.3 on a 2-core x86 CPU.)"""
    return Response(body.model_dump_json(), media_type="application/json")


async def json_response_off_the_loop(build: Callable[[], BaseModel]) -> Response:
    """A whole completion's response, built and dumped in a worker thread: 64 samples of 400 tokens
    with 20 logprobs each are ~0.3 s of Python and JSON, which on the event loop held every other
    client up for as long (/health 0.5 s); in a thread the loop gets its turns between the thread's."""
    return await asyncio.to_thread(lambda: json_response(build()))


def _continuous_usage(body) -> bool:
    options = body.stream_options
    return options is not None and options.include_usage and options.continuous_usage_stats


class _Deltas:
    """A streamed request's delta outputs as its chunks send them: each sample's new tokens with
    what was held back before (tokens whose text is not out yet, as half a character), a finished
    sample once, and the tokens counted for the usage."""

    def __init__(self):
        self.held: dict[tuple[int, int], CompletionOutput] = {}
        self.finished: set[tuple[int, int]] = set()
        self.prompt_tokens: dict[int, int] = {}  # by prompt
        self.cached_tokens: dict[int, int] = {}  # by prompt
        self.completion_tokens = 0

    def ready(self, prompt_index: int, output: RequestOutput) -> list[CompletionOutput]:
        self.prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        self.cached_tokens[prompt_index] = output.num_cached_tokens
        ready = []
        for c in output.outputs:
            key = (prompt_index, c.index)
            if key in self.finished:
                continue
            self.completion_tokens += len(c.token_ids)
            before = self.held.pop(key, None)
            if before is not None:  # (the stream's own outputs: added to in place)
                add_completion_delta(before, c)
                c = before
            if not c.text and not c.finish_reason:
                self.held[key] = c
                continue
            if c.finish_reason:
                self.finished.add(key)
            ready.append(c)
        return ready

    def usage(self, echo_only: bool = False) -> Usage:
        return _usage_of(sum(self.prompt_tokens.values()), 0 if echo_only else self.completion_tokens,
                         sum(self.cached_tokens.values()))


def _usage(finals: list[RequestOutput], echo_only: bool = False) -> Usage:
    return _usage_of(sum(len(f.prompt_token_ids) for f in finals),
                     0 if echo_only else sum(len(c.token_ids) for f in finals for c in f.outputs),
                     sum(f.num_cached_tokens for f in finals))


def _usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))
