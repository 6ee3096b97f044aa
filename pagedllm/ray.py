"""Batch generation on Ray Data, in the shape ``ray.data.llm`` users know: ``build_processor(config,
preprocess, postprocess)`` returns a function from a dataset to a dataset. Ray schedules the
replicas, moves the rows, retries the batches of an actor that dies, and writes the output;
pagedllm generates. ``pip install pagedllm[ray]``.

One replica is one Ray actor holding one engine for its life (the model loads once per actor).
Its batches are handled concurrently (an async actor: several batches in flight feed the same
engine, so it stays full while Ray moves the next rows). A row's input is ``prompt`` (text or
token ids) or ``messages`` (a chat, rendered with the tokenizer's template), with
``sampling_params`` as a dict of ``SamplingParams`` fields (None: the field's default); the output row keeps every input
column and adds ``generated_text``, ``generated_token_ids``, ``num_input_tokens``,
``num_generated_tokens`` and ``finish_reason``.
"""

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.request_checks import one_completion
from pagedllm.inputs import encode_text, render_chat
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

ERROR_COLUMN = "__inference_error__"


@dataclass
class PagedLLMProcessorConfig:
    """``concurrency`` replicas, each on ``num_gpus_per_replica`` x ``tensor_parallel_size`` GPUs
    (0 on CPUs: say ``engine_kwargs={"device": "cpu"}``), fed ``batch_size`` rows at a time, up to
    ``max_concurrent_batches`` batches in flight each. ``should_continue_on_error``: a row that
    cannot run (an empty or too long prompt, bad sampling values) becomes an output row with
    ``__inference_error__`` set, and the job goes on; otherwise the job fails, naming the row."""

    model_source: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    batch_size: int = 64
    num_gpus_per_replica: float = 1.0
    num_cpus_per_replica: float = 1.0
    max_concurrent_batches: int = 4
    should_continue_on_error: bool = False

    def __post_init__(self) -> None:
        checks = {
            "model_source": isinstance(self.model_source, str) and bool(self.model_source),
            "engine_kwargs": isinstance(self.engine_kwargs, dict) and "model" not in self.engine_kwargs,
            "concurrency": type(self.concurrency) is int and self.concurrency >= 1,
            "batch_size": type(self.batch_size) is int and self.batch_size >= 1,
            "num_gpus_per_replica": isinstance(self.num_gpus_per_replica, (int, float))
            and self.num_gpus_per_replica >= 0,
            "num_cpus_per_replica": isinstance(self.num_cpus_per_replica, (int, float))
            and self.num_cpus_per_replica > 0,
            "max_concurrent_batches": type(self.max_concurrent_batches) is int and self.max_concurrent_batches >= 1,
            "should_continue_on_error": isinstance(self.should_continue_on_error, bool),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"PagedLLMProcessorConfig.{name}={getattr(self, name)!r} is invalid")
        unknown = sorted(set(self.engine_kwargs) - {f.name for f in fields(EngineConfig) if f.init})
        if unknown:
            raise ValueError(f"PagedLLMProcessorConfig.engine_kwargs is invalid: LLM takes no argument {unknown[0]!r}")

    @property
    def num_gpus_per_actor(self) -> float:
        return self.num_gpus_per_replica * self.engine_kwargs.get("tensor_parallel_size", 1)


