"""cliptag's producer side: the job/result contract, the client and the CLI.

Importing it never imports torch or the worker. Names are loaded on first use, so the
worker's engine modules can use ``producer.errors`` on a host without Celery or pydantic.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Client": "producer.client",
    "Job": "producer.client",
    "JobRequest": "producer.contract",
    "JobResult": "producer.contract",
    "parse_job": "producer.contract",
    "CliptagError": "producer.errors",
    "ErrorCode": "producer.errors",
    "JobError": "producer.errors",
    "JobFailed": "producer.errors",
    "JobTimeout": "producer.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
