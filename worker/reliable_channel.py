"""A kombu Redis channel that loses no message, whatever happens to the worker or to Redis.

Two gaps in kombu's Redis channel are closed here (mixed into ``worker.transport``'s channels).

**Taking a message.** kombu takes a message with ``BRPOP``, which removes it from the
queue, and records it as unacknowledged (``unacked`` hash, ``unacked_index`` sorted set)
only after it has read the reply. A worker killed in between (the reply on the wire, or
in a socket buffer while the worker has no prefetch credit) loses the message for good:
it is in no queue and in no record a visibility sweep could restore it from. Instead,
two commands alternate:

1. a Lua script that pops the next message (queues and priorities in kombu's order) and,
   in the same atomic step, records it in ``unacked``/``unacked_index`` exactly as kombu's
   ``QoS.append`` would (kombu records it again on delivery, the same entry). From then
   on a crash leaves the message where the visibility sweep finds it.
2. when there was nothing, a blocking wait that takes nothing: ``BLMOVE q q RIGHT RIGHT``
   moves a queue's oldest entry onto itself (no change) as soon as the queue has one.
   It waits on one queue at a time, rotating, for at most ``WAIT_SECONDS``; the next
   script run looks at every queue, so a message on another queue waits that long at most.

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
from kombu.transport.redis import bytes_to_str, loads

WAIT_SECONDS = 0.2

FETCH_SCRIPT = """
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      local tag = message.properties.delivery_tag
      local info = message.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table'
          and type(info.exchange) == 'string' and type(info.routing_key) == 'string' then
        redis.call('HSET', KEYS[1], tag,
          '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
      end
    end
    return {KEYS[i], item}
  end
end
return false
"""


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

    _fetch_next = True
    _waited_on: str | None = None

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
            connection.send_command(
                "EVAL", FETCH_SCRIPT, 2 + len(keys), unacked, index, *keys, repr(time.time())
            )
        else:
            self._waited_on = keys[0]
            wait = min(WAIT_SECONDS, timeout or WAIT_SECONDS)
            connection.send_command("BLMOVE", keys[0], keys[0], "RIGHT", "RIGHT", wait)

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
            key, item = reply
            queue = self._queue_of(bytes_to_str(key))
            self._queue_cycle.rotate(queue)
            message = loads(bytes_to_str(item))
            try:
                self.connection._deliver(message, queue)
            finally:
                self._forget_untaken(message)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed (Redis went away)")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]

    def _forget_untaken(self, message: Any) -> None:
        """Drop the script's record of a message no consumer took (refused as malformed),
        which would otherwise come back after every visibility timeout."""
        properties = message.get("properties") if isinstance(message, dict) else None
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        if isinstance(tag, str) and tag not in self.qos._delivered:
            self.qos._remove_from_indices(tag).execute()

    def _queue_of(self, key: str) -> str:
        """The queue name of a queue key (without the global prefix and priority suffix)."""
        return key.removeprefix(self.global_keyprefix or "").rsplit(self.sep, 1)[0]
