"""Turn an image reference into bytes: local paths under configured roots, inline data URLs.

Every failure raises :class:`producer.errors.JobError` with a stable code.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
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
        allowed_hosts: host names (lower case) exempt from the private-address guard.
        allow_private: turn the private-address guard off (development only).
    """

    max_bytes: int = 20 * 1024 * 1024
    local_roots: tuple[Path, ...] = ()
    allowed_hosts: frozenset[str] = frozenset()
    allow_private: bool = False


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local (cloud metadata), multicast, reserved, unspecified."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def guard_url(url: str, policy: FetchPolicy) -> None:
    """Refuse ``url`` unless its host resolves only to public addresses or is allowlisted.

    Raises:
        JobError: ``forbidden_host`` naming the host, or ``fetch_failed`` when it does not resolve.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if not host:
        raise JobError(ErrorCode.INVALID_REQUEST, f"{shorten(url)!r} has no host")
    if policy.allow_private or host in policy.allowed_hosts:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise JobError(ErrorCode.FETCH_FAILED, f"host {shorten(host)!r} does not resolve") from None
    for *_, sockaddr in infos:
        if not is_public_address(str(sockaddr[0])):
            raise JobError(
                ErrorCode.FORBIDDEN_HOST,
                f"host {shorten(host)!r} resolves to non-public address {sockaddr[0]} "
                "(allow it with CLIPTAG_ALLOWED_HOSTS)",
            )


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
