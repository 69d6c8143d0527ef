"""A kombu Redis channel that loses no message, whatever happens to the worker or to Redis.

Two gaps in kombu's Redis channel are closed here (mixed into ``worker.transport``'s channels).

**Taking messages.** kombu takes a message with ``BRPOP``, which removes it from the
queue, and records it as unacknowledged (``unacked`` hash, ``unacked_index`` sorted set)
only after it has read the reply. A worker killed in between (the reply on the wire, or
in a socket buffer while the worker has no prefetch credit) loses the message for good:
it is in no queue and in no record a visibility sweep could restore it from. Instead,
two commands alternate:

1. a Lua script that pops as many messages as the prefetch credit allows (up to
   ``MAX_FETCH``; queues and priorities in kombu's order) and, in the same atomic step,
   records each in ``unacked``/``unacked_index`` exactly as kombu's ``QoS.append`` would.
   From then on a crash leaves the messages where the visibility sweep finds them, and
   :class:`FetchedQoS` does not write the same record a second time on delivery.
   Taking many messages per round trip matters: under load the consumer thread waits
   for the GIL after every reply, so round trips, not bytes, bound its rate.
2. when there was nothing, a blocking wait that takes nothing: ``BLMOVE q q RIGHT RIGHT``
   moves a queue's oldest entry onto itself (no change) as soon as the queue has one.
   It waits on one queue for at most ``WAIT_SECONDS``; the next script run looks at every
   queue, so a message on another queue waits that long at most (Redis ends blocking
   waits on its 10 Hz clock: 0.2-0.3 s). The queue waited on is the one that delivered
   last, where the traffic is, unless it is one of ``background_queues``, which never
   get the wait while another queue is consumed (a worker consumes its job queue and the
   webhook queue: while the wait took turns between them, a job reaching an idle worker
   waited up to 0.3 s whenever it was the webhook queue's turn).

**Losing the connection.** When Redis goes away, Celery collects the connection (which
drops the channel's pool) and then closes the channel, whose attempt to put the
unacknowledged messages back asks the collected connection for its address and dies
with an ``AttributeError`` that takes the whole consumer down ("Unrecoverable error"):
the worker never reconnects. Here that attempt fails as the connection error it is,
which Celery ignores; the messages stay recorded in Redis and come back through the
visibility sweep.

Needs Redis 6.2 or newer (``BLMOVE``).
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.transport.redis import bytes_to_str, loads

WAIT_SECONDS = 0.2

MAX_FETCH = 64
"""The most messages one fetch takes (fewer when the prefetch credit is smaller)."""

FETCH_SCRIPT = """
local taken = {}
local limit = tonumber(ARGV[2])
for i = 3, #KEYS do
  while #taken < 3 * limit do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local recorded = 0
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      local tag = message.properties.delivery_tag
      local info = message.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table'
          and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        redis.call('HSET', KEYS[1], tag,
          '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        recorded = 1
      end
    end
    taken[#taken + 1] = KEYS[i]
    taken[#taken + 1] = item
    taken[#taken + 1] = recorded
  end
end
return taken
"""


class FetchedQoS(kombu_redis.QoS):
    """kombu's Redis QoS, minus the second write of a record the fetch script already made."""

    channel: Any

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.channel.recorded_tags:
            self.channel.recorded_tags.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)


class ReliableChannelMixin:
    """For a kombu Redis ``Channel`` subclass: atomic fetches, and a close that survives a lost connection."""

    # provided by kombu's Redis Channel
    client: Any
    connection: Any
    connection_errors: tuple[type[BaseException], ...]
    active_queues: set[str]
    priority_steps: list[int]
    global_keyprefix: str
    unacked_key: str
    unacked_index_key: str
    sep: str
    qos: Any
    _queue_cycle: Any
    _in_poll: Any
    _brpop_sent_at: float | None

    QoS = FetchedQoS
    background_queues: frozenset[str] = frozenset()
    """Queues whose messages may wait for the next fetch (at most ``WAIT_SECONDS``)."""
    _fetch_next = True
    _waited_on: str | None = None
    _last_delivered: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded_tags: set[str] = set()
        super().__init__(*args, **kwargs)

    def _atomic_keys(self) -> tuple[str, list[str]] | None:
        """The key prefix and the queue keys in kombu's order (priority steps, then queues)."""
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        prefix = self.global_keyprefix or ""
        keys = [prefix + self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        return prefix, keys

    def _brpop_start(self, timeout: float | None = None) -> None:
        found = self._atomic_keys()
        if found is None:
            return
        prefix, keys = found
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()
        if self._fetch_next:
            unacked, index = prefix + self.unacked_key, prefix + self.unacked_index_key
            credit = self.qos.can_consume_max_estimate()
            limit = MAX_FETCH if credit is None else max(1, min(credit, MAX_FETCH))
            connection.send_command(
                "EVAL", FETCH_SCRIPT, 2 + len(keys), unacked, index, *keys, repr(time.time()), limit
            )
        else:
            self._waited_on = self._wait_key(prefix, keys)
            wait = min(WAIT_SECONDS, timeout or WAIT_SECONDS)
            connection.send_command("BLMOVE", self._waited_on, self._waited_on, "RIGHT", "RIGHT", wait)

    def _wait_key(self, prefix: str, keys: list[str]) -> str:
        """The queue key to block on: the queue that delivered last, else the first in turn,
        passing over background queues unless there is nothing else."""
        last = self._last_delivered
        if last in self.active_queues and last not in self.background_queues:
            return prefix + self._q_for_pri(last, 0)
        foreground = [key for key in keys if self._queue_of(key) not in self.background_queues]
        return (foreground or keys)[0]

    def _brpop_read(self, **options: Any) -> bool:
        try:
            fetching = self._fetch_next
            try:
                reply = self.client.parse_response(
                    self.client.connection, "EVAL" if fetching else "BLMOVE", **options
                )
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not fetching:
                self._fetch_next = True
                if reply is None and self._waited_on is not None:
                    self._queue_cycle.rotate(self._queue_of(self._waited_on))
                raise Empty()
            if not reply:
                self._fetch_next = False
                raise Empty()
            self._deliver_fetched(reply)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_fetched(self, reply: list[Any]) -> None:
        """Deliver every message of one fetch; one that fails does not keep back the rest."""
        failure: BaseException | None = None
        for start in range(0, len(reply), 3):
            key, item, recorded = reply[start : start + 3]
            queue = self._queue_of(bytes_to_str(key))
            self._queue_cycle.rotate(queue)
            self._last_delivered = queue
            try:
                self._deliver_raw(bytes_to_str(item), queue, recorded=bool(recorded))
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _deliver_raw(self, raw: str, queue: str, *, recorded: bool) -> None:
        """Parse one queue entry and hand it to kombu (and so to the consumer)."""
        message = loads(raw)
        tag = _delivery_tag(message)
        if recorded and tag is not None:
            self.recorded_tags.add(tag)
        try:
            self.connection._deliver(message, queue)
        finally:
            if tag is not None:
                self.recorded_tags.discard(tag)
                self._forget_untaken(tag)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed (Redis went away)")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]

    def _forget_untaken(self, tag: str) -> None:
        """Drop the script's record of a message no consumer took (refused as malformed),
        which would otherwise come back after every visibility timeout."""
        if tag not in self.qos._delivered:
            self.qos._remove_from_indices(tag).execute()

    def _queue_of(self, key: str) -> str:
        """The queue name of a queue key (without the global prefix and priority suffix)."""
        return key.removeprefix(self.global_keyprefix or "").rsplit(self.sep, 1)[0]


def _delivery_tag(message: Any) -> str | None:
    properties = message.get("properties") if isinstance(message, dict) else None
    tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
    return tag if isinstance(tag, str) else None
