"""Signed webhooks through a real worker and a real HTTP receiver: retries, dead letters, no repeats."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import trustme

from producer.celery_conf import WEBHOOK_QUEUE, WEBHOOK_TASK_NAME
from producer.contract import TASK_NAME
from producer.delivery import WebhookDelivery, webhook_lock_key, webhook_state_key
from producer.signing import SignatureError, sign, verify_signature
from tests.servers import HttpServer, Reply, Request
from tests.waiting import wait_until
from worker.fetch_policy import PinnedUrl, pin
from worker.processes import free_port

SECRETS = {None: "default-secret", "k2": "second-secret"}
WEBHOOK_SETTINGS = {
    "webhook_secret": SECRETS[None],
    "webhook_keys": f"k2={SECRETS['k2']}",
    "allowed_hosts": "127.0.0.1",
}


def headers_of(request: Request) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


def posts_by_job(server: HttpServer) -> Counter[str]:
    return Counter(headers_of(r).get("cliptag-job-id", "") for r in server.requests if r.method == "POST")


def stored(client, job_id: str) -> dict:
    return client.celery.backend.get_task_meta(job_id, cache=False)["result"]


def log_events(worker, event: str) -> list[dict]:
    lines = (line for line in worker.log_text().splitlines() if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


def test_receiver_down_then_up_gets_every_result_once_with_valid_signatures(
    start_worker, client, image_dir: Path
):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    worker = start_worker(**WEBHOOK_SETTINGS)
    images = sorted(image_dir.iterdir())
    key_ids = {}
    for i, path in enumerate(images):
        key_id = "k2" if i % 2 else None
        job = client.submit(str(path), ["cat", "dog"], webhook={"url": url, "key_id": key_id})
        key_ids[job.id] = key_id
    results = {job_id: client.job(job_id).result(timeout=60) for job_id in key_ids}
    wait_until(
        lambda: {e["job_id"] for e in log_events(worker, "webhook_retry")} >= results.keys(),
        timeout=60,
        what="a failed first attempt of every webhook while the receiver is down",
    )
    assert all("connection failed" in e["detail"] for e in log_events(worker, "webhook_retry"))

    with HttpServer(port=port) as receiver:
        receiver.routes["/hook"] = Reply(200, b"ok")
        wait_until(
            lambda: all(client.redis.get(webhook_state_key(j)) == "delivered" for j in results),
            timeout=90,
            what="every webhook delivered once the receiver is up",
        )
        time.sleep(1.0)  # a second POST of any job would show up now
        assert posts_by_job(receiver) == dict.fromkeys(results, 1)
        for request in receiver.requests:
            headers = headers_of(request)
            job_id = headers["cliptag-job-id"]
            key_id = headers.get("cliptag-key-id")
            assert key_id == key_ids[job_id]
            signature = headers["cliptag-signature"]
            signed_at = verify_signature(request.body, signature, SECRETS[key_id])
            assert abs(signed_at - time.time()) < 120
            assert headers["content-type"] == "application/json"
            document = json.loads(request.body)
            assert document == stored(client, job_id)
            assert document["scores"] == [s.model_dump() for s in results[job_id].scores]
            tampered = request.body.replace(b'"status":"ok"', b'"status":"OK"')
            assert tampered != request.body
            with pytest.raises(SignatureError):
                verify_signature(tampered, signature, SECRETS[key_id])
            with pytest.raises(SignatureError):
                verify_signature(request.body, signature, SECRETS[None if key_id else "k2"])
            with pytest.raises(SignatureError, match="tolerance"):
                verify_signature(request.body, signature, SECRETS[key_id], now=signed_at + 3600)


def test_retry_rules_dead_letters_and_no_second_post(start_worker, client, http_server, image_dir: Path):
    """500 is retried, 429 waits for Retry-After, 404 is final; guard and key failures post nothing."""
    arrivals: dict[str, list[float]] = {"/flaky": [], "/busy": []}

    def flaky(request: Request) -> Reply:
        arrivals["/flaky"].append(time.monotonic())
        return Reply(500 if len(arrivals["/flaky"]) == 1 else 204)

    def busy(request: Request) -> Reply:
        arrivals["/busy"].append(time.monotonic())
        if len(arrivals["/busy"]) == 1:
            return Reply(429, b"slow down", {"Retry-After": "2"})
        return Reply(200)

    http_server.routes.update({"/flaky": flaky, "/busy": busy, "/gone": Reply(404, b"no such hook")})
    worker = start_worker(**WEBHOOK_SETTINGS)
    cat = str(image_dir / "cat.jpg")
    hooks = {
        "flaky": {"url": http_server.url("/flaky")},
        "busy": {"url": http_server.url("/busy")},
        "gone": {"url": http_server.url("/gone")},
        "private": {"url": f"http://localhost:{http_server.port}/flaky"},
        "unknown-key": {"url": http_server.url("/flaky"), "key_id": "nope"},
    }
    jobs = {name: client.submit(cat, ["cat", "dog"], webhook=hook) for name, hook in hooks.items()}
    for job in jobs.values():
        assert job.result(timeout=60).status == "ok"
    ids = {name: job.id for name, job in jobs.items()}
    wait_until(
        lambda: all(client.redis.get(webhook_state_key(i)) in ("delivered", "failed") for i in ids.values()),
        timeout=60,
        what="every webhook delivered or dead-lettered",
    )
    states = {name: client.redis.get(webhook_state_key(i)) for name, i in ids.items()}
    assert states == {
        "flaky": "delivered",
        "busy": "delivered",
        "gone": "failed",
        "private": "failed",
        "unknown-key": "failed",
    }
    posts = posts_by_job(http_server)
    assert posts[ids["flaky"]] == 2 and posts[ids["busy"]] == 2
    assert posts[ids["gone"]] == 1, "a 404 is not retried"
    assert posts[ids["private"]] == 0 and posts[ids["unknown-key"]] == 0
    first, second = arrivals["/busy"]
    assert second - first >= 1.9, "the retry after a 429 waits for Retry-After"

    letters = {letter.job_id: letter for letter in client.dead_letters.list(kind="webhook")}
    assert {ids["gone"], ids["private"], ids["unknown-key"]} <= letters.keys()
    assert ids["flaky"] not in letters and ids["busy"] not in letters
    gone = letters[ids["gone"]]
    assert gone.error.code.value == "webhook_failed"
    assert "HTTP 404" in gone.error.message and gone.attempts == 1
    assert gone.queue == client.settings.queue
    assert gone.job["webhook"]["url"] == hooks["gone"]["url"]
    assert "forbidden_host" in letters[ids["private"]].error.message
    assert "'nope'" in letters[ids["unknown-key"]].error.message
    for name in ("gone", "private", "unknown-key"):
        assert stored(client, ids[name])["status"] == "ok", "the result stays in the backend"

    # A crash's duplicates: the tag message and the webhook message of a delivered job again.
    flaky_job = jobs["flaky"]
    document = flaky_job.request.model_dump(mode="json", exclude_none=True)
    client.celery.send_task(TASK_NAME, args=[document], task_id=flaky_job.id, queue=client.settings.queue)
    again = WebhookDelivery(job_id=flaky_job.id, webhook=hooks["flaky"], queue=client.settings.queue)
    client.celery.send_task(WEBHOOK_TASK_NAME, args=[again.model_dump(mode="json")], queue=WEBHOOK_QUEUE)
    wait_until(
        lambda: (
            any(e["job_id"] == flaky_job.id for e in log_events(worker, "job_duplicate"))
            and any(e["job_id"] == flaky_job.id for e in log_events(worker, "webhook_duplicate"))
        ),
        timeout=30,
        what="the duplicate job and webhook messages to be consumed",
    )
    time.sleep(1.0)
    assert posts_by_job(http_server)[flaky_job.id] == 2, "no second POST for a delivered job"

    # The receiver is fixed: `cliptag dlq retry --kind webhook` delivers the stored result.
    http_server.routes["/gone"] = Reply(200)
    retried = subprocess.run(
        [sys.executable, "-m", "producer.cli", "dlq", "retry", ids["gone"], "--kind", "webhook"],
        env={**os.environ, "CLIPTAG_REDIS_URL": client.settings.redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert retried.returncode == 0, retried.stderr
    assert f"requeued webhook {ids['gone']}" in retried.stdout
    wait_until(
        lambda: client.redis.get(webhook_state_key(ids["gone"])) == "delivered",
        timeout=30,
        what="the retried webhook delivered",
    )
    last = [r for r in http_server.requests if headers_of(r).get("cliptag-job-id") == ids["gone"]][-1]
    verify_signature(last.body, headers_of(last)["cliptag-signature"], SECRETS[None])
    assert json.loads(last.body) == stored(client, ids["gone"])
    assert client.dead_letters.get(ids["gone"], kind="webhook") is None


def test_a_lock_left_by_a_dead_copy_delays_the_delivery_and_never_drops_it(
    start_worker, client, http_server, image_dir: Path, queue_name: str
):
    """A copy that died POSTing leaves the lock (it outlives a short visibility timeout); the
    redelivered copy found it "busy" and acked: the webhook was never delivered nor dead-lettered.
    Now it looks again once the lock has expired."""
    http_server.routes["/hook"] = Reply(204)
    start_worker(**WEBHOOK_SETTINGS)
    job_id = f"locked-{queue_name}"
    client.redis.set(webhook_lock_key(job_id), "a dead worker's", ex=3)
    submitted = time.monotonic()
    job = client.submit(
        str(image_dir / "cat.jpg"), ["cat"], job_id=job_id, webhook={"url": http_server.url("/hook")}
    )
    assert job.result(timeout=60).status == "ok"
    wait_until(
        lambda: client.redis.get(webhook_state_key(job_id)) == "delivered", timeout=60, what="the delivery"
    )
    assert posts_by_job(http_server) == {job_id: 1}
    assert time.monotonic() - submitted >= 2.5, "not before the lock expired"


REBINDING_DNS = """
import itertools, socket

