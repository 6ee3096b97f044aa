"""pagedllm: fast LLM inference with a paged KV cache and continuous batching."""

from pagedllm.config import EngineConfig
from pagedllm.errors import EngineDeadError, RequestFailedError
from pagedllm.llm import LLM
from pagedllm.logging_config import configure_logging
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "RequestFailedError",
           "EngineDeadError"]
__version__ = "0.1.0"

configure_logging()
