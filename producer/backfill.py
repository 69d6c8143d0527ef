"""Backfills: expand directories and ``s3://`` prefixes into image references, resumably.

A backfill of millions of existing images must survive being interrupted: every job
submitted is appended to a record file, and a rerun with the same record skips what it
already holds. Job ids are derived from the references, so a job enqueued just before
a crash (and not yet recorded) is recognised as the same job when it is sent again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from producer.errors import CliptagError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def list_s3_prefix(uri: str, *, recursive: bool, endpoint_url: str | None = None) -> Iterator[str]:
    """``s3://bucket/key`` of every image under ``uri``, page by page (boto3's paginator).

    Args:
        uri: ``s3://bucket/prefix/``.
        recursive: descend into "sub-directories" (keys with further ``/``).
        endpoint_url: an S3-compatible endpoint instead of AWS.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    options: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if not recursive:
        options["Delimiter"] = "/"
    try:
        client = boto3.client("s3", endpoint_url=endpoint_url)
        for page in client.get_paginator("list_objects_v2").paginate(**options):
            for entry in page.get("Contents", []):
                if Path(entry["Key"]).suffix.lower() in IMAGE_SUFFIXES:
                    yield f"s3://{bucket}/{entry['Key']}"
    except (BotoCoreError, ClientError) as exc:
        raise CliptagError(f"listing {uri} failed: {exc}") from None


def list_directory(directory: Path, *, recursive: bool) -> Iterator[str]:
    """Absolute paths of the images in ``directory``, sorted, optionally recursively."""
    pattern = "**/*" if recursive else "*"
    for path in sorted(directory.glob(pattern)):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            yield str(path.resolve())


def expand_sources(
    sources: Iterable[str], *, recursive: bool, s3_endpoint_url: str | None = None
) -> Iterator[str]:
    """Image references from a mix of references, local directories and ``s3://…/`` prefixes.

    An ``s3://`` source ending in ``/`` is a prefix to list; a local directory is listed; a
    local file is made absolute, as listed files are (so ``photos/a.jpg`` and ``photos/``
    name it alike, in jobs and in the resume record); anything else is passed through as
    one reference.
    """
    for source in sources:
        if source.startswith("s3://") and source.endswith("/"):
            yield from list_s3_prefix(source, recursive=recursive, endpoint_url=s3_endpoint_url)
        elif Path(source).is_dir():
            yield from list_directory(Path(source), recursive=recursive)
        elif Path(source).is_file():
            yield str(Path(source).resolve())
        else:
            yield source


def backfill_job_id(references: Iterable[str], options: dict[str, Any]) -> str:
    """A job id that is the same whenever the same references are submitted with the same options."""
    canonical = json.dumps({"images": list(references), "options": options}, sort_keys=True)
    return f"bf-{hashlib.sha256(canonical.encode()).hexdigest()[:32]}"


class SubmissionRecord:
    """An append-only JSON-lines file of submitted jobs: ``{"job_id": …, "images": […]}``.

    Args:
        path: the record file; ``None`` keeps nothing (no resume).

    Raises:
        CliptagError: a line of the file is not a record entry (not such a record).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done: set[str] = set()
        if path is not None and path.exists():
            self._read(path)
        self._file = path.open("a", encoding="utf-8") if path is not None else None

    def _read(self, path: Path) -> None:
        """Load ``path``'s entries; an unterminated last line (a write cut short by a crash)
        is cut off the file: its chunk is sent again under the same job id, a no-op."""
        data = path.read_bytes()
        complete, _, torn = data.rpartition(b"\n")
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if line.strip():
                self.done.update(_entry_images(line, path=path, number=number))
        if torn:
            with path.open("r+b") as file:
                file.truncate(len(data) - len(torn))

    def add(self, job_id: str, images: list[str]) -> None:
        """Record one submitted job, flushed at once so a crash loses nothing recorded."""
        self.done.update(images)
        if self._file is not None:
            self._file.write(json.dumps({"job_id": job_id, "images": images}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> SubmissionRecord:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _entry_images(line: str, *, path: Path, number: int) -> list[str]:
    try:
        images = json.loads(line)["images"]
        if isinstance(images, list) and all(isinstance(image, str) for image in images):
            return images
        raise TypeError("its images are not a list of strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise CliptagError(f"{path} line {number} is not a submission record ({exc})") from None


def chunked(references: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of up to ``size`` references (``size`` ≤ 1 gives one reference per list)."""
    chunk: list[str] = []
    for reference in references:
        chunk.append(reference)
        if len(chunk) >= max(1, size):
            yield chunk
            chunk = []
    if chunk:
        yield chunk
