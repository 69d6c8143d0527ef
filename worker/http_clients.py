"""httpx clients kept per host name, for requests sent to the address the guard checked.

A request pinned to an address (``worker.fetch_policy.pin``) has that address as its URL's
host, so httpx pools its connection under the address. Two names served from one address
(a CDN, a shared receiver) would then share TLS connections made for one of them; one
client per name keeps their connections apart.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from worker.fetch_policy import PinnedUrl, pin

KEPT = 64
"""Host names whose clients (and their open connections) are kept; the least recently used
beyond that is closed."""


class ClientsByHost:
    """One client per host name from ``factory``, the ``keep`` most recently used kept open.

    Args:
        factory: makes a client (timeouts, headers, no redirects, no proxies).
        keep: how many host names keep their client.
    """

    def __init__(self, factory: Callable[[], httpx.Client], *, keep: int = KEPT) -> None:
        self._factory = factory
        self._keep = keep
        self._clients: OrderedDict[str, httpx.Client] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, host: str) -> httpx.Client:
        """The client for ``host``, made on first use."""
        with self._lock:
            client = self._clients.pop(host, None) or self._factory()
            self._clients[host] = client
            if len(self._clients) > self._keep:
                self._clients.popitem(last=False)[1].close()
            return client

    def request(
        self, method: str, url: str, addresses: Sequence[str], **options: Any
    ) -> tuple[httpx.Client, httpx.Request]:
        """A request for ``url`` sent to the first of ``addresses`` (those ``guard_url``
        checked; with none, as it is), and the client of its host name to send it with.

        Args:
            method: the HTTP method.
            url: the URL as the job or webhook gave it.
            addresses: what the guard resolved the host to and checked.
            options: ``httpx.Client.build_request`` arguments (``headers``, ``content``).
        """
        pinned = pin(url, addresses[0]) if addresses else PinnedUrl(url, "", {})
        headers = dict(options.pop("headers", None) or {})
        if pinned.host:
            headers["Host"] = pinned.host
        client = self.get(urlsplit(url).hostname or "")
        request = client.build_request(
            method, pinned.url, headers=headers, extensions=pinned.extensions, **options
        )
        return client, request

    def close(self) -> None:
        """Close every client kept."""
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