import worker.fetch_policy

_real_getaddrinfo = socket.getaddrinfo
_answers = itertools.chain(["192.0.2.1"], itertools.repeat("127.0.0.1"))  # the guard's, then any later
_real_is_public = worker.fetch_policy.is_public_address


def _rebinding(host, port, *args, **kwargs):
    if host != "rebind.example":
        return _real_getaddrinfo(host, port, *args, **kwargs)
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(_answers), port))]


socket.getaddrinfo = _rebinding
# TEST-NET-1 stands for a public address here: unrouted, so nothing is ever sent outside
worker.fetch_policy.is_public_address = lambda address: address == "192.0.2.1" or _real_is_public(address)
"""


def test_a_webhook_name_that_rebinds_to_a_private_address_gets_nothing(
    start_worker, client, http_server, image_dir: Path, tmp_path: Path
):
    """The worker's resolver answers a public address for the guard and 127.0.0.1 for any
    later lookup (a ``sitecustomize`` in the worker process stands in for a hostile DNS).
    The POST goes to the address the guard checked, so nothing reaches 127.0.0.1."""
    dns = tmp_path / "dns"
    dns.mkdir()
    (dns / "sitecustomize.py").write_text(REBINDING_DNS)
    http_server.routes["/hook"] = Reply(204)
    python_path = f"{dns}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    start_worker(env={"PYTHONPATH": python_path}, webhook_max_attempts=1, **WEBHOOK_SETTINGS)
    url = f"http://rebind.example:{http_server.port}/hook"
    job = client.submit(str(image_dir / "cat.jpg"), ["cat"], webhook={"url": url})
    assert job.result(timeout=60).status == "ok"
    wait_until(lambda: client.redis.get(webhook_state_key(job.id)) == "failed", timeout=60, what="failure")
    assert http_server.requests == [], "no request reached the private address"
    letter = client.dead_letters.get(job.id, kind="webhook")
    assert letter is not None and "HTTP 204" not in letter.error.message


def post_pinned(client: httpx.Client, pinned: PinnedUrl) -> httpx.Response:
    return client.post(pinned.url, content=b"{}", headers={"Host": pinned.host}, extensions=pinned.extensions)


def test_a_pinned_https_request_keeps_its_name_for_tls_and_host():
    """A webhook POST goes to the guarded address, while TLS (SNI, certificate check) and the
    Host header still see the receiver's name; a certificate for another name is refused."""
    authority = trustme.CA()
    certificate = authority.issue_cert("hooks.example")
    seen_hosts: list[str] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen_hosts.append(self.headers["Host"])
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(server_context)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    try:
        with httpx.Client(verify=client_context) as https:
            pinned = pin(f"https://hooks.example:{port}/hook", "127.0.0.1")
            assert pinned.url == f"https://127.0.0.1:{port}/hook" and pinned.host == f"hooks.example:{port}"
            answer = post_pinned(https, pinned)
            assert answer.status_code == 204 and seen_hosts == [f"hooks.example:{port}"]
            impostor = pin(f"https://other.example:{port}/hook", "127.0.0.1")
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                post_pinned(https, impostor)
    finally:
        server.shutdown()
        server.server_close()
    literal = "http://user:pw@[2001:db8::1]:8080/h?q=1"
    assert pin(literal, "2001:db8::1").url == literal
    assert pin("http://hooks.example/h", "192.0.2.1") == PinnedUrl("http://192.0.2.1/h", "hooks.example", {})
    assert pin("https://bücher.example/h", "192.0.2.1").host == "xn--bcher-kva.example"


