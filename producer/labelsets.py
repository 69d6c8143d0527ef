"""Named label sets, stored in Redis with a version (``cliptag labels``; jobs say ``label_set``).

A set is its labels plus, optionally, templates and per-label prompts. Every ``put``
gives the set a new version, larger than any it had before, even across a ``delete``:
a worker caches each set's text embeddings by (name, version) and checks the version
(one ``HGET``) for every job, so it never serves a stale definition.

Keys (``prefix`` defaults to ``cliptag:labelsets``):
``{prefix}:set:{name}`` a hash of ``version``, ``definition`` (JSON), ``updated_at``;
``{prefix}:names`` the set of stored names; ``{prefix}:versions`` the last version
issued per name (kept after a delete).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from producer.contract import (
    LABEL_SET_NAME_PATTERN,
    MAX_LABELS_DEFAULT,
    check_label_prompts,
    check_template,
    check_texts,
)
from producer.errors import shorten

LABEL_SET_PREFIX = "cliptag:labelsets"
REDIS_TIMEOUT_S = 5.0
"""Socket timeouts of the store's Redis connection, so a job never hangs on a lost Redis."""

_PUT_SCRIPT = """
local version = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], 'version', version, 'definition', ARGV[2], 'updated_at', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
return version
"""


def read_label_file(path: Path) -> list[str]:
    """The labels in a text file: one per line; blank lines and ``#`` comments skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class LabelSetDefinition(BaseModel):
    """What a label set holds.

    Attributes:
        labels: the labels in order (distinct, non-blank, at most ``max_labels`` of the
            validation context, by default ``CLIPTAG_MAX_LABELS``).
        template: one template, ``"ensemble:NAME"`` or a list of either; ``None`` means
            the default ``"a photo of a {}."``.
        prompts: per-label prompts used instead of the templates, ``{label: [prompt, …]}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[str]
    template: str | list[str] | None = None
    prompts: dict[str, list[str]] | None = None

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str], info: ValidationInfo) -> list[str]:
        context = info.context or {}
        return check_texts("labels", labels, limit=int(context.get("max_labels", MAX_LABELS_DEFAULT)))

    _template = field_validator("template")(check_template)

    @model_validator(mode="after")
    def _prompts(self) -> LabelSetDefinition:
        if self.prompts is not None:
            check_label_prompts(self.prompts, self.labels)
        return self


class StoredLabelSet(LabelSetDefinition):
    """A label set as stored: its definition, name, version and last change (unix time)."""

    name: str = Field(pattern=LABEL_SET_NAME_PATTERN)
    version: int
    updated_at: float


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class LabelSetStore:
    """Label sets in Redis.

    Args:
        client: a redis-py client (``decode_responses`` either way).
        prefix: the key prefix; one deployment shares one prefix.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = LABEL_SET_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self.names_key = f"{prefix}:names"
        self.versions_key = f"{prefix}:versions"
        self._put = client.register_script(_PUT_SCRIPT)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = LABEL_SET_PREFIX) -> LabelSetStore:
        """A store on the Redis at ``url`` (normally ``CLIPTAG_REDIS_URL``)."""
        client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        return cls(client, prefix=prefix)

    def _key(self, name: str) -> str:
        return f"{self.prefix}:set:{name}"

    def put(self, name: str, definition: LabelSetDefinition) -> StoredLabelSet:
        """Create or replace ``name``; the stored set, with its new version.

        Raises:
            ValueError: ``name`` is not a valid label-set name.
        """
        _check_name(name)
        updated_at = time.time()
        document = definition.model_dump_json(exclude_none=True)
        version = self._put(
            keys=[self._key(name), self.versions_key, self.names_key], args=[name, document, updated_at]
        )
        return StoredLabelSet(
            **definition.model_dump(), name=name, version=int(version), updated_at=updated_at
        )

    def version(self, name: str) -> int | None:
        """The current version of ``name``, or ``None`` when no such set is stored."""
        raw = self.client.hget(self._key(name), "version")
        return None if raw is None else int(raw)

    def get(self, name: str) -> StoredLabelSet | None:
        """The stored set ``name`` (definition and version read together), or ``None``."""
        version, definition, updated_at = self.client.hmget(
            self._key(name), ["version", "definition", "updated_at"]
        )
        if version is None or definition is None:
            return None
        document: dict[str, Any] = json.loads(_text(definition))
        # The set was validated against the writer's CLIPTAG_MAX_LABELS when it was put.
        return StoredLabelSet.model_validate(
            {**document, "name": name, "version": int(version), "updated_at": float(updated_at or 0)},
            context={"max_labels": sys.maxsize},
        )

    def list(self) -> list[StoredLabelSet]:
        """Every stored set, by name."""
        names = sorted(_text(name) for name in self.client.smembers(self.names_key))
        found = (self.get(name) for name in names)
        return [stored for stored in found if stored is not None]

    def delete(self, name: str) -> bool:
        """Remove ``name``; whether it was there. Its version counter is kept, so a set put
        again under the same name never reuses a version a worker may have cached."""
        pipe = self.client.pipeline()
        pipe.delete(self._key(name))
        pipe.srem(self.names_key, name)
        removed, _ = pipe.execute()
        return bool(removed)


def _check_name(name: str) -> None:
    if not re.fullmatch(LABEL_SET_NAME_PATTERN, name):
        raise ValueError(
            f"label set name {shorten(name, 60)!r} must match {LABEL_SET_NAME_PATTERN} "
            "(letters, digits and . _ : @ -, at most 100 characters)"
        )
