"""Read images from local files under configured roots, and from inline ``data:`` URLs.

A local path is refused when it has a ``..`` component, when it (after following every
symlink) lies outside the roots, or when it is not a regular file (devices, FIFOs,
sockets, directories). The file is opened without following a final symlink and checked
again on the open descriptor, so a swap after the check does not escape either.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path, PurePath
from urllib.parse import unquote, urlsplit

from producer.errors import ErrorCode, JobError, shorten

LOCAL_FILE_HOSTS = frozenset({"", "localhost"})
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def read_inline(reference: str, *, max_bytes: int) -> bytes:
    """The bytes of a ``data:…;base64,…`` URL (its declared media type is ignored).

    Raises:
        JobError: ``invalid_request`` (not base64) or ``too_large``.
    """
    header, _, payload = reference.partition(",")
    if not header.endswith(";base64"):
        raise JobError(ErrorCode.INVALID_REQUEST, "inline images must be data:…;base64, URLs")
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise JobError(ErrorCode.TOO_LARGE, f"inline image exceeds {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise JobError(ErrorCode.INVALID_REQUEST, "inline image is not valid base64") from None
    if len(data) > max_bytes:
        raise JobError(ErrorCode.TOO_LARGE, f"inline image is {len(data)} bytes, over {max_bytes}")
    return data


def file_url_path(url: str) -> str:
    """The local path of a ``file://`` URL (``file:///p`` or ``file://localhost/p``).

    Raises:
        JobError: ``forbidden_path`` when the URL names another host.
    """
    parts = urlsplit(url)
    if parts.netloc.lower() not in LOCAL_FILE_HOSTS:
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shorten(url)!r} names a remote host")
    return unquote(parts.path)


def read_local(raw_path: str, *, roots: tuple[Path, ...], max_bytes: int) -> bytes:
    """The bytes of the regular file ``raw_path``, which must lie under one of ``roots``.

    Error messages name ``raw_path`` as given, never what it resolves to.

    Raises:
        JobError: ``forbidden_path``, ``fetch_not_found``, ``too_large`` or ``fetch_failed``.
    """
    shown = shorten(raw_path)
    if not roots:
        raise JobError(ErrorCode.FORBIDDEN_PATH, "local paths are disabled (set CLIPTAG_LOCAL_ROOTS)")
    if "\x00" in raw_path:
        raise JobError(ErrorCode.INVALID_REQUEST, f"{shown!r} contains a NUL character")
    if ".." in PurePath(raw_path).parts:
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} contains '..'")
    try:
        resolved = Path(raw_path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} cannot be resolved") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} is outside CLIPTAG_LOCAL_ROOTS")
    try:
        if not stat.S_ISREG(resolved.stat().st_mode):
            raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} is not a regular file")
        descriptor = os.open(resolved, OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise JobError(ErrorCode.FETCH_NOT_FOUND, f"no file at {shown!r}") from None
    except PermissionError:
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} is not readable") from None
    except OSError as exc:  # ELOOP: swapped for a symlink after resolving
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} cannot be opened ({exc.strerror})") from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} is not a regular file")
        if info.st_size > max_bytes:
            raise JobError(ErrorCode.TOO_LARGE, f"{shown!r} is {info.st_size} bytes, over {max_bytes}")
        try:
            data = file.read(max_bytes + 1)
        except OSError as exc:
            raise JobError(ErrorCode.FETCH_FAILED, f"reading {shown!r} failed ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise JobError(ErrorCode.TOO_LARGE, f"{shown!r} is more than {max_bytes} bytes")
    return data