def test_signature_format_and_key_rotation():
    body = b'{"job_id":"x","status":"ok"}'
    header = sign(body, "old", timestamp=1_700_000_000)
    timestamp, _, digest = header.partition(",")
    assert timestamp == "t=1700000000" and digest.startswith("v1=") and len(digest) == 3 + 64
    assert verify_signature(body, header, ["new", "old"], now=1_700_000_100) == 1_700_000_000
    with pytest.raises(SignatureError, match="missing"):
        verify_signature(body, None, "old")
    with pytest.raises(SignatureError, match="malformed"):
        verify_signature(body, "v1=abc", "old")
    with pytest.raises(SignatureError, match="tolerance"):
        verify_signature(body, header, "old", now=1_700_000_000 + 301)
    with pytest.raises(SignatureError, match="altered"):
        verify_signature(body + b" ", header, "old", now=1_700_000_000)
    for hostile in ("t=\u00b2,v1=ab", "t=1700000000,v1=\u00e9\u00e9"):  # "²" passes isdigit
        with pytest.raises(SignatureError, match="malformed"):
            verify_signature(body, hostile, "old", now=1_700_000_000)


def test_retry_after_parsing_and_response_classes():
    from worker.webhook import classify, parse_retry_after

    now = time.time()
    assert parse_retry_after("7", now=now) == 7.0
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert 28 <= parse_retry_after(http_date, now=now) <= 31
    assert parse_retry_after("soon", now=now) is None and parse_retry_after(None, now=now) is None
    assert parse_retry_after("\u00b2", now=now) is None
    codes = (200, 204, 301, 400, 404, 408, 429, 500, 503)
    outcomes = {code: classify(httpx.Response(code)) for code in codes}
    assert [c for c, o in outcomes.items() if o.delivered] == [200, 204]
    assert [c for c, o in outcomes.items() if o.retryable] == [408, 429, 500, 503]
    waited = classify(httpx.Response(503, headers={"Retry-After": "12"}))
    assert waited.retry_after == 12.0


