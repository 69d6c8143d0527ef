"""Configuration shared by producers and workers, read from ``CLIPTAG_*`` variables."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.contract import QUEUE

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class QueueSettings(BaseSettings):
    """Where jobs and results live; every producer and worker of one deployment agrees on these.

    Attributes:
        redis_url: the broker (``CLIPTAG_REDIS_URL``): ``redis://``, ``rediss://`` or
            ``unix://`` (Redis Sentinel is not supported).
        result_backend_url: where results are stored; defaults to ``redis_url``.
        queue: the queue tagging jobs go to by default.
        result_ttl: seconds a result stays readable (default one day).
        visibility_timeout: seconds before a message taken by a worker that died is
            handed to another worker (Redis broker). Keep it well above the time a
            worker holds its prefetched messages.
        max_labels: the largest number of labels (or texts) a job may carry.
    """

    model_config = SettingsConfigDict(env_prefix="CLIPTAG_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    result_backend_url: str | None = None
    queue: str = QUEUE
    result_ttl: int = Field(default=86_400, ge=1)
    visibility_timeout: int = Field(default=90, ge=1)
    max_labels: int = Field(default=1000, ge=1)

    @field_validator("redis_url", "result_backend_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.lower().startswith(REDIS_SCHEMES):
            scheme = url.partition("://")[0]
            raise ValueError(f"{scheme!r} URLs are not supported: use {', '.join(REDIS_SCHEMES)}")
        return url

    @property
    def backend_url(self) -> str:
        return self.result_backend_url or self.redis_url
