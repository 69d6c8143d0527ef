"""Turn an image reference into bytes: local paths under configured roots, inline data URLs.

Every failure raises :class:`producer.errors.JobError` with a stable code.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from producer.errors import ErrorCode, JobError, shorten


@dataclass(frozen=True, kw_only=True)
class FetchPolicy:
    """Limits that apply to every fetch.

    Attributes:
        max_bytes: the largest image accepted, downloaded or read.
        local_roots: resolved directories that local paths must lie under.
    """

    max_bytes: int = 20 * 1024 * 1024
    local_roots: tuple[Path, ...] = ()


class Fetcher:
    """Reads image references allowed by ``policy``; safe to share between threads."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy

    def fetch(self, reference: str) -> bytes:
        """The bytes ``reference`` names, or a ``JobError`` saying why not."""
        if reference.startswith("data:"):
            return self._inline(reference)
        scheme = urlsplit(reference).scheme.lower()
        if scheme == "file":
            return self._local(unquote(urlsplit(reference).path))
        if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            return self._local(reference)
        raise JobError(ErrorCode.UNSUPPORTED_SCHEME, f"unsupported reference scheme {scheme!r}")

    def close(self) -> None:
        """Release connections (nothing to release for local files)."""

    def _inline(self, reference: str) -> bytes:
        header, _, payload = reference.partition(",")
        if not header.endswith(";base64"):
            raise JobError(ErrorCode.INVALID_REQUEST, "inline images must be data:…;base64, URLs")
        if len(payload) * 3 // 4 > self.policy.max_bytes:
            raise JobError(ErrorCode.TOO_LARGE, f"inline image exceeds {self.policy.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise JobError(ErrorCode.INVALID_REQUEST, "inline image is not valid base64") from None

    def _local(self, raw_path: str) -> bytes:
        path = Path(raw_path)
        if not self.policy.local_roots:
            raise JobError(ErrorCode.FORBIDDEN_PATH, "local paths are disabled (set CLIPTAG_LOCAL_ROOTS)")
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in self.policy.local_roots):
            raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shorten(raw_path)!r} is outside CLIPTAG_LOCAL_ROOTS")
        try:
            info = resolved.stat()
        except FileNotFoundError:
            raise JobError(ErrorCode.FETCH_NOT_FOUND, f"no file at {shorten(raw_path)!r}") from None
        if not stat.S_ISREG(info.st_mode):
            raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shorten(raw_path)!r} is not a regular file")
        if info.st_size > self.policy.max_bytes:
            raise JobError(
                ErrorCode.TOO_LARGE,
                f"{shorten(raw_path)!r} is {info.st_size} bytes, over {self.policy.max_bytes}",
            )
        return resolved.read_bytes()
