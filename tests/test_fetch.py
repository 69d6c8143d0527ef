"""The fetcher against real servers: http(s) on 127.0.0.1, moto's S3 over HTTP, real files."""

from __future__ import annotations

import base64
import os
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.errors import ErrorCode, JobError
from tests.servers import HttpServer, MotoS3Server, Reply
from worker import local_source
from worker.fetch import Fetcher, FetchPolicy
from worker.fetch_policy import redact_url

BODY = b"\xff\xd8\xff\xe0 pretend jpeg bytes"
CAP = 1000


def chunked(body: bytes, size: int = 100) -> bytes:
    """``body`` in HTTP/1.1 chunked framing (the server writes it as is)."""
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def local_url(server: HttpServer, path: str) -> str:
    """The server's URL by the allowlisted name ``localhost`` (``server.url`` uses 127.0.0.1)."""
    return server.url(path).replace("127.0.0.1", "localhost")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "root"
    directory.mkdir()
    (directory / "ok.jpg").write_bytes(BODY)
    return directory


@pytest.fixture
def fetcher(root: Path, s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fetcher]:
    """The guard on, ``localhost`` allowlisted, short timeouts, a 1000-byte cap."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    policy = FetchPolicy(
        max_bytes=CAP,
        local_roots=(root.resolve(),),
        allowed_hosts=frozenset({"localhost"}),
        connect_timeout=2.0,
        read_timeout=0.5,
        total_timeout=5.0,
        s3_endpoint_url=s3_server.endpoint_url,
    )
    instance = Fetcher(policy)
    yield instance
    instance.close()


def fetch_error(fetcher: Fetcher, reference: str) -> JobError:
    with pytest.raises(JobError) as raised:
        fetcher.fetch(reference)
    return raised.value


# --- http(s) -------------------------------------------------------------------------


def test_http_image_is_downloaded_without_compression(fetcher: Fetcher, http_server: HttpServer):
    http_server.routes["/img"] = Reply(200, BODY, {"Content-Type": "text/html"})
    assert fetcher.fetch(local_url(http_server, "/img")) == BODY
    assert http_server.requests[0].headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (404, ErrorCode.FETCH_NOT_FOUND, False),
        (410, ErrorCode.FETCH_NOT_FOUND, False),
        (403, ErrorCode.FETCH_REFUSED, False),
        (401, ErrorCode.FETCH_REFUSED, False),
        (429, ErrorCode.FETCH_FAILED, True),
        (500, ErrorCode.FETCH_FAILED, True),
        (503, ErrorCode.FETCH_FAILED, True),
    ],
)
def test_http_status_maps_to_code(fetcher, http_server, status, code, retryable):
    http_server.routes["/img"] = Reply(status, b"nope")
    error = fetch_error(fetcher, local_url(http_server, "/img"))
    assert (error.code, error.retryable) == (code, retryable)
    assert f"HTTP {status}" in error.message


def test_three_redirects_are_followed_and_a_fourth_is_refused(fetcher, http_server):
    http_server.routes["/img"] = Reply(200, BODY)
    for hop in range(1, 5):
        target = "/img" if hop == 1 else f"/hop{hop - 1}"
        http_server.routes[f"/hop{hop}"] = Reply(302, headers={"Location": target})
    assert fetcher.fetch(local_url(http_server, "/hop3")) == BODY
    error = fetch_error(fetcher, local_url(http_server, "/hop4"))
    assert error.code is ErrorCode.FETCH_REFUSED
    assert "more than 3" in error.message


@pytest.mark.parametrize(
    "target", ["http://127.0.0.1:{port}/secret", "http://169.254.169.254/latest/meta-data/"]
)
def test_redirect_to_private_address_is_refused_before_connecting(fetcher, http_server, target):
    http_server.routes["/secret"] = Reply(200, BODY)
    http_server.routes["/go"] = Reply(302, headers={"Location": target.format(port=http_server.port)})
    error = fetch_error(fetcher, local_url(http_server, "/go"))
    assert error.code is ErrorCode.FORBIDDEN_HOST
    assert [r.path for r in http_server.requests] == ["/go"]


def test_redirect_to_another_scheme_is_refused(fetcher, http_server):
    http_server.routes["/go"] = Reply(301, headers={"Location": "file:///etc/passwd"})
    assert fetch_error(fetcher, local_url(http_server, "/go")).code is ErrorCode.UNSUPPORTED_SCHEME


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "[::1]",
        "0.0.0.0",
        "10.1.2.3",
        "169.254.169.254",
        "[::ffff:10.0.0.1]",  # IPv4-mapped
        "[64:ff9b::a9fe:a9fe]",  # NAT64 to the metadata address
        "[2002:7f00:1::1]",  # 6to4 around 127.0.0.1
        "[::127.0.0.1]",  # IPv4-compatible
    ],
)
def test_guard_refuses_non_public_addresses(fetcher, http_server, host):
    http_server.routes["/img"] = Reply(200, BODY)
    error = fetch_error(fetcher, f"http://{host}:{http_server.port}/img")
    assert error.code is ErrorCode.FORBIDDEN_HOST
    assert not error.retryable
    assert http_server.requests == []


def test_a_name_that_rebinds_to_a_private_address_gets_no_request(
    fetcher, http_server, monkeypatch: pytest.MonkeyPatch
):
    """DNS rebinding: the guard's lookup answers a public address, any later one 127.0.0.1.
    The request goes to the address the guard checked, so nothing reaches 127.0.0.1 (here
    the public address answers nothing: no network)."""
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["192.0.2.1", "127.0.0.1"])  # TEST-NET-1: public to the guard, unrouted

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.example":
            return real_getaddrinfo(host, port, *args, **kwargs)
        address = next(answers, "127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr("worker.fetch_policy.is_public_address", lambda address: address == "192.0.2.1")
    http_server.routes["/img"] = Reply(200, BODY)
    error = fetch_error(fetcher, f"http://rebind.example:{http_server.port}/img")
    assert error.code in (ErrorCode.FETCH_FAILED, ErrorCode.FETCH_TIMEOUT)
    assert http_server.requests == [], "no request reached the private address"


def test_declared_size_over_the_cap_is_refused(fetcher, http_server):
    http_server.routes["/big"] = Reply(200, b"x" * (CAP + 1))
    error = fetch_error(fetcher, local_url(http_server, "/big"))
    assert error.code is ErrorCode.TOO_LARGE
    assert "declares" in error.message


def test_body_over_the_cap_is_refused_despite_a_lying_content_length(fetcher, http_server):
    headers = {"Content-Length": "10", "Transfer-Encoding": "chunked"}
    http_server.routes["/liar"] = Reply(200, chunked(b"x" * (CAP * 50)), headers)
    error = fetch_error(fetcher, local_url(http_server, "/liar"))
    assert error.code is ErrorCode.TOO_LARGE
    assert "sent more than" in error.message


def test_body_shorter_than_its_content_length_is_a_transient_failure(fetcher, http_server):
    http_server.routes["/short"] = Reply(200, b"abc", {"Content-Length": "100"})
    error = fetch_error(fetcher, local_url(http_server, "/short"))
    assert (error.code, error.retryable) == (ErrorCode.FETCH_FAILED, True)


def test_slow_server_times_out(fetcher, http_server):
    http_server.routes["/slow"] = Reply(200, BODY, delay=2.0)
    error = fetch_error(fetcher, local_url(http_server, "/slow"))
    assert (error.code, error.retryable) == (ErrorCode.FETCH_TIMEOUT, True)


def test_download_past_the_total_timeout_is_abandoned(http_server, root):
    policy = FetchPolicy(allowed_hosts=frozenset({"localhost"}), read_timeout=5.0, total_timeout=0.2)
    http_server.routes["/slow"] = Reply(200, BODY, delay=0.5)
    error = fetch_error(Fetcher(policy), local_url(http_server, "/slow"))
    assert error.code is ErrorCode.FETCH_TIMEOUT
    assert "took more than" in error.message


def test_refused_connection_is_a_transient_failure(fetcher):
    from worker.processes import free_port

    error = fetch_error(fetcher, f"http://localhost:{free_port()}/img")
    assert (error.code, error.retryable) == (ErrorCode.FETCH_FAILED, True)


def test_messages_never_carry_passwords_or_query_strings(fetcher, http_server):
    url = local_url(http_server, "/gone").replace("://", "://user:hunter2@") + "?X-Amz-Signature=s3cr3t"
    error = fetch_error(fetcher, url)
    assert error.code is ErrorCode.FETCH_NOT_FOUND
    assert "/gone" in error.message
    assert "hunter2" not in error.message and "s3cr3t" not in error.message


def test_redact_url_keeps_scheme_host_and_path():
    assert redact_url("https://u:p@example.com:8443/a/b.jpg?sig=x#f") == "https://example.com:8443/a/b.jpg?…"
    assert redact_url("https://example.com/" + "a" * 500).endswith("…")


def test_allow_private_turns_the_guard_off(http_server):
    http_server.routes["/img"] = Reply(200, BODY)
    assert Fetcher(FetchPolicy(allow_private=True)).fetch(http_server.url("/img")) == BODY


# --- s3:// ----------------------------------------------------------------------------


@pytest.fixture
def bucket(s3_server: MotoS3Server) -> str:
    name = f"fetch-{uuid.uuid4().hex[:12]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="photos/ok.jpg", Body=BODY)
    client.put_object(Bucket=name, Key="photos/big.jpg", Body=b"x" * (CAP + 1))
    return name


def test_s3_object_is_read(fetcher, bucket):
    assert fetcher.fetch(f"s3://{bucket}/photos/ok.jpg") == BODY


@pytest.mark.parametrize(
    ("reference", "code"),
    [
        ("s3://{bucket}/photos/missing.jpg", ErrorCode.FETCH_NOT_FOUND),
        ("s3://no-such-bucket-here/photos/ok.jpg", ErrorCode.FETCH_NOT_FOUND),
        ("s3://{bucket}/photos/big.jpg", ErrorCode.TOO_LARGE),
        ("s3://{bucket}", ErrorCode.INVALID_REQUEST),
    ],
)
def test_s3_failures_are_permanent(fetcher, bucket, reference, code):
    error = fetch_error(fetcher, reference.format(bucket=bucket))
    assert (error.code, error.retryable) == (code, False)


def test_s3_throttling_is_transient(http_server, monkeypatch, s3_server):
    """An S3-compatible endpoint (our HTTP server, path-style) that answers SlowDown."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    slow_down = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    http_server.routes["/bucket/key.jpg"] = Reply(503, slow_down, {"Content-Type": "application/xml"})
    fetcher = Fetcher(FetchPolicy(s3_endpoint_url=http_server.url(""), read_timeout=2.0))
    error = fetch_error(fetcher, "s3://bucket/key.jpg")
    assert (error.code, error.retryable) == (ErrorCode.FETCH_FAILED, True)
    assert "SlowDown" in error.message


