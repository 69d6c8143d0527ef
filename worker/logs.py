"""structlog set-up: JSON lines when stderr is not a terminal, readable lines when it is."""

from __future__ import annotations

import logging
import sys

import structlog

CELERY_PER_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")
"""Celery's "Task received" and "Task succeeded" lines: cliptag's ``job_done`` line says
the same and more, so these two log only warnings (a failure is still logged)."""


def configure_logging(level: str = "INFO") -> None:
    """Route structlog to stderr; JSON for machines, console rendering for people."""
    for name in CELERY_PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if sys.stderr.isatty() else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # one write per line: print() writes the newline apart, and Celery's own lines got in between
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
