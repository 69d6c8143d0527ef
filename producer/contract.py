"""The job and result contract: the JSON documents that travel through Redis.

Both the producer and the worker validate with these models (the worker never trusts
the queue). Everything here is plain JSON; see the README's "Wire contract" section.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from producer.errors import ErrorCode, JobError, shorten
from producer.templates import expand_templates

TASK_NAME = "cliptag.tag"
QUEUE = "cliptag"
DEFAULT_TEMPLATE = "a photo of a {}."

MAX_LABELS_DEFAULT = 1000
MAX_LABEL_CHARS = 300
MAX_REFERENCE_CHARS = 4096
MAX_INLINE_REFERENCE_CHARS = 1_500_000
MAX_BULK_IMAGES = 10_000
MAX_METADATA_BYTES = 16_384
MAX_PROMPTS_PER_LABEL = 100
MAX_PROMPTS_PER_JOB = 20_000
"""Prompts one job may have encoded (labels × templates): more belong in a stored label set."""
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$"
LABEL_SET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,99}$"

JobKind = Literal["tag", "embed", "text_embed", "rank"]
ScoringMode = Literal["softmax", "multilabel"]
EmbeddingDtype = Literal["float32", "float16"]
Status = Literal["ok", "error"]


def new_job_id() -> str:
    """A fresh random job id (used when the producer does not choose one)."""
    return uuid.uuid4().hex


def check_texts(field: str, values: list[str], *, limit: int) -> list[str]:
    if not values:
        raise ValueError(f"{field} must not be empty")
    if len(values) > limit:
        raise ValueError(f"{field} has {len(values)} entries, more than the limit of {limit}")
    seen: set[str] = set()
    for value in values:
        if not value.strip():
            raise ValueError(f"{field} contains an empty or blank entry")
        if len(value) > MAX_LABEL_CHARS:
            raise ValueError(
                f"{field} entry {shorten(value, 40)!r} has {len(value)} characters, "
                f"more than {MAX_LABEL_CHARS}"
            )
        if value in seen:
            raise ValueError(f"{field} contains {shorten(value, 40)!r} twice")
        seen.add(value)
    return values


def check_label_prompts(prompts: dict[str, list[str]], labels: list[str]) -> dict[str, list[str]]:
    """Per-label prompt overrides: each key is one of ``labels``, each value 1 to 100 prompts."""
    known = set(labels)
    for label, texts in prompts.items():
        if label not in known:
            raise ValueError(f"prompts names {shorten(label, 40)!r}, which is not a label")
        check_texts(f"prompts[{shorten(label, 40)!r}]", texts, limit=MAX_PROMPTS_PER_LABEL)
    return prompts


def _count_prompts(labels: list[str], template: str | list[str], prompts: dict[str, list[str]] | None) -> int:
    """How many prompts ``labels`` stand for: their overrides, else one per template."""
    per_label = len(expand_templates(template))
    overrides = prompts or {}
    return sum(len(overrides[label]) if label in overrides else per_label for label in labels)


def _check_reference(reference: str) -> str:
    limit = MAX_INLINE_REFERENCE_CHARS if reference.startswith("data:") else MAX_REFERENCE_CHARS
    if not reference.strip():
        raise ValueError("image reference must not be empty")
    if len(reference) > limit:
        raise ValueError(f"image reference is {len(reference)} characters, more than {limit}")
    return reference


def check_template(template: str | list[str] | None) -> str | list[str] | None:
    """A ``template`` field's validator: known ensembles, exactly one ``{}`` per template."""
    if template is not None:
        expand_templates(template)
    return template


