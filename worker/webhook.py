"""``cliptag.deliver_webhook``: POST a job's stored result to its webhook, signed, with retries.

It runs as its own Celery task on its own queue (``cliptag-webhooks``), never on the
batcher's path. One attempt per message: a retryable failure (connection error, timeout,
408, 429, 5xx) schedules the next attempt as a new message after an exponential backoff
with jitter (at least ``Retry-After`` when the receiver sends one); any other 4xx, a
refused host or a missing secret fails at once. A delivery that fails for good is
dead-lettered (kind ``webhook``, code ``webhook_failed``); the result stays in the backend.

A job's webhook state in Redis (``producer.delivery``) makes delivery idempotent: once
``delivered``, a duplicate message (a crash and redelivery) POSTs nothing, and a lock
keeps two copies from POSTing at the same time. A crash between the receiver's 2xx and
the state update can still repeat a POST, so receivers deduplicate on ``Cliptag-Job-Id``.
"""

from __future__ import annotations

import email.utils
import json
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from celery import Task
from redis import Redis

from producer.celery_conf import WEBHOOK_QUEUE, WEBHOOK_TASK_NAME
from producer.contract import ErrorInfo
from producer.delivery import WebhookDelivery, webhook_lock_key, webhook_state_key
from producer.dlq import DeadLetter
from producer.errors import ErrorCode, JobError, shorten
from producer.signing import JOB_ID_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER, sign
from worker.app import app, settings
from worker.backoff import backoff_delay, countdown_cap
from worker.config import WorkerSettings
from worker.fetch_policy import guard_url, redact_url
from worker.http_clients import ClientsByHost
from worker.pipeline import fetch_policy
from worker.stores import broker_redis, dead_letters, stored_result

log = structlog.get_logger("cliptag.worker")

RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 60.0
MAX_RETRY_AFTER_SECONDS = 600.0
"""The longest ``Retry-After`` honoured; the waiting message stays with its worker
(``worker.visibility``), so it may exceed the visibility timeout."""
RETRYABLE_STATUSES = frozenset({408, 429})
USER_AGENT = "cliptag-webhook/1"


@dataclass(frozen=True)
class Outcome:
    """What one delivery attempt came to.

    Attributes:
        delivered: the receiver answered 2xx.
        retryable: a later attempt may succeed.
        detail: what happened, for logs and the dead letter.
        status: the HTTP status, when there was one.
        retry_after: seconds the receiver asked to wait, when it said.
    """

    delivered: bool
    retryable: bool
    detail: str
    status: int | None = None
    retry_after: float | None = None


def webhook_keys(raw: str) -> dict[str, str]:
    """Parse ``CLIPTAG_WEBHOOK_KEYS`` (``id1=secret1,id2=secret2``).

    Raises:
        JobError: ``webhook_failed`` naming the malformed entry (never the secret).
    """
    keys: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        key_id, sep, secret = entry.partition("=")
        if not sep or not key_id.strip() or not secret:
            raise JobError(
                ErrorCode.WEBHOOK_FAILED,
                f"CLIPTAG_WEBHOOK_KEYS entry for {shorten(key_id.strip(), 40)!r} is not id=secret",
            )
        keys[key_id.strip()] = secret
    return keys


