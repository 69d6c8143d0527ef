"""kombu's Redis transport, made to survive entries in the queue that are no kombu message.

kombu's Redis channel parses every list entry it pops as a JSON envelope; an entry that
is not JSON, or whose envelope lacks what kombu needs, raises out of the event loop and
stops the worker. The guarded transport hands such an entry to ``on_malformed`` (see
:class:`worker.consumer.Consumer`, which answers or dead-letters it) and carries on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog
from kombu.transport import redis as kombu_redis

from producer.celery_conf import WEBHOOK_QUEUE
from producer.errors import shorten
from worker.malformed import describe
from worker.reliable_channel import ReliableChannelMixin

log = structlog.get_logger("cliptag.worker")

MalformedHandler = Callable[[str, str], None]

BACKGROUND_QUEUES = frozenset({WEBHOOK_QUEUE})
"""Webhook deliveries, queued by workers as jobs finish, may wait up to 0.3 s on an idle
worker; a job may not (see :mod:`worker.reliable_channel`)."""


def log_malformed(raw: str, reason: str) -> None:
    """The handler until a consumer installs its own: log the entry, which is then gone."""
    log.error("malformed_message", reason=reason, raw=shorten(raw))


def envelope_problem(envelope: Any, channel: Any) -> str | None:
    """Why kombu cannot deliver ``envelope`` (a parsed queue entry) on ``channel``, or ``None``."""
    if not isinstance(envelope, dict):
        return "the queue entry is not a JSON object (a kombu message envelope)"
    try:
        message = channel.Message(envelope, channel=channel)
    except Exception as exc:
        return f"the queue entry is no kombu message envelope: {describe(exc)}"
    info = message.delivery_info
    if not (isinstance(message.delivery_tag, str) and message.delivery_tag):
        return "the message envelope has no delivery_tag"
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return "the message envelope has no delivery_info with exchange and routing_key"
    return None


class GuardedChannelMixin:
    """Turns a queue entry that is not JSON into a call of the transport's ``on_malformed``."""

    connection: GuardedTransportMixin

    def _deliver_raw(self, raw: str, queue: str, *, recorded: bool) -> None:
        try:
            super()._deliver_raw(raw, queue, recorded=recorded)  # type: ignore[misc]
        except json.JSONDecodeError as exc:
            self.connection.reject_malformed(raw, f"the queue entry is not JSON: {exc.msg}")


class GuardedTransportMixin:
    """Checks each parsed envelope before kombu builds a message of it.

    Attributes:
        on_malformed: called with the raw entry and the reason for entries kombu cannot
            deliver; logs them until a consumer installs its own handler.
    """

    channels: list[Any]
    on_malformed: MalformedHandler = staticmethod(log_malformed)

    def _deliver(self, message: Any, queue: str) -> None:
        problem = envelope_problem(message, self.channels[0]) if self.channels else None
        if problem is None:
            super()._deliver(message, queue)  # type: ignore[misc]
        else:
            self.reject_malformed(json.dumps(message, default=str), problem)

    def reject_malformed(self, raw: str, reason: str) -> None:
        """Hand ``raw`` to ``on_malformed``; a failing handler is logged, never raised."""
        try:
            self.on_malformed(raw, reason)
        except Exception:
            log.exception("malformed_message_unanswered", reason=reason, raw=shorten(raw))


class Channel(GuardedChannelMixin, ReliableChannelMixin, kombu_redis.Channel):
    background_queues = BACKGROUND_QUEUES


class Transport(GuardedTransportMixin, kombu_redis.Transport):
    """``redis://`` and ``rediss://`` brokers."""

    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The guarded transport's import path for ``broker_url``, or ``None`` (kombu's default)."""
    scheme = broker_url.partition("://")[0].lower()
    if scheme in ("redis", "rediss"):
        return "worker.transport:Transport"
    return None
