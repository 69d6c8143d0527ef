"""The limits every image fetch obeys, and the guard against fetching private addresses (SSRF)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from producer.errors import ErrorCode, JobError, shorten

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, kw_only=True)
class FetchPolicy:
    """Limits that apply to every fetch.

    Attributes:
        max_bytes: the largest image accepted, downloaded or read.
        local_roots: resolved directories that local paths must lie under.
        allowed_hosts: host names (lower case) exempt from the private-address guard.
        allow_private: turn the private-address guard off (development only).
        connect_timeout: seconds to wait for a connection (http(s) and S3).
        read_timeout: seconds to wait for each read of a response (http(s) and S3).
        total_timeout: seconds one http(s) download may take in all, redirects included
            (bounds servers that trickle bytes just faster than ``read_timeout``).
        max_redirects: redirects followed per http(s) fetch, each hop guarded again.
        s3_endpoint_url: an S3-compatible endpoint instead of AWS's, or ``None``.
    """

    max_bytes: int = 20 * 1024 * 1024
    local_roots: tuple[Path, ...] = ()
    allowed_hosts: frozenset[str] = frozenset()
    allow_private: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    total_timeout: float = 60.0
    max_redirects: int = 3
    s3_endpoint_url: str | None = None

    def trusts(self, host: str) -> bool:
        """Whether ``host`` (as it appears in a URL) skips the private-address guard."""
        return self.allow_private or normalize_host(host) in self.allowed_hosts


def normalize_host(host: str) -> str:
    """``host`` as the allowlist compares it: lower case, without a trailing dot."""
    return host.lower().rstrip(".")


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local (cloud metadata), multicast, reserved, unspecified."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def redact_url(url: str) -> str:
    """``url`` for an error message: no user name, password, query or fragment, and shortened.

    Query strings carry signatures (presigned URLs) and user info carries passwords, so
    neither ever reaches a result or a log.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return shorten(url.split("?", 1)[0].rpartition("@")[2])
    suffix = "?…" if parts.query else ""
    return shorten(f"{parts.scheme}://{netloc}{parts.path}{suffix}")


def guard_url(url: str, policy: FetchPolicy) -> None:
    """Refuse ``url`` unless its host resolves only to public addresses or is allowlisted.

    Raises:
        JobError: ``invalid_request`` when the URL has no usable host or port,
            ``forbidden_host`` naming the host, or ``fetch_failed`` when it does not resolve.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise JobError(ErrorCode.INVALID_REQUEST, f"{redact_url(url)!r} is not a valid URL") from None
    host = normalize_host(parts.hostname or "")
    if not host:
        raise JobError(ErrorCode.INVALID_REQUEST, f"{redact_url(url)!r} has no host")
    if policy.trusts(host):
        return
    try:
        infos = socket.getaddrinfo(
            host, port or DEFAULT_PORTS.get(parts.scheme.lower(), 443), type=socket.SOCK_STREAM
        )
    except (socket.gaierror, UnicodeError):
        raise JobError(ErrorCode.FETCH_FAILED, f"host {shorten(host)!r} does not resolve") from None
    for *_, sockaddr in infos:
        check_address(host, str(sockaddr[0]))


def check_address(host: str, address: str) -> None:
    """Refuse ``address`` (what ``host`` resolved or connected to) unless it is public.

    Raises:
        JobError: ``forbidden_host`` naming the host and the address.
    """
    if not is_public_address(address):
        raise JobError(
            ErrorCode.FORBIDDEN_HOST,
            f"host {shorten(host)!r} resolves to non-public address {address} "
            "(allow it with CLIPTAG_ALLOWED_HOSTS)",
        )
