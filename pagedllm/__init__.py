"""pagedllm: fast LLM inference with a paged KV cache and continuous batching."""

from pagedllm.beam_search import BeamSearchOutput, BeamSearchSequence
from pagedllm.config import EngineConfig
from pagedllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.async_llm_engine import AsyncLLMEngine
from pagedllm.errors import EngineDeadError, RequestFailedError
from pagedllm.inputs import PromptType, TextPrompt, TokensPrompt
from pagedllm.llm import LLM
from pagedllm.logging_config import configure_logging
from pagedllm.outputs import CompletionOutput, FlatLogprobs, Logprob, RequestMetrics, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams
from pagedllm.structured_outputs import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "FlatLogprobs", "RequestMetrics",
           "RequestOutputKind", "EngineConfig", "EngineArgs", "AsyncEngineArgs", "AsyncLLM", "AsyncLLMEngine",
           "PromptType", "TextPrompt", "TokensPrompt", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "RequestFailedError", "EngineDeadError", "StructuredOutputsParams", "GuidedDecodingParams"]
__version__ = "0.1.0"

configure_logging()
