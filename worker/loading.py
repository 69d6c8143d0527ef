"""Find and load a CLIP checkpoint: an HF hub id, a local directory, or an ``s3://`` prefix.

Loading happens once per worker process. When the model cannot be had, the worker
stops with one :class:`ModelUnavailable` line saying what was tried and how to fix it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerBase

from producer.errors import CliptagError

COMPLETE_MARKER = ".cliptag-complete"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "cliptag" / "models"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelUnavailable(CliptagError):
    """The configured checkpoint could not be loaded; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A CLIP checkpoint ready for inference.

    Attributes:
        model: the ``CLIPModel`` in eval mode on ``device`` in ``dtype``.
        tokenizer: the checkpoint's tokenizer.
        processor: the checkpoint's image processor config, as ``CLIPImageProcessorPil``.
        source: the configured model source, reported as the model id in every result.
        revision: the hub commit, when known.
    """

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    processor: CLIPImageProcessorPil
    source: str
    revision: str | None
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; empty picks CUDA when available."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelUnavailable(f"CLIPTAG_DEVICE={name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"CLIPTAG_DEVICE={name!r} but CUDA is not available on this host")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The named dtype; empty means fp16 on CUDA and fp32 elsewhere."""
    if not name:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ModelUnavailable(f"CLIPTAG_DTYPE={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def gives_one_input_size(processor: CLIPImageProcessorPil) -> bool:
    """Whether every image comes out of ``processor`` at the same height and width."""
    if processor.do_center_crop:
        return True
    return bool(processor.do_resize and processor.size.height and processor.size.width)


def download_s3_prefix(uri: str, *, cache_dir: Path, endpoint_url: str | None = None) -> Path:
    """Download every object under ``s3://bucket/prefix`` once into ``cache_dir``.

    A marker file records a finished download, so a crash half-way starts over and a
    finished one is reused without touching S3 again.
    """
    import boto3

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    key_prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""  # the bucket's root too
    target = (cache_dir / bucket / key_prefix).resolve()
    if (target / COMPLETE_MARKER).exists():
        return target
    client = boto3.client("s3", endpoint_url=endpoint_url)
    found = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for entry in page.get("Contents", []):
            relative = entry["Key"][len(key_prefix) :]
            if not relative or relative.endswith("/"):
                continue
            destination = (target / relative).resolve()
            if not destination.is_relative_to(target):  # a key with ".." would write anywhere
                raise ModelUnavailable(f"object key {entry['Key']!r} in {uri} leads out of its directory")
            destination.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, entry["Key"], str(destination))
            found += 1
    if not found:
        raise ModelUnavailable(f"no objects under {uri}; check the bucket and prefix")
    (target / COMPLETE_MARKER).touch()
    return target


def locate_checkpoint(source: str, *, cache_dir: Path, s3_endpoint_url: str | None) -> tuple[str, str]:
    """Where to load ``source`` from, and a phrase naming what was tried (for errors)."""
    if source.startswith("s3://"):
        try:
            local = download_s3_prefix(source, cache_dir=cache_dir, endpoint_url=s3_endpoint_url)
        except ModelUnavailable:
            raise
        except Exception as exc:  # boto3 raises many unrelated types for one cause
            raise ModelUnavailable(
                f"could not download CLIP model from {source} ({type(exc).__name__}: {exc}); "
                "check AWS credentials, CLIPTAG_S3_ENDPOINT_URL and the prefix"
            ) from None
        return str(local), f"the S3 copy in {local}"
    if Path(source).is_dir():
        return source, f"the local directory {source}"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    where = (
        "the Hugging Face cache only (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub and cache"
    )
    return source, f"{where} for hub id {source!r}"


def load_clip(
    source: str,
    *,
    device: str = "",
    dtype: str = "",
    cache_dir: Path = DEFAULT_CACHE_DIR,
    s3_endpoint_url: str | None = None,
) -> LoadedModel:
    """Load model, tokenizer and image processor config from ``source``.

    Args:
        source: HF hub id, local directory, or ``s3://bucket/prefix``.
        device: as :func:`resolve_device`.
        dtype: as :func:`resolve_dtype`.
        cache_dir: download cache for ``s3://`` sources.
        s3_endpoint_url: S3-compatible endpoint, or ``None`` for AWS.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    location, tried = locate_checkpoint(source, cache_dir=cache_dir, s3_endpoint_url=s3_endpoint_url)
    try:
        model = CLIPModel.from_pretrained(location, dtype=torch_dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(location)
        processor = CLIPImageProcessorPil.from_pretrained(location)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(
            f"could not load CLIP model {source!r} from {tried}: {first_line}. "
            "Fix: download it once with network access (huggingface-cli download "
            f"{source}), or set CLIPTAG_MODEL to a local directory or s3:// prefix holding a "
            "save_pretrained() checkpoint"
        ) from None
    if not gives_one_input_size(processor):
        raise ModelUnavailable(
            f"the image processor of {source!r} neither center-crops nor resizes to a fixed height "
            "and width, so images of different shapes could not share a batch"
        )
    model.eval().to(torch_device)
    revision = getattr(model.config, "_commit_hash", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        source=source,
        revision=revision,
        device=torch_device,
        dtype=torch_dtype,
    )
