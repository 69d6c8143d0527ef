"""Webhook signatures: HMAC-SHA256 over ``timestamp.body``, and the check receivers run.

A worker POSTs a result with the header::

    Cliptag-Signature: t=1718000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd

``t`` is the unix time of signing; ``v1`` is the lowercase hex HMAC-SHA256, keyed with the
shared secret, of the ASCII timestamp, a ``.``, and the exact body bytes. A receiver
recomputes it over the raw body it received (before any JSON parsing), compares in
constant time, and rejects timestamps outside its tolerance, so a captured request
cannot be replayed later. See docs/delivery.md.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable

from producer.errors import CliptagError, shorten

SIGNATURE_HEADER = "Cliptag-Signature"
KEY_ID_HEADER = "Cliptag-Key-Id"
JOB_ID_HEADER = "Cliptag-Job-Id"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300.0


class SignatureError(CliptagError):
    """A webhook request failed verification; the message says why."""


def compute_signature(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``f"{timestamp}.".encode() + body`` keyed with ``secret``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str | bytes, *, timestamp: int | None = None) -> str:
    """The ``Cliptag-Signature`` header value for ``body``.

    Args:
        body: the exact bytes that are POSTed.
        secret: the shared secret.
        timestamp: unix seconds; now when ``None``.
    """
    signed_at = int(time.time()) if timestamp is None else timestamp
    return f"t={signed_at},{SCHEME}={compute_signature(secret, signed_at, body)}"


def parse_header(header: str) -> tuple[int, list[str]]:
    """The timestamp and the ``v1`` signatures of a ``Cliptag-Signature`` value."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():  # isdigit alone takes "²"
            timestamp = int(value)
        elif name == SCHEME and value.isascii() and value:  # compare_digest refuses non-ASCII str
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError(f"malformed {SIGNATURE_HEADER} header {shorten(header, 80)!r}")
    return timestamp, signatures


def verify_signature(
    body: bytes,
    header: str | None,
    secrets: str | bytes | Iterable[str | bytes],
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> int:
    """Check a webhook request; return its signing timestamp.

    Args:
        body: the raw request body, exactly as received.
        header: the ``Cliptag-Signature`` header value (``None`` when it was missing).
        secrets: the secret, or several (during a key rotation any one may match).
        tolerance: the most seconds the signing time may differ from ``now`` (replay window).
        now: the current unix time; the clock when ``None``.

    Raises:
        SignatureError: the header is missing or malformed, the timestamp is outside the
            tolerance, or no secret reproduces the signature (a forged or altered body).
    """
    if not header:
        raise SignatureError(f"the {SIGNATURE_HEADER} header is missing")
    timestamp, signatures = parse_header(header)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(
            f"signature timestamp {timestamp} is {abs(current - timestamp):.0f} s from now, "
            f"outside the tolerance of {tolerance:.0f} s"
        )
    keys = [secrets] if isinstance(secrets, str | bytes) else list(secrets)
    for secret in keys:
        expected = compute_signature(secret, timestamp, body)
        if any(hmac.compare_digest(expected, candidate) for candidate in signatures):
            return timestamp
    raise SignatureError("no secret reproduces the signature: the body was altered or the key is wrong")