# --- local paths, file:// and data: ---------------------------------------------------


def test_local_file_and_file_url_are_read(fetcher, root):
    assert fetcher.fetch(str(root / "ok.jpg")) == BODY
    assert fetcher.fetch(f"file://{root / 'ok.jpg'}") == BODY
    assert fetcher.fetch(f"file://localhost{root / 'ok.jpg'}") == BODY


def test_symlink_inside_the_root_is_followed(fetcher, root):
    (root / "alias.jpg").symlink_to(root / "ok.jpg")
    assert fetcher.fetch(str(root / "alias.jpg")) == BODY


@pytest.mark.parametrize(
    "reference",
    [
        "{root}/../outside.jpg",
        "{root}/sub/../ok.jpg",
        "/etc/passwd",
        "file:///etc/passwd",
        "{root}/escape.jpg",
        "{root}/fifo",
        "{root}/sub",
    ],
)
def test_local_paths_outside_roots_or_not_regular_files_are_forbidden(fetcher, root, reference):
    (root.parent / "outside.jpg").write_bytes(BODY)
    (root / "escape.jpg").symlink_to(root.parent / "outside.jpg")
    (root / "sub").mkdir()
    os.mkfifo(root / "fifo")
    error = fetch_error(fetcher, reference.format(root=root))
    assert (error.code, error.retryable) == (ErrorCode.FORBIDDEN_PATH, False)
    assert str(root.parent / "outside.jpg") not in error.message


