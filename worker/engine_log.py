"""The logger of the modules ``bench/gpu.sh`` imports on a bare CUDA host (engine, batcher).

That host has torch, transformers, pillow and numpy only: where structlog is missing, a
stand-in on the standard library takes the same calls and writes ``event key=value`` lines.
"""

from __future__ import annotations

import logging
from typing import Any


def get_logger(name: str) -> Any:
    """structlog's logger ``name``, or the stand-in where structlog is not installed."""
    try:
        import structlog
    except ImportError:
        return KeyValueLogger(logging.getLogger(name))
    return structlog.get_logger(name)


class KeyValueLogger:
    """structlog's calling convention (an event name, then fields) on a stdlib logger."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def info(self, event: str, **fields: Any) -> None:
        self._logger.info(self._line(event, fields))

    def warning(self, event: str, **fields: Any) -> None:
        self._logger.warning(self._line(event, fields))

    def exception(self, event: str, **fields: Any) -> None:
        self._logger.exception(self._line(event, fields))

    @staticmethod
    def _line(event: str, fields: dict[str, Any]) -> str:
        return " ".join([event, *(f"{key}={value!r}" for key, value in fields.items())])
