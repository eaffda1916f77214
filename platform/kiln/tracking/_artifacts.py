"""A content-addressed folder of artifacts: each one stored once, under its sha256.

``put(src)`` copies a file or a directory to ``<root>/<sha256>/<name of src>``; the
copy is written under a temporary name, fsynced and renamed into place, so a crash
never leaves a half-written artifact at a real address. A directory's sha256 is taken
over a canonical walk (sorted relative paths, each with its bytes' sha256), so the
same content gives the same address wherever it came from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from kiln._fs import TMP_MARK, fsync_dir
from kiln.errors import ArtifactPathError, CheckpointError, IntegrityError

__all__ = ["ArtifactPathError", "ArtifactStore", "sha256_of"]

_CHUNK = 1 << 20


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, or of a directory's canonical walk."""
    root = Path(path)
    if root.is_file():
        return _file_sha256(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint path {os.fspath(path)!r} does not exist")
    digest = hashlib.sha256(b"kiln-dir-v1\n")
    for item in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = item.relative_to(root).as_posix()
        digest.update(f"{rel}\0{_file_sha256(item)}\n".encode())
    return digest.hexdigest()


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        with f.open("rb") as handle:
            os.fsync(handle.fileno())


def _size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ArtifactStore:
    """The folder ``root`` holding content-addressed copies.

    Args:
        root: The store folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def put(self, src: str | os.PathLike[str]) -> tuple[str, Path, int]:
        """Copy ``src`` (file or directory) into the store: ``(sha256, stored path, bytes)``.

        A path already inside the store is not copied again; content already stored
        under its hash is reused.
        """
        source = Path(src).expanduser().resolve()
        sha = sha256_of(source)
        if self.contains(source) and source.parent.name == sha:
            return sha, source, _size_bytes(source)
        target = self.root / sha / source.name
        slot = self.root / sha
        if not slot.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f"{TMP_MARK}{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                if source.is_dir():
                    shutil.copytree(source, tmp / source.name)
                else:
                    shutil.copy2(source, tmp / source.name)
                _fsync_tree(tmp / source.name)
                os.rename(tmp, slot)  # atomic; fails if another process got there first
                fsync_dir(self.root)
            except OSError:
                if not slot.exists():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():  # same bytes stored earlier under another name
            target = next(slot.iterdir())
        return sha, target, _size_bytes(target)

    def contains(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` resolves (symlinks followed) to a place inside the store."""
        return Path(path).expanduser().resolve().is_relative_to(self.root)

    def checked_path(self, path: str | os.PathLike[str]) -> Path:
        """``path`` resolved; :class:`ArtifactPathError` if it lies outside the store."""
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_relative_to(self.root) or resolved == self.root:
            raise ArtifactPathError(
                f"artifact path {os.fspath(path)!r} lies outside the artifact store "
                f"{str(self.root)!r}; registry entries may only point inside it "
                f"(register the checkpoint to copy it there)"
            )
        return resolved

    def verify(self, path: str | os.PathLike[str], sha256: str) -> Path:
        """Return the stored path after checking its sha256; :class:`IntegrityError` if not."""
        resolved = self.checked_path(path)
        if not resolved.exists():
            raise CheckpointError(
                f"artifact {str(resolved)!r} is missing from the store (expected sha256 {sha256})"
            )
        actual = sha256_of(resolved)
        if actual != sha256:
            raise IntegrityError(
                f"artifact {str(resolved)!r} has sha256 {actual}, but the registry recorded "
                f"{sha256}; the stored copy was changed or damaged. Re-register the checkpoint."
            )
        return resolved