class PagedLLMStage:
    """The actor of one replica: its engine, and the rows of each batch it is handed."""

    def __init__(self, model_source: str, engine_kwargs: dict, should_continue_on_error: bool,
                 preprocess: Callable[[dict], dict] | None, postprocess: Callable[[dict], dict] | None):
        import ray
        import torch

        from pagedllm.engine.async_llm import AsyncLLM

        config = EngineConfig(model=model_source, **engine_kwargs)
        if config.device == "cpu":  # as many threads as CPUs Ray gave this replica, not the node's count
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(max(1, int(cpus)))
        self.engine = AsyncLLM(config, engine_process=False)  # the actor is a process of its own
        self.tokenizer = self.engine.tokenizer
        self.should_continue_on_error = should_continue_on_error
        self.preprocess, self.postprocess = preprocess, postprocess
        self.ids = itertools.count()

    async def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        columns = list(batch)
        rows = [{name: batch[name][i] for name in columns} for i in range(len(batch[columns[0]]))] if columns else []
        if self.preprocess is not None:
            rows = [self.preprocess(row) for row in rows]
        results = await asyncio.gather(*(self._generate(row) for row in rows))
        if self.postprocess is not None:
            results = [self.postprocess(result) for result in results]
        names = list(dict.fromkeys(name for result in results for name in result))
        return {name: [result.get(name) for result in results] for name in names}

    async def _generate(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row with its completion, or with its error (or the error raised, naming the row)."""
        try:
            prompt, params = self._request(row)
            outputs = [o async for o in self.engine.generate(prompt, params, f"ray-{next(self.ids)}")]
            final = outputs[-1]  # the only one: FINAL_ONLY
            if final.error is not None:
                raise ValueError(final.error)
        except ValueError as err:
            if not self.should_continue_on_error:
                raise ValueError(f"row {_describe(row)}: {err} (should_continue_on_error=True makes such rows "
                                 f"output rows with {ERROR_COLUMN})") from None
            return row | {"generated_text": None, "generated_token_ids": [], "num_input_tokens": 0,
                          "num_generated_tokens": 0, "finish_reason": "error", ERROR_COLUMN: str(err)}
        completion = final.outputs[0]
        result = row | {"generated_text": completion.text, "generated_token_ids": list(completion.token_ids),
                        "num_input_tokens": len(final.prompt_token_ids),
                        "num_generated_tokens": len(completion.token_ids), "finish_reason": completion.finish_reason}
        return result | ({ERROR_COLUMN: None} if self.should_continue_on_error else {})

    def _request(self, row: dict[str, Any]) -> tuple[dict, SamplingParams]:
        fields = _plain(row.get("sampling_params"))
        if fields is not None and not isinstance(fields, dict):
            raise ValueError(f"sampling_params must be a dict of SamplingParams fields, not {type(fields).__name__}")
        # A column of dicts is an Arrow struct: every row has every key the column's rows have, None
        # where it had none. So None means "not given" here: the field's default. Such a column of ints
        # with gaps comes as floats (a seed on some rows only was 3.0, refused): whole ones are ints again.
        try:
            params = SamplingParams(**{k: int(v) if k in _INT_FIELDS and isinstance(v, float) and v.is_integer()
                                       else v for k, v in (fields or {}).items() if v is not None})
        except TypeError as err:
            raise ValueError(f"sampling_params: {err}") from None
        one_completion(params)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        if row.get("messages") is not None:
            if self.tokenizer is None:
                raise ValueError("messages need the model's tokenizer, and this model has none")
            text, token_ids = render_chat(self.tokenizer, _plain(row["messages"]))
            return {"prompt": text, "prompt_token_ids": token_ids}, params
        prompt = _plain(row.get("prompt"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs the model's tokenizer, and this model has none")
            return {"prompt": prompt, "prompt_token_ids": encode_text(self.tokenizer, prompt)}, params
        if isinstance(prompt, list):
            return {"prompt_token_ids": prompt}, params
        raise ValueError("the row needs a 'prompt' (text or token ids) or 'messages' column")


_INT_FIELDS = frozenset(f.name for f in fields(SamplingParams) if f.type in (int, int | None))


def _plain(value: Any) -> Any:
    """Arrow and numpy values (arrays, numpy scalars) as plain Python lists and numbers."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _describe(row: dict[str, Any]) -> str:
    shown = {k: v for k, v in row.items() if k in ("id", "prompt", "messages")} or row
    text = repr(shown)
    return text if len(text) <= 200 else text[:200] + "..."


def build_processor(config: PagedLLMProcessorConfig, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None) -> Callable:
    """``processor(dataset) -> dataset``: ``preprocess`` on each row, generation, ``postprocess`` on
    each output row, all in the replicas. Lazy, as Ray Data is: nothing runs until the result is
    consumed (``write_json``, ``take_all``, ...)."""
    import ray.data

    def processor(dataset: "ray.data.Dataset") -> "ray.data.Dataset":
        # The row functions run in the replicas' actors, beside generation: no tasks of their own to
        # schedule (thousands of one-row tasks), and no CPUs to find on nodes the replicas fill.
        return dataset.map_batches(
            PagedLLMStage,
            fn_constructor_kwargs={"model_source": config.model_source, "engine_kwargs": config.engine_kwargs,
                                   "should_continue_on_error": config.should_continue_on_error,
                                   "preprocess": preprocess, "postprocess": postprocess},
            batch_size=config.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.concurrency,
                                               max_tasks_in_flight_per_actor=config.max_concurrent_batches,
                                               max_concurrent_calls_per_actor=config.max_concurrent_batches),
            num_gpus=config.num_gpus_per_actor, num_cpus=config.num_cpus_per_replica)

    return processor
