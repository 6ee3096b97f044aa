"""vLLM's module for its asyncio engine (``from vllm.engine.async_llm_engine import AsyncLLMEngine``),
so that its scripts' imports find it here: ``AsyncLLM``."""

from pagedllm.engine.async_llm import AsyncLLM

AsyncLLMEngine = AsyncLLM
