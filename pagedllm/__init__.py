"""pagedllm: fast LLM inference with a paged KV cache and continuous batching."""

from pagedllm.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from pagedllm.config import EngineConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.errors import EngineDeadError, RequestFailedError
from pagedllm.inputs import PromptType, TextPrompt, TokensPrompt
from pagedllm.llm import LLM
from pagedllm.logging_config import configure_logging
from pagedllm.outputs import CompletionOutput, FlatLogprobs, Logprob, RequestMetrics, RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.structured_outputs import GuidedDecodingParams, StructuredOutputsParams

# vLLM's names for the engine's arguments: EngineArgs(model=...), AsyncEngineArgs(model=...)
EngineArgs = AsyncEngineArgs = EngineConfig
AsyncLLMEngine = AsyncLLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "FlatLogprobs", "RequestMetrics",
           "RequestOutputKind", "EngineConfig", "EngineArgs", "AsyncEngineArgs", "AsyncLLM", "AsyncLLMEngine",
           "PromptType", "TextPrompt", "TokensPrompt", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "RequestFailedError", "EngineDeadError", "StructuredOutputsParams", "GuidedDecodingParams"]
__version__ = "0.1.0"

configure_logging()
