"""The errors pagedllm raises beyond ValueError (a bad argument, named, before any work)."""


class RequestFailedError(RuntimeError):
    """One request failed in the engine (an error pinned on it alone); the engine goes on."""

    def __init__(self, message: str, prompt_index: int | None = None):
        super().__init__(message)
        self.prompt_index = prompt_index


class EngineDeadError(RuntimeError):
    """The engine loop failed as a whole (device lost, a worker dead); no request can be served."""
