"""The job contract refuses hostile requests with ``invalid_request`` naming the field."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from producer.client import Client
from producer.contract import MAX_LABEL_CHARS, parse_job
from producer.errors import ErrorCode, JobError

GOOD = {"image": "/photos/cat.jpg", "labels": ["cat", "dog"]}


def refusal(changes: dict[str, Any], *, max_labels: int = 1000) -> str:
    with pytest.raises(JobError) as raised:
        parse_job({**GOOD, **changes}, max_labels=max_labels)
    assert raised.value.code is ErrorCode.INVALID_REQUEST
    assert not raised.value.retryable
    return raised.value.message


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"labels": []}, "labels must not be empty"),
        ({"labels": [f"l{i}" for i in range(10_001)]}, "10001 entries"),
        ({"labels": ["x" * 10_000]}, "10000 characters"),
        ({"labels": ["x" * (MAX_LABEL_CHARS + 1)]}, f"{MAX_LABEL_CHARS + 1} characters"),
        ({"labels": "cat,dog"}, "labels: Input should be a valid list"),
        ({"labels": [1, 2]}, "labels.0"),
        ({"labels": {"cat": 1}}, "labels"),
        ({"labels": ["cat", "  "]}, "blank"),
        ({"labels": ["cat", "cat"]}, "'cat' twice"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"top_k": 0}, "top_k"),
        ({"threshold": 1.5}, "threshold"),
        ({"expires_at": float("nan")}, "expires_at: Input should be a finite number"),
        ({"submitted_at": float("inf")}, "submitted_at"),
        ({"image": 42}, "image"),
        ({"image": ""}, "image"),
        ({"metadata": {"at": datetime.date(2026, 1, 1)}}, "metadata must be plain JSON"),
        ({"metadata": {"tags": {"a", "b"}}}, "metadata must be plain JSON"),
        ({"metadata": {"score": float("nan")}}, "metadata must be plain JSON"),
    ],
)
def test_bad_requests_are_refused_naming_the_field(changes, named):
    assert named in refusal(changes)


def test_the_client_refuses_a_lone_string_as_labels_and_a_shared_job_id():
    with Client("redis://127.0.0.1:1/0") as client, pytest.raises(JobError) as raised:
        client.submit("/photos/cat.jpg", "cat")  # type: ignore[arg-type]
    assert raised.value.code is ErrorCode.INVALID_REQUEST and "labels" in raised.value.message
    with Client("redis://127.0.0.1:1/0") as client, pytest.raises(JobError) as raised:
        next(client.submit_many(["/a.jpg", "/b.jpg"], ["cat"], job_id="same"))
    assert raised.value.code is ErrorCode.INVALID_REQUEST and "job_id" in raised.value.message


def test_the_label_limit_is_the_workers_setting():
    assert "more than the limit of 3" in refusal({"labels": ["a", "b", "c", "d"]}, max_labels=3)
    assert parse_job({**GOOD, "labels": ["a", "b", "c"]}, max_labels=3).labels == ["a", "b", "c"]


@pytest.mark.parametrize("payload", [None, "job", ["cat"], 42])
def test_a_job_must_be_an_object(payload):
    with pytest.raises(JobError) as raised:
        parse_job(payload)
    assert raised.value.code is ErrorCode.INVALID_REQUEST
    assert "JSON object" in raised.value.message
