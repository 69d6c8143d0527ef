"""What every ``cliptag`` sub-command shares: the error console and the broker option."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from producer.config import QueueSettings

console = Console(stderr=True)
"""Progress, warnings and errors go to stderr, so stdout stays clean for JSON output."""

RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", envvar="CLIPTAG_REDIS_URL", help="Broker URL.", show_default=False),
]


def settings_for(redis_url: str | None) -> QueueSettings:
    """The deployment's settings, with ``--redis-url`` over ``CLIPTAG_REDIS_URL`` when given."""
    return QueueSettings(**({"redis_url": redis_url} if redis_url else {}))
