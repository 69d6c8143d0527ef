"""Stored label sets on the worker: each set's label embeddings, computed once per version.

Every job naming a ``label_set`` costs one version read from the store (a Redis
``HGET``). A version the worker has not seen yet is loaded and encoded once, through the
batcher, in chunks so that image batches keep running in between; jobs of the set then
score their images against the cached rows and add no text work to their batches.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import structlog

from producer.contract import DEFAULT_TEMPLATE
from producer.errors import ErrorCode, JobError, shorten
from worker.batcher import LabelPrompts
from worker.prompts import label_prompts

if TYPE_CHECKING:  # the store module imports redis, which the engine modules do not
    from producer.labelsets import StoredLabelSet

log = structlog.get_logger("cliptag.worker")

MAX_CACHED_LABEL_SETS = 32
"""Label sets whose embeddings a worker keeps (least recently used go first)."""
ENCODE_CHUNK_PROMPTS = 2048
"""Prompts per text-only batch when a set is encoded, so image batches run in between."""

T = TypeVar("T")

LabelEncoder = Callable[[Sequence[LabelPrompts]], np.ndarray]
"""Encodes labels (each a tuple of prompts) into one normalized row per label."""


class LabelSetSource(Protocol):
    """Where label sets are stored (:class:`producer.labelsets.LabelSetStore`)."""

    def version(self, name: str) -> int | None: ...

    def get(self, name: str) -> StoredLabelSet | None: ...


@dataclass(frozen=True)
class ResolvedLabelSet:
    """A stored set ready for scoring.

    Attributes:
        name, version: which set, and which version of it.
        labels: its labels in order.
        embeddings: one normalized row per label (templates and prompts ensembled).
    """

    name: str
    version: int
    labels: tuple[str, ...]
    embeddings: np.ndarray


class LabelSetCache:
    """Resolves label-set names to embeddings, never serving an outdated version.

    Args:
        source: the label-set store.
        encode: turns labels' prompts into embeddings (the pipeline runs it on the batcher).
        max_sets: the most sets kept.
    """

    def __init__(
        self, source: LabelSetSource, encode: LabelEncoder, *, max_sets: int = MAX_CACHED_LABEL_SETS
    ) -> None:
        self.source = source
        self.encode = encode
        self.max_sets = max_sets
        self._sets: OrderedDict[str, ResolvedLabelSet] = OrderedDict()
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.loads = 0

    def resolve(self, name: str) -> ResolvedLabelSet:
        """The current version of set ``name``.

        Raises:
            JobError: ``unknown_label_set`` when no such set is stored; ``internal``
                (retryable) when the store or the encoding failed.
        """
        version = self._guarded(name, lambda: self.source.version(name))
        if version is None:
            raise JobError(ErrorCode.UNKNOWN_LABEL_SET, f"no label set named {shorten(name, 100)!r}")
        cached = self._cached(name)
        if cached is not None and cached.version == version:
            return cached
        with self._load_lock:  # one load at a time; a job of a cached set never waits for it
            cached = self._cached(name)
            if cached is not None and cached.version >= version:
                return cached
            resolved = self._guarded(name, lambda: self._load(name))
            with self._lock:
                self._sets[name] = resolved
                self._sets.move_to_end(name)
                while len(self._sets) > self.max_sets:
                    self._sets.popitem(last=False)
            return resolved

    def _cached(self, name: str) -> ResolvedLabelSet | None:
        with self._lock:
            cached = self._sets.get(name)
            if cached is not None:
                self._sets.move_to_end(name)
            return cached

    def _load(self, name: str) -> ResolvedLabelSet:
        started = time.perf_counter()
        stored = self.source.get(name)
        if stored is None:
            raise JobError(ErrorCode.UNKNOWN_LABEL_SET, f"no label set named {shorten(name, 100)!r}")
        prompts = label_prompts(stored.labels, stored.template or DEFAULT_TEMPLATE, stored.prompts)
        embeddings = np.concatenate([self.encode(chunk) for chunk in _chunks(prompts, ENCODE_CHUNK_PROMPTS)])
        self.loads += 1
        log.info(
            "label_set_loaded",
            label_set=name,
            version=stored.version,
            labels=len(stored.labels),
            prompts=sum(len(label) for label in prompts),
            load_ms=round((time.perf_counter() - started) * 1000.0, 2),
        )
        return ResolvedLabelSet(
            name=name, version=stored.version, labels=tuple(stored.labels), embeddings=embeddings
        )

    @staticmethod
    def _guarded(name: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except JobError:
            raise
        except Exception as exc:  # Redis down, a failed text forward: transient for the job
            raise JobError(
                ErrorCode.INTERNAL,
                f"label set {shorten(name, 100)!r}: {type(exc).__name__}: {shorten(str(exc))}",
                retryable=True,
            ) from exc


def _chunks(labels: Sequence[LabelPrompts], max_prompts: int) -> Iterator[Sequence[LabelPrompts]]:
    """Consecutive runs of labels holding at most ``max_prompts`` prompts (at least one label)."""
    start, count = 0, 0
    for index, label in enumerate(labels):
        if count and count + len(label) > max_prompts:
            yield labels[start:index]
            start, count = index, 0
        count += len(label)
    if start < len(labels):
        yield labels[start:]
