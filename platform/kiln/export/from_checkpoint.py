"""Export from what training leaves behind: a checkpoint folder or a registry tag.

A kiln checkpoint folder holds ``model.pt`` (a state dict) and ``metadata.json``
with ``model_config``,
``input_shape``, ``num_outputs``, ``task_spec`` and ``training_config``, read
through :mod:`kiln.engine.checkpoint_reader`; the model is rebuilt with ``kiln.models.build_model``. ``NAME@TAG`` resolves through
``kiln.tracking.ModelRegistry`` (imported lazily, only when a tag is used).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kiln.engine.checkpoint_reader import (
    METADATA_FILE,
    MODEL_FILE,
    load_model_state,
    read_metadata,
    run_details,
)
from kiln.errors import CheckpointError
from kiln.export.bundle import create_export_bundle
from kiln.export.formats import DEFAULT_FORMATS, ExportError
from kiln.export.manifest import load_bundle, sha256_file

__all__ = [
    "REQUIRED_METADATA",
    "is_model_ref",
    "load_checkpoint_model",
    "export_checkpoint",
    "export_registered",
    "registered_checkpoint",
]

REQUIRED_METADATA = ("model_config", "input_shape", "num_outputs")


def is_model_ref(source: str) -> bool:
    """True for ``NAME@TAG`` or ``NAME:VERSION`` (registry references), not a path on disk."""
    return ("@" in source or ":" in source) and not Path(source).exists()


def load_checkpoint_model(checkpoint_dir: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model saved in a kiln checkpoint folder.

    Returns:
        ``(model, metadata)`` with the model in eval mode on CPU.

    Raises:
        CheckpointError: missing files or metadata keys, or weights that do not fit.
    """
    root = Path(checkpoint_dir)
    if not (root / MODEL_FILE).is_file():
        raise CheckpointError(
            f"checkpoint {str(root)!r} lacks {MODEL_FILE}; a kiln checkpoint has "
            f"{MODEL_FILE} and {METADATA_FILE}"
        )
    meta = run_details(read_metadata(root))  # the run's details are kept under "user"
    if "model_config" in meta and meta["model_config"] is None:
        raise CheckpointError(
            f"checkpoint {str(root)!r} was trained from a user-defined nn.Module, so kiln cannot "
            "rebuild it from metadata; export it from Python with "
            "kiln.export.create_export_bundle(model, ...)"
        )
    absent = [k for k in REQUIRED_METADATA if k not in meta]
    if absent:
        raise CheckpointError(
            f"checkpoint {str(root)!r}: metadata.json lacks {absent}; export needs {list(REQUIRED_METADATA)}"
        )
    from kiln.models import build_model

    model = build_model(
        meta["model_config"],
        input_shape=tuple(meta["input_shape"]),
        num_outputs=meta["num_outputs"],
    )
    state = load_model_state(root)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {str(root)!r}: weights do not fit the model: {exc}"
        ) from None
    return model.eval(), meta


def export_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    formats: str | Iterable[str] = DEFAULT_FORMATS,
    *,
    bundle_name: str | None = None,
    overwrite: bool = False,
    registered: dict[str, Any] | None = None,
) -> Path:
    """Rebuild the model of a checkpoint folder and export it as a bundle."""
    model, meta = load_checkpoint_model(checkpoint_dir)
    return create_export_bundle(
        model,
        meta.get("model_config"),
        meta.get("task_spec"),
        meta.get("training_config"),
        output_dir,
        formats,
        input_shape=meta["input_shape"],
        bundle_name=bundle_name,
        overwrite=overwrite,
        registered=registered,
    )


def registered_checkpoint(
    ref: str, db_path: str | os.PathLike[str], artifacts_dir: str | os.PathLike[str]
) -> tuple[Path, Any]:
    """``(checkpoint_dir, entry)`` for a registry reference, the stored hash verified."""
    from kiln.tracking import ModelRegistry

    registry = ModelRegistry(db_path, artifacts_dir)
    try:
        entry = registry.resolve(ref)
        return Path(registry.load_checkpoint_path(entry)), entry
    finally:
        registry.close()


def export_registered(
    ref: str,
    db_path: str | os.PathLike[str],
    artifacts_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    formats: str | Iterable[str] = DEFAULT_FORMATS,
) -> tuple[Path, Any]:
    """Bundle for ``NAME@TAG``, exported once into ``cache_dir`` keyed by the weights' sha256.

    Returns:
        ``(bundle_dir, registry_entry)``; a cached bundle that still verifies is reused.
    """
    checkpoint, entry = registered_checkpoint(ref, db_path, artifacts_dir)
    digest = getattr(entry, "sha256", None) or sha256_file(checkpoint / MODEL_FILE)
    fmt_key = "-".join(sorted(formats.split(",") if isinstance(formats, str) else formats))
    name = f"{_safe(entry.name)}-{_safe(str(entry.version))}-{digest[:16]}-{fmt_key}"
    cached = Path(cache_dir) / name
    if cached.exists():
        try:
            load_bundle(cached, verify=True)
            return cached, entry
        except Exception:
            pass  # a broken cache entry is rebuilt below
    try:
        identity = {"name": entry.name, "version": str(entry.version), "model_id": entry.model_id}
        bundle = export_checkpoint(
            checkpoint, cache_dir, formats, bundle_name=name, overwrite=True, registered=identity
        )
    except CheckpointError as exc:
        raise ExportError(f"{ref!r}: {exc}") from exc
    return bundle, entry


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
