"""The errors pagedllm raises beyond ValueError (a bad argument, named, before any work)."""


class ClientFault(str):
    """Why a request failed, where its own values caused it but only running it could tell (its
    grammar allowed nothing that its bad_words let through). A str, so it goes wherever a request's
    error goes (pickled between processes); the server answers it 400 where other failures are 500."""


class RequestFailedError(RuntimeError):
    """One request failed in the engine (an error pinned on it alone); the engine goes on.
    ``status``: 400 where the request's own values caused it (a ``ClientFault``), else 500."""

    def __init__(self, message: str, prompt_index: int | None = None, status: int | None = None):
        super().__init__(message)
        self.prompt_index = prompt_index
        self.status = status or (400 if isinstance(message, ClientFault) else 500)

    @classmethod
    def of_prompt(cls, index: int, error: str) -> "RequestFailedError":
        """Prompt ``index``'s failure, keeping whose fault it was."""
        return cls(f"prompt {index} failed: {error}", index, 400 if isinstance(error, ClientFault) else None)


class EngineDeadError(RuntimeError):
    """The engine loop failed as a whole (device lost, a worker dead); no request can be served."""


class RequestError(Exception):
    """Inside the engine: an error pinned on one request (its logits processor raised, say), so that
    request fails alone. ``row`` is its row in the step's sampling batch, ``request_id`` its id."""

    def __init__(self, error: Exception, row: int | None = None, request_id: str | None = None):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.row, self.request_id = error, row, request_id
