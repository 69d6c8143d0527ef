"""Download http(s) images: streamed, size-capped, timed, with guarded redirects followed by hand.

Every hop is checked twice against the private-address guard: its host's DNS answers before
connecting, and the address actually connected to before reading the body (a host whose
DNS answer changes between the two, "DNS rebinding", is refused too).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

from producer.errors import ErrorCode, JobError, shorten
from worker.fetch_policy import FetchPolicy, guard_url, redact_url
from worker.http_clients import ClientsByHost

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NOT_FOUND_STATUSES = frozenset({404, 410})
HTTP_SCHEMES = frozenset({"http", "https"})
USER_AGENT = "cliptag-worker"


class HttpSource:
    """Fetches ``http(s)://`` references under ``policy``; safe to share between threads.

    Args:
        policy: size cap, timeouts, redirect limit and the host guard's allowlist.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._clients = ClientsByHost(self._new_client)

    def _new_client(self) -> httpx.Client:
        # Proxy variables are ignored on purpose: requests go to the address the guard
        # checked, which behind a proxy would be the proxy's.
        return httpx.Client(
            timeout=httpx.Timeout(
                connect=self.policy.connect_timeout,
                read=self.policy.read_timeout,
                write=self.policy.read_timeout,
                pool=self.policy.connect_timeout,
            ),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
        )

    def close(self) -> None:
        self._clients.close()

    def fetch(self, url: str) -> bytes:
        """The body at ``url`` after at most ``policy.max_redirects`` redirects.

        Raises:
            JobError: ``unsupported_scheme``, ``forbidden_host``, ``fetch_not_found``,
                ``fetch_refused``, ``fetch_timeout``, ``fetch_failed`` or ``too_large``.
        """
        deadline = time.monotonic() + self.policy.total_timeout
        original = url
        for _ in range(self.policy.max_redirects + 1):
            self._check_deadline(url, deadline)
            scheme = urlsplit(url).scheme.lower()
            if scheme not in HTTP_SCHEMES:
                raise JobError(
                    ErrorCode.UNSUPPORTED_SCHEME, f"redirected to unsupported scheme {shorten(scheme)!r}"
                )
            client, request = self._clients.request("GET", url, guard_url(url, self.policy))
            with translate_http_errors(url):
                response = client.send(request, stream=True)
                try:
                    target = redirect_target(url, response)
                    if target is None:
                        raise_for_status(url, response)
                        return self._read_body(url, response, deadline)
                finally:
                    response.close()
            url = target
        raise JobError(
            ErrorCode.FETCH_REFUSED,
            f"{redact_url(original)!r} redirects more than {self.policy.max_redirects} times",
        )

    def _read_body(self, url: str, response: httpx.Response, deadline: float) -> bytes:
        limit = self.policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise JobError(
                ErrorCode.TOO_LARGE, f"{redact_url(url)!r} declares {declared} bytes, over {limit}"
            )
        # The declared length is only an early refusal: what counts is what arrives.
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > limit:
                raise JobError(ErrorCode.TOO_LARGE, f"{redact_url(url)!r} sent more than {limit} bytes")
            self._check_deadline(url, deadline)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_deadline(self, url: str, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise JobError(
                ErrorCode.FETCH_TIMEOUT, f"{redact_url(url)!r} took more than {self.policy.total_timeout:g} s"
            )


@contextmanager
def translate_http_errors(url: str) -> Iterator[None]:
    """Turn httpx's exceptions into ``JobError``s naming ``url`` (redacted)."""
    try:
        yield
    except httpx.TimeoutException:
        raise JobError(ErrorCode.FETCH_TIMEOUT, f"{redact_url(url)!r} did not answer in time") from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol):
        raise JobError(ErrorCode.INVALID_REQUEST, f"{redact_url(url)!r} is not a valid URL") from None
    except httpx.HTTPError as exc:
        raise JobError(
            ErrorCode.FETCH_FAILED,
            f"fetching {redact_url(url)!r} failed: {type(exc).__name__}: {shorten(str(exc), 80)}",
        ) from None


def redirect_target(url: str, response: httpx.Response) -> str | None:
    """Where a redirect answer points (absolute), or ``None`` when ``response`` is no redirect."""
    if response.status_code not in REDIRECT_STATUSES:
        return None
    location = response.headers.get("location")
    if not location:
        raise JobError(
            ErrorCode.FETCH_REFUSED,
            f"{redact_url(url)!r} answered HTTP {response.status_code} without a Location",
        )
    return str(response.url.join(location))


def raise_for_status(url: str, response: httpx.Response) -> None:
    """Map a non-2xx answer to its error: 404/410 permanent, 429/5xx transient, other 4xx permanent."""
    status = response.status_code
    if 200 <= status < 300:
        return
    where = redact_url(url)
    if status in NOT_FOUND_STATUSES:
        raise JobError(ErrorCode.FETCH_NOT_FOUND, f"{where!r} answered HTTP {status}")
    if status == 429 or status >= 500:
        raise JobError(ErrorCode.FETCH_FAILED, f"{where!r} answered HTTP {status}")
    raise JobError(ErrorCode.FETCH_REFUSED, f"{where!r} answered HTTP {status}")
