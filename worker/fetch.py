"""Turn an image reference into bytes: http(s), s3://, local paths (and file://), data: URLs.

Every failure raises :class:`producer.errors.JobError` with a stable code; see
``docs/inputs.md`` for what each source accepts and refuses.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from producer.errors import ErrorCode, JobError, shorten
from worker.fetch_policy import FetchPolicy, guard_url
from worker.http_source import HttpSource
from worker.local_source import file_url_path, read_inline, read_local
from worker.s3_source import S3Source

__all__ = ["FetchPolicy", "Fetcher", "guard_url", "is_remote"]

REMOTE_SCHEMES = ("http://", "https://", "s3://")


def is_remote(reference: str) -> bool:
    """Whether fetching ``reference`` goes over the network (and may take seconds)."""
    return reference[:8].lower().startswith(REMOTE_SCHEMES)


class Fetcher:
    """Reads image references allowed by ``policy``; safe to share between threads.

    Args:
        policy: the limits every fetch obeys.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._http = HttpSource(policy)
        self._s3 = S3Source(policy)

    def fetch(self, reference: str) -> bytes:
        """The bytes ``reference`` names, or a ``JobError`` saying why not."""
        if reference.startswith("data:"):
            return read_inline(reference, max_bytes=self.policy.max_bytes)
        try:
            scheme = urlsplit(reference).scheme.lower()
        except ValueError:
            raise JobError(
                ErrorCode.INVALID_REQUEST, f"{shorten(reference)!r} is not a valid reference"
            ) from None
        if scheme in ("http", "https"):
            return self._http.fetch(reference)
        if scheme == "s3":
            return self._s3.fetch(reference)
        if scheme == "file":
            return self._local(file_url_path(reference))
        if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            return self._local(reference)
        raise JobError(ErrorCode.UNSUPPORTED_SCHEME, f"unsupported reference scheme {shorten(scheme)!r}")

    def close(self) -> None:
        """Release pooled connections."""
        self._http.close()
        self._s3.close()

    def _local(self, path: str) -> bytes:
        return read_local(path, roots=self.policy.local_roots, max_bytes=self.policy.max_bytes)