def test_without_proc_paths_are_resolved_and_checked_before_opening(fetcher, root, monkeypatch):
    monkeypatch.setattr(local_source, "CAN_READ_OPENED_PATH", False)
    (root.parent / "outside.jpg").write_bytes(BODY)
    (root / "escape.jpg").symlink_to(root.parent / "outside.jpg")
    (root / "alias.jpg").symlink_to(root / "ok.jpg")
    assert fetcher.fetch(str(root / "ok.jpg")) == fetcher.fetch(str(root / "alias.jpg")) == BODY
    for reference in (root / "escape.jpg", root.parent / "outside.jpg", Path("/etc/passwd")):
        assert fetch_error(fetcher, str(reference)).code is ErrorCode.FORBIDDEN_PATH


def test_device_file_inside_a_root_is_forbidden(fetcher, root):
    try:
        os.mknod(root / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        pytest.skip("creating device nodes needs CAP_MKNOD")
    assert fetch_error(fetcher, str(root / "zero")).code is ErrorCode.FORBIDDEN_PATH


def test_local_failures(fetcher, root):
    (root / "big.jpg").write_bytes(b"x" * (CAP + 1))
    assert fetch_error(fetcher, str(root / "missing.jpg")).code is ErrorCode.FETCH_NOT_FOUND
    assert fetch_error(fetcher, str(root / "big.jpg")).code is ErrorCode.TOO_LARGE
    assert fetch_error(fetcher, "file://elsewhere/etc/passwd").code is ErrorCode.FORBIDDEN_PATH
    assert fetch_error(Fetcher(FetchPolicy()), str(root / "ok.jpg")).code is ErrorCode.FORBIDDEN_PATH


def test_inline_data_urls(fetcher):
    encoded = base64.b64encode(BODY).decode()
    assert fetcher.fetch(f"data:image/png;base64,{encoded}") == BODY
    too_big = base64.b64encode(b"x" * (CAP + 1)).decode()
    assert fetch_error(fetcher, f"data:image/png;base64,{too_big}").code is ErrorCode.TOO_LARGE
    assert fetch_error(fetcher, "data:image/png;base64,not base64!").code is ErrorCode.INVALID_REQUEST
    assert fetch_error(fetcher, "data:image/png,rawbytes").code is ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("reference", ["ftp://example.com/a.jpg", "gopher://x/", "javascript:alert(1)"])
def test_unsupported_schemes(fetcher, reference):
    assert fetch_error(fetcher, reference).code is ErrorCode.UNSUPPORTED_SCHEME
