"""Read images from local files under configured roots, and from inline ``data:`` URLs.

A local path is refused when it has a ``..`` component, when it (after following every
symlink) lies outside the roots, or when it is not a regular file (devices, FIFOs,
sockets, directories). The file is opened without following a final symlink and checked
on the open descriptor: its type, and (Linux) the path it really has, read back from
``/proc/self/fd``, so a swap between check and open does not escape either.

Every system call releases and retakes the GIL, which in a busy worker means waiting for
it again, so reading a regular file takes few of them: ``lstat``, ``open``, ``fstat``,
``readlink`` of the descriptor, ``read`` and ``close``. Where the descriptor's path cannot
be read back, the path is resolved and checked before it is opened instead; refusals
resolve it too, so that their message is the same either way.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

from producer.errors import ErrorCode, JobError, shorten

LOCAL_FILE_HOSTS = frozenset({"", "localhost"})
READ_CHUNK = 1 << 16
CAN_READ_OPENED_PATH = os.path.isdir("/proc/self/fd")
"""Linux: an open descriptor's real path is a ``readlink`` of ``/proc/self/fd/N``."""
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
    if ".." in raw_path.split(os.sep):
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} contains '..'")
    descriptor = _open_under_roots(raw_path, roots, shown)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} is not a regular file")
        if CAN_READ_OPENED_PATH:  # else _open_under_roots resolved and checked the path
            _check_under(os.readlink(f"/proc/self/fd/{descriptor}"), roots, shown)
        if info.st_size > max_bytes:
            raise JobError(ErrorCode.TOO_LARGE, f"{shown!r} is {info.st_size} bytes, over {max_bytes}")
        data = _read_at_most(descriptor, max_bytes + 1, expected=info.st_size)
    except OSError as exc:
        raise JobError(ErrorCode.FETCH_FAILED, f"reading {shown!r} failed ({exc.strerror})") from None
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise JobError(ErrorCode.TOO_LARGE, f"{shown!r} is more than {max_bytes} bytes")
    return data


def _read_at_most(descriptor: int, limit: int, *, expected: int) -> bytes:
    """Up to ``limit`` bytes of a regular file, in one ``read`` when it is about ``expected``
    bytes long (a read of a regular file that returns less than asked has reached its end)."""
    chunks = []
    size = 0
    while size < limit:
        wanted = min(limit - size, max(expected + 1 - size, READ_CHUNK))
        chunk = os.read(descriptor, wanted)
        chunks.append(chunk)
        size += len(chunk)
        if len(chunk) < wanted:
            break
    return b"".join(chunks)


def _open_under_roots(raw_path: str, roots: tuple[Path, ...], shown: str) -> int:
    """A descriptor of the regular file ``raw_path`` names, checked to lie under ``roots``
    before it is opened, or (on Linux, where the opened file's real path can be read back)
    right after: the common case costs an ``lstat`` and an ``open``.

    Raises:
        JobError: ``forbidden_path`` or ``fetch_not_found``.
    """
    candidate = os.path.abspath(raw_path)
    try:
        info = os.lstat(candidate)
        if stat.S_ISLNK(info.st_mode) or not CAN_READ_OPENED_PATH:
            candidate = os.path.realpath(candidate, strict=True)
            info = os.stat(candidate)
            _check_under(candidate, roots, shown)
        if not stat.S_ISREG(info.st_mode):
            _check_under(os.path.realpath(candidate), roots, shown)
            raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} is not a regular file")
        return os.open(candidate, OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        _check_under(os.path.realpath(candidate), roots, shown)
        raise JobError(ErrorCode.FETCH_NOT_FOUND, f"no file at {shown!r}") from None
    except PermissionError:
        _check_under(os.path.realpath(candidate), roots, shown)  # outside: the same message as any
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} is not readable") from None
    except OSError as exc:  # ELOOP: a symlink loop, or a symlink swapped in after the check
        _check_under(os.path.realpath(candidate), roots, shown)
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} cannot be opened ({exc.strerror})") from None


def _check_under(path: str, roots: tuple[Path, ...], shown: str) -> None:
    if not _under(path, roots):
        raise JobError(ErrorCode.FORBIDDEN_PATH, f"{shown!r} is outside CLIPTAG_LOCAL_ROOTS")


def _under(path: str, roots: tuple[Path, ...]) -> bool:
    """Whether the absolute, resolved ``path`` is one of ``roots`` or lies below one."""
    return any(path == str(root) or path.startswith(_as_directory(root)) for root in roots)


@lru_cache(maxsize=64)
def _as_directory(root: Path) -> str:
    return os.path.join(str(root), "")
