"""Reading a bundle back: the manifest, its hashes, and the ``Bundle`` view of it.

``load_bundle`` is what the server (and anything else that trusts a bundle) calls:
it refuses a bundle whose files are missing or whose sha256 differs from the
manifest, before any byte of a model is used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import IntegrityError, KilnError

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA_VERSION",
    "Bundle",
    "load_bundle",
    "sha256_file",
    "public_metadata",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified export bundle on disk.

    Attributes:
        path: The bundle directory.
        manifest: The parsed ``manifest.json``.
    """

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def formats(self) -> list[str]:
        return list(self.manifest["formats"])

    @property
    def task_type(self) -> str:
        return self.manifest["task_type"]

    @property
    def input_shape(self) -> list[int]:
        """Per-row input shape (without the batch axis)."""
        return list(self.manifest["inputs"][0]["shape"][1:])

    @property
    def input_dtype(self) -> str:
        return self.manifest["inputs"][0]["dtype"]

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("preprocessing", {}).get("class_names")

    @property
    def artifact_sha256(self) -> dict[str, str]:
        return {fmt: info["sha256"] for fmt, info in self.manifest["artifacts"].items()}

    def artifact_path(self, fmt: str) -> Path:
        """Path of one format's artifact; ``KilnError`` if the bundle lacks it."""
        info = self.manifest["artifacts"].get(fmt)
        if info is None:
            raise KilnError(
                f"bundle {str(self.path)!r} has no {fmt!r} artifact; it has {self.formats}"
            )
        return self.path / info["path"]

    def metadata(self) -> dict[str, Any]:
        """The manifest without file paths (what ``GET /metadata`` returns)."""
        return public_metadata(self.manifest)


def public_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    """Copy of a manifest with every file path removed."""
    out = {k: v for k, v in manifest.items() if k != "files"}
    out["artifacts"] = {
        fmt: {k: v for k, v in info.items() if k != "path"}
        for fmt, info in manifest.get("artifacts", {}).items()
    }
    return out


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory, checking every recorded sha256 when ``verify``.

    Raises:
        KilnError: ``path`` is not a bundle (no readable manifest).
        IntegrityError: a listed file is missing or its hash does not match.
    """
    root = Path(path).expanduser().resolve()
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise KilnError(f"bundle: {str(root)!r} has no {MANIFEST_NAME}; is it an export bundle?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"bundle: cannot read {str(manifest_path)!r}: {exc}") from None
    version = manifest.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise KilnError(
            f"bundle: manifest schema_version={version!r} is not supported; "
            f"this kiln reads version {MANIFEST_SCHEMA_VERSION}"
        )
    _check_paths(root, manifest)
    if verify:
        _verify_files(root, manifest)
    return Bundle(path=root, manifest=manifest)


def _check_paths(root: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest naming absolute paths, ``..`` or a symlink leaving the bundle."""
    names = list(manifest.get("files", {}) or {})
    names += [info.get("path", "") for info in (manifest.get("artifacts", {}) or {}).values()]
    problems = []
    for rel in names:
        if not isinstance(rel, str) or not rel:
            problems.append(f"{rel!r} is not a relative file path")
        elif Path(rel).is_absolute() or rel.startswith(("/", "\\")):
            problems.append(f"{rel!r} is an absolute path")
        elif ".." in Path(rel).parts or ".." in rel.split("\\"):
            problems.append(f"{rel!r} contains '..'")
        elif root not in (root / rel).resolve().parents:
            problems.append(f"{rel!r} leads outside the bundle (a symlink)")
    if problems:
        raise IntegrityError(
            f"bundle {str(root)!r}: manifest paths must stay inside the bundle, refusing it: "
            + "; ".join(problems)
        )


def _verify_files(root: Path, manifest: dict[str, Any]) -> None:
    files: dict[str, str] = dict(manifest.get("files", {}))
    for info in manifest.get("artifacts", {}).values():
        files[info["path"]] = info["sha256"]
    problems = []
    for rel, expected in sorted(files.items()):
        target = (root / rel).resolve()
        if root not in target.parents:
            problems.append(f"{rel!r} points outside the bundle")
        elif not target.is_file():
            problems.append(f"{rel!r} is missing")
        elif (actual := sha256_file(target)) != expected:
            problems.append(
                f"{rel!r} has sha256 {actual[:16]}..., manifest says {expected[:16]}..."
            )
    if problems:
        raise IntegrityError(
            f"bundle {str(root)!r} failed verification, refusing to use it: " + "; ".join(problems)
        )