def test_an_idle_worker_waits_on_its_job_queue_not_on_the_webhook_queue(
    start_worker, client, http_server, image_dir: Path, queue_name: str
):
    """A blocking wait watches one queue, and Redis ends one on its 10 Hz clock: a job must
    not sit out a wait on the webhook queue (up to 0.3 s), even when the last message the
    worker took was a webhook delivery."""
    http_server.routes["/hook"] = Reply(204)
    start_worker(**WEBHOOK_SETTINGS)
    job = client.submit(str(image_dir / "cat.jpg"), ["cat", "dog"], webhook={"url": http_server.url("/hook")})
    assert job.result(timeout=60).status == "ok"
    wait_until(
        lambda: client.redis.get(webhook_state_key(job.id)) == "delivered",
        timeout=60,
        what="the webhook delivered (the worker's last message)",
    )
    waited_on = []
    with client.redis.monitor() as monitor:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            command = monitor.next_command()["command"].split()
            if command[0].upper() == "BLMOVE":
                waited_on.append(command[1])
    assert len(waited_on) >= 3, "an idle worker keeps waiting for messages"
    assert set(waited_on) == {queue_name}, "every wait on the job queue; webhooks are found by fetches"
    assert client.submit(str(image_dir / "cat.jpg"), ["cat", "dog"]).result(timeout=60).status == "ok"
