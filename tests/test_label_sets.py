"""Named label sets: the Redis store, ``cliptag labels`` as a subprocess, the worker's cache,
and jobs that name a set through a real worker following its versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from producer.contract import DEFAULT_TEMPLATE
from producer.errors import ErrorCode, JobError, JobFailed
from producer.labelsets import LabelSetDefinition, LabelSetStore
from producer.templates import ENSEMBLES, fill
from tests.reference import ReferenceClip
from worker.label_set_cache import ENCODE_CHUNK_PROMPTS, LabelSetCache
from worker.processes import free_port


def labels_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``cliptag labels ARGS`` as its own process, on the Redis at ``redis_url``."""
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", "labels", *args],
        env={**os.environ, "CLIPTAG_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_labels(path: Path, labels: list[str]) -> Path:
    path.write_text("# one label per line\n\n" + "\n".join(labels) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def store(redis_server, queue_name: str) -> LabelSetStore:
    """A store under a key prefix of this test's own."""
    return LabelSetStore.from_url(redis_server.url, prefix=f"test:{queue_name}")


def test_store_versions_only_grow_even_across_a_delete(store: LabelSetStore):
    first = store.put("animals", LabelSetDefinition(labels=["cat", "dog"]))
    second = store.put("animals", LabelSetDefinition(labels=["cat", "dog", "cow"], template="ensemble:photo"))
    assert (first.version, second.version) == (1, 2)
    assert store.version("animals") == 2
    stored = store.get("animals")
    assert (stored.name, stored.version, stored.labels) == ("animals", 2, ["cat", "dog", "cow"])
    assert stored.template == "ensemble:photo" and stored.updated_at >= first.updated_at
    store.put("plants", LabelSetDefinition(labels=["fern"], prompts={"fern": ["a green fern"]}))
    assert [(s.name, s.version) for s in store.list()] == [("animals", 2), ("plants", 1)]
    assert store.delete("animals") is True
    assert store.delete("animals") is False
    assert store.get("animals") is None and store.version("animals") is None
    assert store.put("animals", LabelSetDefinition(labels=["cat", "dog"])).version == 3
    with pytest.raises(ValueError, match="bad name"):
        store.put("bad name", LabelSetDefinition(labels=["cat"]))


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ({"labels": ["cat", "cat"]}, "contains 'cat' twice"),
        ({"labels": ["cat"], "prompts": {"dog": ["a dog"]}}, "prompts names 'dog', which is not a label"),
        ({"labels": ["cat"], "template": "a photo"}, "must contain exactly one '{}'"),
        ({"labels": ["cat"], "template": ["ensemble:nope"]}, "unknown ensemble 'nope'"),
        ({"labels": ["a", "b", "c"], "context": 2}, "more than the limit of 2"),
    ],
)
def test_definitions_are_validated(definition: dict, message: str):
    context = {"max_labels": definition.pop("context", 1000)}
    with pytest.raises(ValidationError, match=message):
        LabelSetDefinition.model_validate(definition, context=context)


def counting_encoder(calls: list[list[tuple[str, ...]]]):
    """An encoder that records its calls and gives each label a row derived from its prompts."""

    def encode(labels):
        calls.append(list(labels))
        return np.array([[float(len(label)), float(sum(len(p) for p in label))] for label in labels])

    return encode


def test_worker_cache_encodes_each_version_once_and_never_serves_a_stale_one(store: LabelSetStore):
    calls: list[list[tuple[str, ...]]] = []
    cache = LabelSetCache(store, counting_encoder(calls))
    store.put("s", LabelSetDefinition(labels=["cat", "dog"]))
    first = cache.resolve("s")
    assert cache.resolve("s") is first and len(calls) == 1
    assert calls[0] == [(fill(DEFAULT_TEMPLATE, "cat"),), (fill(DEFAULT_TEMPLATE, "dog"),)]
    store.put("s", LabelSetDefinition(labels=["car", "cup", "cow"], template=["x {}", "y {}"]))
    second = cache.resolve("s")
    assert (second.version, second.labels, len(calls)) == (2, ("car", "cup", "cow"), 2)
    assert calls[1][0] == ("x car", "y car") and second.embeddings.shape == (3, 2)
    store.delete("s")
    with pytest.raises(JobError) as unknown:
        cache.resolve("s")
    assert unknown.value.code is ErrorCode.UNKNOWN_LABEL_SET and not unknown.value.retryable
    store.put("s", LabelSetDefinition(labels=["cat", "dog"]))
    assert cache.resolve("s").version == 3 and len(calls) == 3


