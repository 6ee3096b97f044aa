"""``LLM``: the offline entry point, a synchronous loop over the engine."""

import dataclasses
import difflib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.beam_search import BeamSearchOutput
from pagedllm.beam_search import beam_search as run_beam_search
from pagedllm.config import EngineConfig
from pagedllm.engine.data_parallel import DataParallelEngine
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.request_checks import first_come_first_served, refuse_lora
from pagedllm.errors import RequestFailedError
from pagedllm.inputs import PromptType, TokensPrompt, as_prompt_list, cache_salt, parse_prompts, render_chat
from pagedllm.metrics import Metric, engine_metrics
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams


class LLM:
    """A model loaded for generation, as in vLLM: ``LLM("facebook/opt-1.3b").generate(prompts)``.

    Keyword arguments are the fields of :class:`pagedllm.config.EngineConfig` (the README's table).
    """

    def __init__(self, model: str, **kwargs: Any):
        _check_argument_names(kwargs)
        config = EngineConfig(model=model, **kwargs)
        self.llm_engine = DataParallelEngine(config) if config.data_parallel_size > 1 else LLMEngine(config)
        self._next_request_id = 0

    def get_tokenizer(self):
        return self._engine().tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``generate`` uses when given none: the model's generation_config.json (its
        temperature, top_p, top_k, min_p, repetition_penalty and max_new_tokens), as vLLM does."""
        return SamplingParams(**self._engine().default_sampling_fields)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (say, after changing what the weights are); False, and nothing
        forgotten, while requests hold blocks."""
        return self._engine().reset_prefix_cache()

    def get_metrics(self) -> list[Metric]:
        """The engine's counters and gauges now (the server's /metrics names)."""
        return engine_metrics(self._engine().stats())

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

    def _engine(self) -> LLMEngine | DataParallelEngine:
        if self.llm_engine is None:
            raise RuntimeError("this LLM was shut down: create a new LLM to generate again")
        return self.llm_engine

    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | Callable[..., tqdm] = True, *,
                 prompt_token_ids: list[int] | list[list[int]] | None = None, lora_request: Any = None,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the prompts' order.

        A prompt is a string, a list of token ids, ``TokensPrompt(prompt_token_ids=[...])`` or
        ``TextPrompt(prompt="...")`` (or ``prompt_token_ids=`` as older vLLM took them). Every prompt
        is checked before any work starts: one bad prompt raises a ValueError naming its index, and
        nothing runs. ``use_tqdm`` may be a tqdm-like class to show progress with. vLLM's
        ``lora_request`` (None only) and ``priority`` (zeros only: requests run first come, first
        served) are taken so that its scripts run.
        """
        refuse_lora(lora_request)
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("give prompts or prompt_token_ids, not both")
            prompts = [TokensPrompt(prompt_token_ids=ids) for ids in as_prompt_list(prompt_token_ids)]
        if prompts is None:
            raise ValueError("generate needs prompts")
        return self._run_engine(self._add_requests(prompts, sampling_params, stream=False, priority=priority),
                                use_tqdm)

    def generate_stream(self, prompts: PromptType | Sequence[PromptType],
                        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                        ) -> Iterator[RequestOutput]:
        """Like ``generate``, but yields each request's output every time it grows by a token:
        text and token ids so far (only the new ones with ``RequestOutputKind.DELTA``; only the
        last output with ``FINAL_ONLY``), ``finished`` on its last one. Requests interleave as the
        engine batches them; ``request_id`` says which is which. Closing the iterator early aborts
        what is left."""
        request_ids = self._add_requests(prompts, sampling_params, stream=True)
        engine, pending = self._engine(), set(request_ids)
        try:
            while pending:
                for output in engine.step():
                    if output.request_id in pending:
                        if output.finished:
                            pending.discard(output.request_id)
                        if output.error is not None:
                            index = request_ids.index(output.request_id)
                            raise RequestFailedError.of_prompt(index, output.error)
                        yield output
        finally:
            engine.abort_request(pending)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., tqdm] = True, lora_request: Any = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None, mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages, content a string or
        OpenAI's text parts) or a list of them, rendered with the tokenizer's chat template (or
        ``chat_template``, a Jinja string), given ``tools`` and ``chat_template_kwargs``; vLLM's
        arguments, in its order. ``chat_template_content_format``: the template sees each message's
        content as a string ("string"; "auto" does the same) or as OpenAI's list of text parts
        ("openai"). ``lora_request`` and ``mm_processor_kwargs`` are taken as None only."""
        refuse_lora(lora_request)
        if mm_processor_kwargs is not None:
            raise ValueError(f"mm_processor_kwargs={mm_processor_kwargs!r} is invalid: it must be None: multi-modal "
                             "inputs are not supported (this model takes text)")
        tokenizer = self._engine().tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template: use generate()")
        if not isinstance(messages, list | tuple):
            raise ValueError(f"messages={messages!r:.100} is invalid: it must be a conversation (a list of "
                             "{'role', 'content'} dicts) or a list of them")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for index, conversation in enumerate(conversations):
            try:
                text, ids = render_chat(tokenizer, conversation, chat_template, add_generation_prompt,
                                        continue_final_message, tools, chat_template_kwargs,
                                        chat_template_content_format)
            except ValueError as err:
                raise ValueError(f"conversation {index}: {err}") from None
            prompts.append(TokensPrompt(prompt=text, prompt_token_ids=ids))
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams, lora_request: Any = None,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search (its arguments, in its order): each prompt's ``params.beam_width`` best
        sequences, best first."""
        refuse_lora(lora_request)
        engine = self._engine()
        limit = engine.config.max_logprobs
        if limit != -1 and 2 * params.beam_width > limit:
            raise ValueError(f"beam_width={params.beam_width} needs the {2 * params.beam_width} most likely tokens "
                             f"of each step, more than max_logprobs={limit}: raise max_logprobs")
        token_prompts = [ids for _, ids in parse_prompts(as_prompt_list(prompts), engine.tokenizer)]
        return run_beam_search(self, token_prompts, params, use_tqdm)

    def _add_requests(self, prompts, sampling_params, stream: bool, priority: list[int] | None = None) -> list[str]:
        """Check every prompt, then queue them all; returns their request ids."""
        engine = self._engine()
        prompts = as_prompt_list(prompts)
        first_come_first_served(priority, len(prompts))
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
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
        for index, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"prompt {index}: sampling_params must be SamplingParams, not {type(p).__name__}")
        requests = []
        for index, (prompt, (text, ids), p) in enumerate(zip(prompts, parse_prompts(prompts, engine.tokenizer), params,
                                                             strict=True)):
            try:
                salt = cache_salt(prompt)
                engine.validate_request(ids, p)
                if stream and p.samples > p.n and p.output_kind != RequestOutputKind.FINAL_ONLY:
                    raise ValueError(f"SamplingParams.best_of={p.best_of} is invalid: it cannot be streamed (the "
                                     "best samples are known only at the end): use RequestOutputKind.FINAL_ONLY")
            except ValueError as err:
                raise ValueError(f"prompt {index}: {err}") from None
            requests.append((str(self._next_request_id), text, ids, p, salt))
            self._next_request_id += 1
        for request_id, text, ids, p, salt in requests:
            engine.add_request(request_id, ids, p, prompt=text, stream=stream, cache_salt=salt)
        return [r[0] for r in requests]

    def _run_engine(self, request_ids: list[str], use_tqdm: bool | Callable[..., tqdm]) -> list[RequestOutput]:
        """Step until this call's requests are done. If one fails in the engine, the others are
        aborted and the error names its prompt; the LLM stays usable."""
        engine = self._engine()
        outputs: dict[str, RequestOutput] = {}
        bar_class = use_tqdm if callable(use_tqdm) else tqdm
        bar = bar_class(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True,
                        disable=not use_tqdm)
        start, tokens_at_start = time.perf_counter(), engine.num_generated_tokens
        try:
            while engine.has_unfinished_requests():
                finished = engine.step()
                for output in finished:
                    if output.error is not None and output.request_id in request_ids:
                        index = request_ids.index(output.request_id)
                        raise RequestFailedError.of_prompt(index, output.error)
                    outputs[output.request_id] = output
                if finished and use_tqdm:
                    rate = (engine.num_generated_tokens - tokens_at_start) / (time.perf_counter() - start)
                    bar.set_postfix_str(f"output {rate:.1f} tok/s", refresh=False)
                    bar.update(len(finished))
        except BaseException:
            engine.abort_request(request_ids)  # leave nothing of this call behind in the engine
            raise
        finally:
            bar.close()
        return [outputs[request_id] for request_id in request_ids]


def _check_argument_names(kwargs: dict) -> None:
    """An argument EngineConfig has no field for is named, with the fields its name is close to
    (a bare TypeError from EngineConfig.__init__ named neither)."""
    known = [f.name for f in dataclasses.fields(EngineConfig) if f.init]
    for name in kwargs:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise TypeError(f"LLM() got an unexpected argument {name!r}{hint}: its arguments are EngineConfig's "
                            "fields, the README's table")