class Webhook(BaseModel):
    """Where the worker POSTs the finished result.

    Attributes:
        url: an ``http(s)://`` URL; the worker applies the same host guard as for images.
        key_id: names the signing secret (``CLIPTAG_WEBHOOK_KEYS``); ``None`` uses
            ``CLIPTAG_WEBHOOK_SECRET``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=8, max_length=2048)
    key_id: str | None = Field(default=None, max_length=100)

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook url must be http:// or https://, got {shorten(url, 60)!r}")
        return url


class JobRequest(BaseModel):
    """One job on the queue: the single positional argument of the ``cliptag.tag`` task.

    Attributes:
        job_id: client-chosen (an upload id, say) or generated; also the Celery task id,
            so the result is read back by it and resubmitting the same id is idempotent.
        kind: ``tag`` (zero-shot labels), ``embed`` (image embedding), ``text_embed``
            (embeddings of ``texts``), ``rank`` (image against candidate ``texts``).
        image: one image reference: ``https://…``, ``http://…``, ``s3://bucket/key``,
            a local path or ``file://`` URL, or an inline ``data:image/…;base64,…`` URL.
        images: many references with one label set (a bulk job); the result has one
            entry per image in ``items``.
        labels: the candidate labels (``tag``); or name a stored ``label_set`` instead.
        label_set: the name of a label set stored with ``cliptag labels put`` (``tag``);
            the set brings its own templates and prompts.
        texts: candidate captions (``rank``) or the texts to embed (``text_embed``).
        template: the prompt template with ``{}`` for the label, or a list of templates
            to ensemble, or ``"ensemble:NAME"`` for a built-in ensemble. ``None`` means
            ``DEFAULT_TEMPLATE`` for ``tag`` and the texts as they are for ``rank`` and
            ``text_embed``; ``embed`` takes none.
        prompts: per-label prompt overrides, ``{label: [prompt, …]}`` (``tag`` with labels).
        mode: ``softmax`` (one label wins) or ``multilabel`` (independent scores).
        multilabel_center: the cosine at which a multilabel score is 0.5 (default
            ``worker.similarity.MULTILABEL_CENTER``, 0.25); see docs/jobs.md.
        top_k: keep only the best ``top_k`` scores (``tag``) or texts (``rank``).
        threshold: labels scoring at least this are the result's ``tags``.
        return_embedding: also return the image embedding of a ``tag`` or ``rank`` job.
        embedding_dtype: ``float32`` or ``float16`` values in returned embeddings.
        webhook: where to POST the result, besides the result backend.
        metadata: opaque JSON object echoed back in the result.
        expires_at: unix time after which the job is answered ``expired`` unrun.
        submitted_at: unix time the producer enqueued it (for queue-wait timing).
    """

    # NaN and infinities are no JSON, though Python's JSON decoder (and kombu's) accepts them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    job_id: str = Field(default_factory=new_job_id, pattern=JOB_ID_PATTERN)
    kind: JobKind = "tag"
    image: str | None = None
    images: list[str] | None = Field(default=None, min_length=1, max_length=MAX_BULK_IMAGES)
    labels: list[str] | None = None
    label_set: str | None = Field(default=None, pattern=LABEL_SET_NAME_PATTERN)
    texts: list[str] | None = None
    template: str | list[str] | None = None
    prompts: dict[str, list[str]] | None = None
    mode: ScoringMode = "softmax"
    multilabel_center: float | None = Field(default=None, ge=-1.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    return_embedding: bool = False
    embedding_dtype: EmbeddingDtype = "float32"
    webhook: Webhook | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    expires_at: float | None = None
    submitted_at: float | None = None

    @field_validator("image")
    @classmethod
    def _image(cls, reference: str | None) -> str | None:
        return None if reference is None else _check_reference(reference)

    @field_validator("images")
    @classmethod
    def _images(cls, references: list[str] | None) -> list[str] | None:
        return None if references is None else [_check_reference(r) for r in references]

    _template = field_validator("template")(check_template)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(metadata, allow_nan=False))
        except (TypeError, ValueError) as exc:  # pydantic reports only ValueError as invalid
            raise ValueError(f"metadata must be plain JSON: {exc}") from None
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is {size} bytes of JSON, more than {MAX_METADATA_BYTES}")
        return metadata

    @model_validator(mode="after")
    def _kind_fields(self, info: Any) -> JobRequest:
        context = getattr(info, "context", None) or {}
        max_labels = int(context.get("max_labels", MAX_LABELS_DEFAULT))
        needs_image = self.kind in ("tag", "embed", "rank")
        if needs_image and (self.image is None) == (self.images is None):
            raise ValueError(f"a {self.kind} job needs exactly one of image or images")
        if not needs_image and (self.image is not None or self.images is not None):
            raise ValueError("a text_embed job takes texts, not image or images")
        if self.kind == "tag":
            if (self.labels is None) == (self.label_set is None):
                raise ValueError("a tag job needs exactly one of labels or label_set")
            if self.labels is not None:
                check_texts("labels", self.labels, limit=max_labels)
        elif self.labels is not None or self.label_set is not None:
            raise ValueError(f"a {self.kind} job takes no labels or label_set")
        if self.kind in ("rank", "text_embed"):
            check_texts("texts", self.texts or [], limit=max_labels)
        elif self.texts is not None:
            raise ValueError(f"a {self.kind} job takes no texts")
        for name, kinds in _OPTION_KINDS.items():
            if self.kind not in kinds and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name} does not apply to {self.kind} jobs")
        if self.multilabel_center is not None and self.mode != "multilabel":
            raise ValueError("multilabel_center applies to mode multilabel only")
        if self.label_set is not None and (self.template is not None or self.prompts is not None):
            raise ValueError("a job naming a label_set takes no template or prompts (the set has its own)")
        if self.prompts is not None and self.labels is not None:
            check_label_prompts(self.prompts, self.labels)
        texts = self.labels if self.kind == "tag" else self.texts
        if texts is not None:
            template = self.template or (DEFAULT_TEMPLATE if self.kind == "tag" else "{}")
            prompts = _count_prompts(texts, template, self.prompts)
            if prompts > MAX_PROMPTS_PER_JOB:
                raise ValueError(
                    f"the job stands for {prompts} prompts (texts × templates), more than "
                    f"{MAX_PROMPTS_PER_JOB}; store the labels as a label set instead"
                )
        return self

    @property
    def references(self) -> list[str]:
        """The job's image references in order (empty for ``text_embed``)."""
        if self.images is not None:
            return list(self.images)
        return [] if self.image is None else [self.image]

    @property
    def is_bulk(self) -> bool:
        return self.images is not None