def test_a_large_set_is_encoded_in_chunks_in_order(store: LabelSetStore):
    labels = [f"label {i}" for i in range(2 * ENCODE_CHUNK_PROMPTS // len(ENSEMBLES["photo"]) + 5)]
    store.put("big", LabelSetDefinition(labels=labels, template="ensemble:photo"))
    calls: list[list[tuple[str, ...]]] = []
    resolved = LabelSetCache(store, counting_encoder(calls)).resolve("big")
    assert len(calls) == 3
    assert all(sum(len(label) for label in call) <= ENCODE_CHUNK_PROMPTS for call in calls)
    assert [label[0] for call in calls for label in call] == [f"a photo of a {label}." for label in labels]
    assert resolved.embeddings.shape == (len(labels), 2)


def test_an_unreachable_store_is_a_retryable_internal_error():
    cache = LabelSetCache(LabelSetStore.from_url(f"redis://127.0.0.1:{free_port()}/0"), counting_encoder([]))
    with pytest.raises(JobError) as failed:
        cache.resolve("anything")
    assert failed.value.code is ErrorCode.INTERNAL and failed.value.retryable
    assert "anything" in failed.value.message


def test_cli_shows_lists_and_rejects_bad_sets(redis_server, queue_name: str, tmp_path: Path):
    name = f"{queue_name}-cli"
    labels = write_labels(tmp_path / "labels.txt", ["cat", "dog", "tabby cat"])
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"tabby cat": ["a photo of a tabby cat, a type of pet"]}))
    put = labels_cli(
        redis_server.url, "put", name, "--file", str(labels),
        "--template", "ensemble:photo", "--template", "a {} on a sofa.", "--prompts", str(prompts),
    )  # fmt: skip
    assert put.returncode == 0, put.stderr
    assert put.stdout.strip() == f"{name} version 1: 3 labels"
    shown = labels_cli(redis_server.url, "show", name)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) | {"updated_at": 0} == {
        "name": name,
        "version": 1,
        "updated_at": 0,
        "labels": ["cat", "dog", "tabby cat"],
        "template": ["ensemble:photo", "a {} on a sofa."],
        "prompts": {"tabby cat": ["a photo of a tabby cat, a type of pet"]},
    }
    listed = labels_cli(redis_server.url, "list", "--json")
    summaries = {entry["name"]: entry for entry in map(json.loads, listed.stdout.splitlines())}
    assert summaries[name]["version"] == 1 and summaries[name]["labels"] == 3

    prompts.write_text(json.dumps({"cow": ["a cow"]}))
    bad = labels_cli(redis_server.url, "put", name, "--file", str(labels), "--prompts", str(prompts))
    assert bad.returncode == 2 and "prompts names 'cow', which is not a label" in bad.stderr
    bad = labels_cli(redis_server.url, "put", name, "--file", str(labels), "--template", "ensemble:nope")
    assert bad.returncode == 2 and "unknown ensemble 'nope'" in bad.stderr
    assert json.loads(labels_cli(redis_server.url, "show", name).stdout)["version"] == 1
    missing = labels_cli(redis_server.url, "show", f"{name}-missing")
    assert missing.returncode == 1 and "no label set named" in missing.stderr


def test_jobs_follow_the_label_set_through_its_versions(
    start_worker, client, redis_server, queue_name: str, image_dir: Path, tiny_clip: Path, tmp_path: Path
):
    worker = start_worker(max_wait_ms=0)
    reference = ReferenceClip(tiny_clip)
    cat = image_dir / "cat.jpg"
    name = f"{queue_name}-pets"
    put = labels_cli(
        redis_server.url, "put", name, "--file", str(write_labels(tmp_path / "v1.txt", ["cat", "dog"]))
    )
    assert put.returncode == 0, put.stderr

    expected = reference.probabilities(cat, ["a photo of a cat.", "a photo of a dog."])
    for _ in range(2):
        result = client.submit(str(cat), label_set=name).result(timeout=60)
        assert result.label_set_version == 1
        assert {e.label: e.score for e in result.scores} == pytest.approx(
            dict(zip(["cat", "dog"], expected, strict=True)), abs=1e-5
        )
    submitted = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", str(cat), "--label-set", name, "--wait", "--json"],
        env={**os.environ, "CLIPTAG_REDIS_URL": redis_server.url, "CLIPTAG_QUEUE": queue_name},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    from_cli = json.loads(submitted.stdout)
    assert from_cli["label_set_version"] == 1
    assert {e["label"]: e["score"] for e in from_cli["scores"]} == pytest.approx(
        dict(zip(["cat", "dog"], expected, strict=True)), abs=1e-5
    )

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"cup": ["a cup of coffee"]}))
    labels = write_labels(tmp_path / "v2.txt", ["car", "rocket", "cup"])
    put = labels_cli(
        redis_server.url,
        "put",
        name,
        "--file",
        str(labels),
        "--template",
        "a {} in space.",
        "--prompts",
        str(prompts),
    )
    assert put.returncode == 0 and "version 2" in put.stdout, put.stderr
    result = client.submit(str(cat), label_set=name, top_k=2).result(timeout=60)
    assert result.label_set_version == 2
    expected = dict(
        zip(
            ["car", "rocket", "cup"],
            reference.probabilities(cat, ["a car in space.", "a rocket in space.", "a cup of coffee"]),
            strict=True,
        )
    )
    assert [e.label for e in result.scores] == sorted(expected, key=expected.get, reverse=True)[:2]
    for entry in result.scores:
        assert entry.score == pytest.approx(expected[entry.label], abs=1e-5)

    loaded = [json.loads(line) for line in worker.log_text().splitlines() if '"label_set_loaded"' in line]
    assert [(line["label_set"], line["version"]) for line in loaded] == [(name, 1), (name, 2)]

    assert labels_cli(redis_server.url, "delete", name).stdout.strip() == f"deleted {name}"
    for missing in (name, f"{queue_name}-never-stored"):
        with pytest.raises(JobFailed) as failed:
            client.submit(str(cat), label_set=missing).result(timeout=60)
        assert failed.value.code is ErrorCode.UNKNOWN_LABEL_SET and missing in failed.value.message
    with pytest.raises(JobError) as rejected:
        client.submit(str(cat), label_set=name, template="a {}.")
    assert rejected.value.code is ErrorCode.INVALID_REQUEST and "label_set" in rejected.value.message
