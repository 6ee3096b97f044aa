"""pagedllm's log lines (start-up decisions such as the KV cache size) go to stderr, as vLLM's do."""

import logging
import os

# DEBUG, INFO (default), WARNING, ERROR.
LOGGING_LEVEL_ENV = "PAGEDLLM_LOGGING_LEVEL"


def configure_logging() -> None:
    logger = logging.getLogger("pagedllm")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s pagedllm: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get(LOGGING_LEVEL_ENV, "INFO").upper())
    logger.propagate = False
