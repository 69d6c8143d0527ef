"""Celery's consumer, made to answer malformed task messages (set as ``worker_consumer``).

Out of the box Celery logs and drops a message whose body does not decode, stores a
``NotRegistered`` failure for an unknown task name, silently rejects a bad ``eta`` and,
for a body of the wrong shape, dies. Here every such message is checked before Celery's
own handler sees it and answered through :class:`worker.malformed.MalformedMessages`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.connection import Connection
from kombu.message import Message
from vine import promise

from producer.contract import TASK_NAME
from producer.errors import shorten
from worker.malformed import MalformedMessages, body_shape_problem, describe
from worker.transport import GuardedTransportMixin


class Consumer(CeleryConsumer):
    """Celery's consumer plus the checks above; arguments are Celery's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.malformed = MalformedMessages(self.app)

    def connect(self) -> Connection:
        connection = super().connect()
        transport = connection.transport
        if isinstance(transport, GuardedTransportMixin):
            transport.on_malformed = self.malformed.answer_raw
        return connection

    def create_task_handler(self, promise: Callable[..., Any] = promise) -> Callable[[Message], Any]:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Message) -> Any:
            problem = self.task_message_problem(message)
            if problem is not None:
                return self.malformed.answer_message(message, problem)
            try:
                return handle(message)
            except Exception as exc:  # Celery raises from here for messages it cannot take
                return self.malformed.answer_message(message, f"the task message is invalid: {describe(exc)}")

        return on_task_received

    def task_message_problem(self, message: Message) -> str | None:
        """Why ``message`` is no task this worker runs (Celery protocol 2), or ``None``."""
        headers = message.headers
        name = headers.get("task") if isinstance(headers, dict) else None
        if not isinstance(name, str):
            return "the message has no 'task' header (Celery message protocol 2)"
        if name not in self.strategies:
            return f"the message is for task {shorten(name, 100)!r}, which this worker does not run"
        if not isinstance(headers.get("id"), str):
            return "the message has no 'id' header"
        if not isinstance(headers.get("retries", 0), int):
            return "the message's 'retries' header is not an integer"
        try:
            body = message.decode()
        except Exception as exc:
            return f"the message body cannot be decoded: {describe(exc)}"
        return body_shape_problem(body, single_argument=name == TASK_NAME)

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self.malformed.answer_message(message, f"the message body cannot be decoded: {describe(exc)}")

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        self.malformed.answer_message(message, f"the task message is invalid: {describe(exc)}")
