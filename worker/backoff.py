"""Retry delays: exponential backoff with jitter, kept short of the broker's visibility timeout."""

from __future__ import annotations

import random


def backoff_delay(retries: int, *, base: float, cap: float) -> float:
    """Seconds before retry number ``retries + 1``: "equal jitter" exponential backoff.

    The ceiling ``min(cap, base × 2^retries)`` doubles per retry; the delay is uniform in
    its upper half, so retries spread out (no thundering herd) yet never bunch up at zero.

    Args:
        retries: retries already made (0 before the first retry).
        base: the first ceiling, in seconds.
        cap: the largest delay, in seconds.
    """
    ceiling = min(cap, base * 2 ** min(retries, 32))
    return random.uniform(ceiling / 2, ceiling)


def countdown_cap(visibility_timeout: float, cap: float) -> float:
    """The longest countdown a retry may use: ``cap``, but at most a third of the timeout.

    A retried message waits in the worker unacknowledged until its countdown ends; a third
    of the visibility timeout keeps it far from being handed to a second worker.
    """
    return max(0.1, min(cap, visibility_timeout / 3))
