"""The queue entry that runs a job: Celery protocol v2, JSON, as kombu's Redis transport
stores it (spelled out in docs/operations.md, "Producing from any language").

The client writes it itself rather than through Celery's ``send_task`` so that claiming a
job id and enqueueing its job are one atomic Redis script (:data:`MARK_AND_ENQUEUE`): a
producer that dies between the two can leave neither a claim without a job (which would
make every resubmission of that id a no-op while nothing runs) nor the reverse. A dead
letter (a job or a webhook delivery) sent again is removed in the same step, so a crash
cannot lose it unsent.
``tests/test_wire_protocol.py`` holds the entry against what ``send_task`` writes.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from producer.contract import TASK_NAME

CALL_OPTIONS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}

MARK_AND_ENQUEUE = """
local settling = #KEYS >= 4
if settling and redis.call('HEXISTS', KEYS[3], ARGV[5]) == 0 then return 0 end
if ARGV[4] == '1' then
  if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
else
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('LPUSH', KEYS[2], ARGV[3])
if settling then
  redis.call('HDEL', KEYS[3], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[5])
end
return 1
"""
"""Set a mark (a job's claim, a webhook's state), push a queue entry and, for a dead letter
sent again, clear the job's earlier state and remove the letter: all or nothing.

KEYS: the mark's key, the queue's list and, for a dead letter, the dead-letter entries hash,
its index and the keys to delete first (the job's stored result, delivery counts, webhook
state). ARGV: the mark's value, its TTL in seconds, the queue entry, ``1`` to do nothing if
the mark is set already (``0`` sets it again), and the letter's field. Returns 1 when the
entry was pushed; 0 when the mark was set already, or the letter is gone (sent again or
purged by someone else meanwhile: two concurrent ``dlq retry`` runs send a job once)."""


def task_message(
    document: dict[str, Any], *, queue: str, task: str = TASK_NAME, task_id: str | None = None
) -> str:
    """The Redis list entry that runs ``task`` with ``document`` as its one positional
    argument, routed to ``queue``. The Celery task id is ``task_id``, by default the
    document's ``job_id`` (a job's id is its task id; other tasks need ids of their own)."""
    job_id = task_id or document["job_id"]
    body = json.dumps([[document], {}, CALL_OPTIONS])
    return json.dumps(
        {
            "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": task,
                "id": job_id,
                "root_id": job_id,
                "parent_id": None,
                "group": None,
                "retries": 0,
                "eta": None,
                "expires": None,
                "timelimit": [None, None],
            },
            "properties": {
                "correlation_id": job_id,
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )
