"""The limits every image fetch obeys, and the guard against fetching private addresses (SSRF)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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


NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
"""The well-known NAT64 prefix: its last 32 bits are the IPv4 address it reaches."""


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local (cloud metadata), multicast, reserved, unspecified,
    and for IPv6 addresses that carry such an IPv4 address (mapped, NAT64, 6to4, Teredo,
    IPv4-compatible), which reach it through a translator or tunnel."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    embedded = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if embedded is not None:
        ip = embedded
    return ip.is_global and not ip.is_multicast


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms that embed one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64_PREFIX or (int(ip) >> 32 == 0 and int(ip) > 1):  # NAT64; ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


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


def guard_url(url: str, policy: FetchPolicy) -> list[str]:
    """Refuse ``url`` unless its host resolves only to public addresses or is allowlisted.

    Returns:
        The addresses the host resolved to, each checked; none for an allowlisted host
        (not looked up) or with the guard off.

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
        return []
    try:
        infos = socket.getaddrinfo(
            host, port or DEFAULT_PORTS.get(parts.scheme.lower(), 443), type=socket.SOCK_STREAM
        )
    except (socket.gaierror, UnicodeError):
        raise JobError(ErrorCode.FETCH_FAILED, f"host {shorten(host)!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in infos))
    for address in addresses:
        check_address(host, address)
    return addresses


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


@dataclass(frozen=True)
class PinnedUrl:
    """A request sent straight to an address the guard checked, so that a second DNS answer
    for the connection cannot send it elsewhere (DNS rebinding).

    Attributes:
        url: the URL with its host replaced by the address (user info and port kept).
        host: the ``Host`` header: the name and port of the original URL.
        extensions: httpx request extensions; for https the name for TLS (SNI and the
            certificate check), which would otherwise be checked against the address.
    """

    url: str
    host: str
    extensions: dict[str, str]


def pin(url: str, address: str) -> PinnedUrl:
    """``url`` sent to ``address`` (one that :func:`guard_url` returned for it)."""
    parts = urlsplit(url)
    name = parts.hostname or ""
    if not name.isascii():  # headers and SNI carry the IDNA form, as httpx would send it
        name = name.encode("idna").decode("ascii")
    port = f":{parts.port}" if parts.port is not None else ""
    userinfo = parts.netloc.rpartition("@")[0]
    literal = f"[{address}]" if ":" in address else address
    netloc = f"{userinfo}@{literal}{port}" if userinfo else f"{literal}{port}"
    extensions = {"sni_hostname": name} if parts.scheme.lower() == "https" else {}
    host = f"[{name}]" if ":" in name else name
    return PinnedUrl(urlunsplit(parts._replace(netloc=netloc)), f"{host}{port}", extensions)