def signing_secret(config: WorkerSettings, key_id: str | None) -> str:
    """The secret for ``key_id`` (``CLIPTAG_WEBHOOK_KEYS``), or ``CLIPTAG_WEBHOOK_SECRET`` without one.

    Raises:
        JobError: ``webhook_failed`` when no such secret is configured (nothing is sent unsigned).
    """
    if key_id is None:
        if not config.webhook_secret:
            raise JobError(ErrorCode.WEBHOOK_FAILED, "no CLIPTAG_WEBHOOK_SECRET to sign the webhook with")
        return config.webhook_secret
    secret = webhook_keys(config.webhook_keys).get(key_id)
    if secret is None:
        raise JobError(ErrorCode.WEBHOOK_FAILED, f"webhook key id {shorten(key_id, 40)!r} is not configured")
    return secret


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds a ``Retry-After`` header (delta-seconds or an HTTP date) asks to wait."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # isdigit alone takes "²", which float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def classify(response: httpx.Response) -> Outcome:
    """2xx delivered; 408, 429 and 5xx retryable (with their ``Retry-After``); the rest final."""
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(True, False, f"HTTP {status}", status)
    retryable = status in RETRYABLE_STATUSES or status >= 500
    retry_after = (
        parse_retry_after(response.headers.get("Retry-After"), now=time.time()) if retryable else None
    )
    return Outcome(False, retryable, f"HTTP {status} from the receiver", status, retry_after)


def _new_client() -> httpx.Client:
    """A client for webhook POSTs; redirects are not followed (each hop would need the guard)."""
    timeout = httpx.Timeout(settings.webhook_timeout, connect=min(5.0, settings.webhook_timeout))
    return httpx.Client(
        timeout=timeout, follow_redirects=False, trust_env=False, headers={"User-Agent": USER_AGENT}
    )


receivers = ClientsByHost(_new_client)
"""The process's webhook clients, one per receiver name (``worker.http_clients``)."""


def attempt_delivery(delivery: WebhookDelivery) -> Outcome:
    """One POST of the stored result, after the host guard; never raises.

    The POST goes to the address the guard checked (no second DNS answer can redirect it).
    The answer's status and headers decide; its body is never read, so a receiver that
    trickles one cannot hold the attempt past its timeouts.
    """
    try:
        return _post(delivery)
    except Exception as exc:  # a bug or a backend outage: retried, then dead-lettered, never dropped
        log.exception("webhook_attempt_crashed", job_id=delivery.job_id)
        return Outcome(False, True, f"internal error: {type(exc).__name__}: {shorten(str(exc))}")


def _post(delivery: WebhookDelivery) -> Outcome:
    result = stored_result(delivery.job_id)
    if result is None:
        return Outcome(False, False, f"job {delivery.job_id!r} has no stored result to deliver")
    url = delivery.webhook.url
    try:
        addresses = guard_url(url, fetch_policy(settings))
        secret = signing_secret(settings, delivery.webhook.key_id)
    except JobError as error:
        return Outcome(False, error.retryable, f"[{error.code.value}] {error.message}")
    body = json.dumps(result, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(body, secret),
        JOB_ID_HEADER: delivery.job_id,
    }
    if delivery.webhook.key_id is not None:
        headers[KEY_ID_HEADER] = delivery.webhook.key_id
    client, request = receivers.request("POST", url, addresses, content=body, headers=headers)
    try:
        with closing(client.send(request, stream=True)) as response:
            return classify(response)
    except httpx.TimeoutException as exc:
        return Outcome(False, True, f"timed out: {type(exc).__name__}")
    except httpx.TransportError as exc:
        return Outcome(False, True, f"connection failed: {type(exc).__name__}: {shorten(str(exc))}")


def next_countdown(delivery: WebhookDelivery, outcome: Outcome) -> float:
    """Backoff with jitter before the next attempt; at least what ``Retry-After`` asked."""
    backoff = backoff_delay(
        delivery.attempt - 1,
        base=RETRY_BASE_SECONDS,
        cap=countdown_cap(settings.visibility_timeout, RETRY_CAP_SECONDS),
    )
    return max(backoff, min(outcome.retry_after or 0.0, MAX_RETRY_AFTER_SECONDS))


def enqueue(delivery: WebhookDelivery) -> None:
    """Send ``delivery`` to the webhook queue and mark the job's webhook ``queued``. The send
    waits out a Redis outage as every message the worker sends does
    (``producer.celery_conf.PUBLISH_RETRY_POLICY``)."""
    deliver_webhook.apply_async(args=[delivery.model_dump(mode="json")], queue=WEBHOOK_QUEUE)
    broker_redis().set(webhook_state_key(delivery.job_id), "queued", nx=True, ex=settings.result_ttl)


