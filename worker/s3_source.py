"""Read ``s3://bucket/key`` images with boto3 (imported only when the first S3 image is read).

Credentials and region come from boto3's standard chain (environment, shared files,
instance or task role); ``FetchPolicy.s3_endpoint_url`` points it at an S3-compatible store.
"""

from __future__ import annotations

import threading
from typing import Any

from producer.errors import ErrorCode, JobError, shorten
from worker.fetch_policy import FetchPolicy

NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
TIMEOUT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException"})
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "ServiceUnavailable",
        "InternalError",
    }
)
SDK_ATTEMPTS = 2
"""Attempts boto3 itself makes per read; the task's retries (``CLIPTAG_MAX_RETRIES``) come on top."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; the key is taken as is (not URL-decoded).

    Raises:
        JobError: ``invalid_request`` when the bucket or the key is missing.
    """
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise JobError(ErrorCode.INVALID_REQUEST, f"{shorten(uri)!r} is not s3://bucket/key")
    return bucket, key


class S3Source:
    """Fetches ``s3://`` references under ``policy``; safe to share between threads.

    Args:
        policy: size cap, timeouts and the S3 endpoint.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._client: Any = None
        self._lock = threading.Lock()

    def _s3(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.policy.s3_endpoint_url,
                    config=Config(
                        connect_timeout=self.policy.connect_timeout,
                        read_timeout=self.policy.read_timeout,
                        retries={"mode": "standard", "max_attempts": SDK_ATTEMPTS},
                    ),
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def fetch(self, uri: str) -> bytes:
        """The object ``uri`` names.

        Raises:
            JobError: ``fetch_not_found`` (no such key or bucket), ``fetch_refused`` (access
                denied, other client errors), ``fetch_failed`` (throttling, 5xx, connection
                trouble, no credentials), ``fetch_timeout`` or ``too_large``.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = parse_s3_uri(uri)
        limit = self.policy.max_bytes
        try:
            response = self._s3().get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                size = int(response.get("ContentLength") or 0)
                if size > limit:
                    raise JobError(ErrorCode.TOO_LARGE, f"{shorten(uri)!r} is {size} bytes, over {limit}")
                data = body.read(limit + 1)
            finally:
                body.close()
        except ClientError as exc:
            raise client_error(uri, exc.response) from None
        except BotoCoreError as exc:
            raise sdk_error(uri, exc) from None
        if len(data) > limit:
            raise JobError(ErrorCode.TOO_LARGE, f"{shorten(uri)!r} is more than {limit} bytes")
        return data


def client_error(uri: str, response: dict[str, Any]) -> JobError:
    """The ``JobError`` for an error answer from S3 (``ClientError.response``)."""
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    what = f"S3 answered {code or 'HTTP'} ({status}) for {shorten(uri)!r}"
    if code in NOT_FOUND_CODES or status == 404:
        return JobError(ErrorCode.FETCH_NOT_FOUND, what)
    if code in TIMEOUT_CODES:
        return JobError(ErrorCode.FETCH_TIMEOUT, what)
    if code in TRANSIENT_CODES or status == 429 or status >= 500:
        return JobError(ErrorCode.FETCH_FAILED, what)
    return JobError(ErrorCode.FETCH_REFUSED, what)


def sdk_error(uri: str, exc: Exception) -> JobError:
    """The ``JobError`` for a botocore failure that is not an answer from S3."""
    from botocore.exceptions import ConnectTimeoutError, ParamValidationError, ReadTimeoutError

    name = type(exc).__name__
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return JobError(ErrorCode.FETCH_TIMEOUT, f"S3 did not answer in time for {shorten(uri)!r}")
    if isinstance(exc, ParamValidationError):
        return JobError(ErrorCode.INVALID_REQUEST, f"{shorten(uri)!r} is not a valid S3 reference")
    return JobError(ErrorCode.FETCH_FAILED, f"reading {shorten(uri)!r} from S3 failed: {name}")