_OPTION_KINDS: dict[str, tuple[JobKind, ...]] = {
    "template": ("tag", "rank", "text_embed"),
    "prompts": ("tag",),
    "mode": ("tag",),
    "multilabel_center": ("tag",),
    "threshold": ("tag",),
    "top_k": ("tag", "rank"),
    "return_embedding": ("tag", "rank"),
}
"""The job kinds each option applies to; setting it on another kind is an invalid request."""


def parse_job(payload: Any, *, max_labels: int = MAX_LABELS_DEFAULT) -> JobRequest:
    """Validate a job document, raising ``JobError(invalid_request)`` naming the bad field.

    Args:
        payload: the decoded JSON object (a ``dict``); anything else is rejected.
        max_labels: the largest accepted number of labels or texts.
    """
    if not isinstance(payload, dict):
        raise JobError(
            ErrorCode.INVALID_REQUEST, f"a job must be a JSON object, got {type(payload).__name__}"
        )
    try:
        return JobRequest.model_validate(payload, context={"max_labels": max_labels})
    except ValidationError as exc:
        raise JobError(ErrorCode.INVALID_REQUEST, describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field, e.g. ``labels: Input should be a valid list``."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "job"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    return "; ".join(problems)


class LabelScore(BaseModel):
    label: str
    score: float


class ModelInfo(BaseModel):
    id: str
    revision: str | None = None


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    retryable: bool


class EncodedEmbedding(BaseModel):
    """An L2-normalized embedding: little-endian ``dtype`` values, base64-encoded."""

    dtype: EmbeddingDtype
    dim: int
    b64: str

    def to_list(self) -> list[float]:
        """The ``dim`` values as Python floats (decoded from ``b64``)."""
        code = {"float32": "f", "float16": "e"}[self.dtype]
        return list(struct.unpack(f"<{self.dim}{code}", base64.b64decode(self.b64)))


class RankedText(BaseModel):
    text: str
    similarity: float
    rank: int


class ItemResult(BaseModel):
    """The outcome for one image (a single job's fields, or one entry of a bulk job)."""

    image: str | None = None
    status: Status
    scores: list[LabelScore] | None = None
    tags: list[str] | None = None
    top_label: str | None = None
    embedding: EncodedEmbedding | None = None
    texts: list[RankedText] | None = None
    error: ErrorInfo | None = None
    batch_id: str | None = None
    batch_size: int | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)


class JobResult(ItemResult):
    """The document stored in the result backend (and POSTed to a webhook)."""

    job_id: str
    kind: JobKind = "tag"
    model: ModelInfo | None = None
    items: list[ItemResult] | None = None
    text_embeddings: list[EncodedEmbedding] | None = None
    label_set_version: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 1
    finished_at: float = Field(default_factory=time.time)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def error_result(
    job_id: str, error: JobError, *, kind: JobKind = "tag", metadata: dict[str, Any] | None = None
) -> JobResult:
    """The result document of a job that failed as a whole."""
    return JobResult(
        job_id=job_id,
        kind=kind,
        status="error",
        error=ErrorInfo(**error.to_dict()),
        metadata=metadata or {},
    )