def _dead_letter(delivery: WebhookDelivery, outcome: Outcome) -> None:
    message = f"webhook to {redact_url(delivery.webhook.url)} failed after {delivery.attempt} attempt(s): "
    dead_letters().add(
        DeadLetter(
            job_id=delivery.job_id,
            kind="webhook",
            job=delivery.model_dump(mode="json"),
            error=ErrorInfo(
                code=ErrorCode.WEBHOOK_FAILED, message=message + outcome.detail, retryable=outcome.retryable
            ),
            attempts=delivery.attempt,
            queue=delivery.queue,
            first_failed_at=delivery.first_attempt_at,
        )
    )
    broker_redis().set(webhook_state_key(delivery.job_id), "failed", ex=settings.result_ttl)


RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def release_lock(redis: Redis, lock: str, token: str) -> None:
    """Delete ``lock`` if it still holds ``token``: a POST that outlived its lock must not free
    the lock of the copy that took it over."""
    redis.eval(RELEASE_LOCK, 1, lock, token)


def _delivered_already(redis: Redis, job_id: str) -> bool:
    """Whether ``job_id``'s webhook is marked delivered (logged: this message is a duplicate)."""
    if redis.get(webhook_state_key(job_id)) != "delivered":
        return False
    log.info("webhook_duplicate", job_id=job_id)
    return True


@app.task(name=WEBHOOK_TASK_NAME, bind=True, acks_late=True, max_retries=None, ignore_result=True)
def deliver_webhook(self: Task, document: Any) -> dict[str, Any]:
    """Make one attempt at delivering ``document`` (a ``WebhookDelivery``); returns what happened."""
    delivery = WebhookDelivery.model_validate(document)
    report: dict[str, Any] = {"job_id": delivery.job_id, "attempt": delivery.attempt}
    redis = broker_redis()
    if _delivered_already(redis, delivery.job_id):
        return {**report, "status": "duplicate"}
    lock = webhook_lock_key(delivery.job_id)
    token = uuid.uuid4().hex
    if not redis.set(lock, token, nx=True, ex=int(3 * settings.webhook_timeout) + 10):
        # Another copy is POSTing, or died POSTing (its lock outlives a short visibility
        # timeout): look again once the lock has expired, never drop the delivery.
        countdown = max(1.0, float(redis.ttl(lock)))
        log.info("webhook_busy", job_id=delivery.job_id, countdown=countdown)
        raise self.retry(countdown=countdown)
    try:
        if _delivered_already(redis, delivery.job_id):  # by the lock's last holder
            return {**report, "status": "duplicate"}
        outcome = attempt_delivery(delivery)
        if outcome.delivered:
            redis.set(webhook_state_key(delivery.job_id), "delivered", ex=settings.result_ttl)
    finally:
        release_lock(redis, lock, token)
    report.update(http_status=outcome.status, detail=outcome.detail)
    if outcome.delivered:
        log.info("webhook_delivered", job_id=delivery.job_id, attempt=delivery.attempt, status=outcome.status)
        return {**report, "status": "delivered"}
    if outcome.retryable and delivery.attempt < settings.webhook_max_attempts:
        countdown = next_countdown(delivery, outcome)
        log.info(
            "webhook_retry",
            job_id=delivery.job_id,
            attempt=delivery.attempt,
            detail=outcome.detail,
            countdown=round(countdown, 3),
        )
        following = delivery.model_copy(update={"attempt": delivery.attempt + 1})
        raise self.retry(args=[following.model_dump(mode="json")], countdown=countdown)
    log.warning("webhook_failed", job_id=delivery.job_id, attempt=delivery.attempt, detail=outcome.detail)
    _dead_letter(delivery, outcome)
    return {**report, "status": "failed"}
