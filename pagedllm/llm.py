"""``LLM``: the offline entry point, a synchronous loop over the engine."""

import time
from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.errors import RequestFailedError
from pagedllm.inputs import encode_text, render_chat, token_ids
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """A model loaded for generation, as in vLLM: ``LLM("facebook/opt-1.3b").generate(prompts)``.

    Keyword arguments are the fields of :class:`pagedllm.config.EngineConfig` (the README's table).
    """

    def __init__(self, model: str, **kwargs: Any):
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._next_request_id = 0

    def get_tokenizer(self):
        return self._engine().tokenizer

    def shutdown(self) -> None:
        """Free the KV cache, the CUDA graphs and the weights, so that another model fits in this
        process. The object cannot generate afterwards."""
        if self.llm_engine is not None:
            self.llm_engine.shutdown()
            self.llm_engine = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def _engine(self) -> LLMEngine:
        if self.llm_engine is None:
            raise RuntimeError("this LLM was shut down: create a new LLM to generate again")
        return self.llm_engine

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the prompts' order.

        A prompt is a string, a list of token ids, or ``{"prompt_token_ids": [...]}`` (or
        ``{"prompt": "..."}``). Every prompt is checked before any work starts: one bad prompt
        raises a ValueError naming its index, and nothing runs.
        """
        return self._run_engine(self._add_requests(prompts, sampling_params, stream=False), use_tqdm)

    def generate_stream(self, prompts: PromptType | Sequence[PromptType],
                        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                        ) -> Iterator[RequestOutput]:
        """Like ``generate``, but yields each request's output every time it grows by a token:
        text and token ids so far, ``finished`` on its last one. Requests interleave as the
        engine batches them; ``request_id`` says which is which. Closing the iterator early
        aborts what is left."""
        request_ids = self._add_requests(prompts, sampling_params, stream=True)
        engine, pending = self._engine(), set(request_ids)
        try:
            while pending:
                for output in engine.step():
                    if output.request_id in pending:
                        if output.finished:
                            pending.discard(output.request_id)
                        yield output
        finally:
            for request_id in pending:
                engine.abort_request(request_id)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or a list of them,
        rendered with the tokenizer's chat template (or ``chat_template``, a Jinja string)."""
        tokenizer = self._engine().tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template: use generate()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for index, conversation in enumerate(conversations):
            try:
                text, ids = render_chat(tokenizer, conversation, chat_template, add_generation_prompt)
            except ValueError as err:
                raise ValueError(f"conversation {index}: {err}") from None
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _add_requests(self, prompts, sampling_params, stream: bool) -> list[str]:
        """Check every prompt, then queue them all; returns their request ids."""
        engine = self._engine()
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)):
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} SamplingParams were given for {len(prompts)} prompts: "
                                 "give one, or one per prompt")
        else:
            raise ValueError(f"sampling_params must be SamplingParams or a list of them, not "
                             f"{type(sampling_params).__name__}")
        requests = []
        for index, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            try:
                if not isinstance(p, SamplingParams):
                    raise ValueError(f"sampling_params must be SamplingParams, not {type(p).__name__}")
                text, token_ids = self._tokenize(prompt)
                engine.validate_request(token_ids, p)
            except ValueError as err:
                raise ValueError(f"prompt {index}: {err}") from None
            requests.append((str(self._next_request_id), text, token_ids, p))
            self._next_request_id += 1
        for request_id, text, token_ids, p in requests:
            engine.add_request(request_id, token_ids, p, prompt=text, stream=stream)
        return [r[0] for r in requests]

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a dict prompt needs 'prompt_token_ids' or 'prompt'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty: give at least one token")
            tokenizer = self._engine().tokenizer
            if tokenizer is None:
                raise ValueError("this model has no tokenizer: give prompts as token ids")
            return prompt, encode_text(tokenizer, prompt)
        if isinstance(prompt, (list, tuple)):
            return None, token_ids(prompt)
        raise ValueError(f"a prompt must be a str, a list of token ids or a dict, not {type(prompt).__name__}")

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step until this call's requests are done. If one fails in the engine, the others are
        aborted and the error names its prompt; the LLM stays usable."""
        engine = self._engine()
        outputs: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        start, tokens_at_start = time.perf_counter(), engine.num_generated_tokens
        try:
            while engine.has_unfinished_requests():
                finished = engine.step()
                for output in finished:
                    if output.error is not None and output.request_id in request_ids:
                        index = request_ids.index(output.request_id)
                        raise RequestFailedError(f"prompt {index} failed: {output.error}", index)
                    outputs[output.request_id] = output
                if finished and use_tqdm:
                    rate = (engine.num_generated_tokens - tokens_at_start) / (time.perf_counter() - start)
                    bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)
                    bar.update(len(finished))
        except BaseException:
            for request_id in request_ids:  # leave nothing of this call behind in the engine
                engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [outputs[request_id] for request_id in request_ids]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt or a list of them, told apart the way vLLM does."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a prompt or a list of them, not {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt of token ids
    return prompts
