"""Stable error codes and the exceptions that carry them.

Every failed job ends with exactly one :class:`ErrorCode`. The code is part of the
wire contract: producers in any language branch on it, so codes are never renamed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """The closed set of error codes a job result may carry."""

    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    FORBIDDEN_HOST = "forbidden_host"
    FORBIDDEN_PATH = "forbidden_path"
    FETCH_NOT_FOUND = "fetch_not_found"
    FETCH_TIMEOUT = "fetch_timeout"
    FETCH_FAILED = "fetch_failed"
    FETCH_REFUSED = "fetch_refused"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    DECODE_FAILED = "decode_failed"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNKNOWN_LABEL_SET = "unknown_label_set"
    EXPIRED = "expired"
    POISON_MESSAGE = "poison_message"
    WEBHOOK_FAILED = "webhook_failed"
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        """Whether a later attempt of the same job may succeed (a transient error)."""
        return self in _TRANSIENT


_TRANSIENT = frozenset({ErrorCode.FETCH_TIMEOUT, ErrorCode.FETCH_FAILED, ErrorCode.INTERNAL})

MAX_MESSAGE_VALUE_CHARS = 120


def shorten(value: object, limit: int = MAX_MESSAGE_VALUE_CHARS) -> str:
    """Render ``value`` for an error message, truncated so hostile input cannot bloat results."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class CliptagError(Exception):
    """Base class of every error cliptag raises on purpose."""


class JobError(CliptagError):
    """A job failed with a stable error code.

    Args:
        code: the stable error code.
        message: a human-readable explanation naming the offending value.
        retryable: overrides ``code.retryable`` (for example a 404 from S3 versus a 503).
    """

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retryable = self.code.retryable if retryable is None else retryable

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, "retryable": self.retryable}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class JobFailed(JobError):
    """Raised by :meth:`producer.Job.result` when the job's result carries an error.

    Args:
        job_id: the failed job's id.
        code, message, retryable: as reported by the worker.
        result: the whole result document, for callers that want its timings or metadata.
    """

    def __init__(
        self, job_id: str, code: ErrorCode, message: str, *, retryable: bool, result: dict[str, Any]
    ) -> None:
        super().__init__(code, message, retryable=retryable)
        self.job_id = job_id
        self.result = result

    def __str__(self) -> str:
        return f"job {self.job_id} failed: [{self.code.value}] {self.message}"


class JobTimeout(CliptagError, TimeoutError):
    """Raised when a job's result did not arrive within the caller's timeout."""


class ConfigError(CliptagError):
    """A configuration value is missing or malformed; the message names the variable."""
