"""Crash-ordered file writes: the one place kiln fsyncs, renames and publishes.

Checkpoints, export bundles and the artifact store all follow the same order, so a
crash at any point leaves either the old state or the new one, never a torn file:

1. write the bytes to a temporary name beside the target, flush and fsync them;
2. ``os.replace`` the temporary name onto the target (atomic on POSIX);
3. fsync the parent directory so the rename itself is durable.

Directories are published the same way (:func:`publish_dir`). An existing target is
swapped with the new one in one atomic step where the kernel can (Linux
``renameat2(RENAME_EXCHANGE)``), else moved aside first and removed only after the new
one is in place.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TMP_MARK",
    "DEL_MARK",
    "OLD_MARK",
    "fsync_dir",
    "write_synced",
    "write_text_synced",
    "write_json_synced",
    "write_atomic",
    "write_json_atomic",
    "publish_dir",
    "remove_dir",
    "is_partial",
]

#: Name markers of in-flight writes, directories being deleted, and replaced ones.
TMP_MARK, DEL_MARK, OLD_MARK = ".tmp-", ".del-", ".old-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, making renames inside it durable (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, write: Callable[[IO[bytes]], Any]) -> int:
    """Create ``path``, let ``write(handle)`` fill it, flush and fsync; return its size."""
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return path.stat().st_size


def write_text_synced(path: Path, text: str) -> int:
    """Write ``text`` as UTF-8 to ``path`` and fsync it; return its size."""
    return write_synced(path, lambda h: h.write(text.encode("utf-8")))


def write_json_synced(path: Path, data: Any, *, sort_keys: bool = False) -> int:
    """Write ``data`` as indented JSON to ``path`` and fsync it; return its size."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n"
    return write_text_synced(path, text)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> int:
    """Replace ``path`` atomically with what ``write(handle)`` produces; return its size."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        size = write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return size


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = False) -> int:
    """Replace ``path`` atomically with ``data`` as indented JSON."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n"
    return write_atomic(path, lambda h: h.write(text.encode("utf-8")))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_dir(tmp: Path, final: Path, *, replace: bool = True) -> None:
    """Move the finished directory ``tmp`` to ``final`` (fsync'd first), crash-ordered.

    An existing ``final`` is swapped with ``tmp`` atomically where the kernel can
    (then removed under ``tmp``'s name); elsewhere it is renamed aside first and
    deleted only once ``tmp`` is in place, and put back if the move fails. With ``replace=False``
    an existing ``final`` raises ``FileExistsError`` and nothing changes.
    """
    fsync_dir(tmp)
    aside: Path | None = None
    if final.exists():
        if not replace:
            raise FileExistsError(f"{str(final)!r} already exists")
        if _exchange(tmp, final):  # a crash now leaves the old one under tmp's name
            fsync_dir(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = final.with_name(f"{final.name}{OLD_MARK}{uuid.uuid4().hex}")
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside is not None and not final.exists():
            os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Rename aside (atomic), then delete: a crash never leaves a half-deleted directory."""
    if not path.exists():
        return
    aside = path.with_name(f"{path.name}{DEL_MARK}{uuid.uuid4().hex}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def is_partial(name: str) -> bool:
    """True for names of unfinished writes, deletions or replaced directories."""
    return any(marker in name for marker in (TMP_MARK, DEL_MARK, OLD_MARK))
