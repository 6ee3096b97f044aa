"""vLLM's module for the engine's arguments (``from vllm.engine.arg_utils import AsyncEngineArgs``),
so that its scripts' imports find them here: both are ``EngineConfig``, whose fields are ``LLM``'s
arguments."""

from pagedllm.config import EngineConfig

EngineArgs = AsyncEngineArgs = EngineConfig
