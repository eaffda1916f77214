"""Reading kiln checkpoints: the one place that parses a checkpoint folder.

A checkpoint folder (``epoch_0003/``) holds ``model.pt`` (the model's state dict),
``train_state.pt`` (optimizer, scheduler, scaler, RNG, epoch, step) and
``metadata.json``; its parent holds ``manifest.json``, the index of retained
checkpoints. A sharded (FSDP) checkpoint also holds ``shards/`` (DCP, read by
:mod:`kiln.engine.sharded_checkpoint`); :func:`is_sharded_checkpoint` tells them
apart. :mod:`kiln.engine.checkpoint` writes them; the trainer, Tune, export
and evaluation read them only through :func:`resolve_checkpoint`,
:func:`read_metadata` and :func:`load_checkpoint_state`. Every ``torch.load`` here
uses ``weights_only=True``: a checkpoint carrying a pickled payload is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kiln._fs import is_partial
from kiln.config.modes import MetricMode
from kiln.errors import CheckpointError

__all__ = [
    "CheckpointMetadata",
    "CheckpointState",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "MODEL_FILE",
    "TRAIN_STATE_FILE",
    "load_checkpoint_state",
    "load_model_state",
    "TRAINABLE_ONLY_ATTR",
    "model_state_dict",
    "saves_trainable_only",
    "is_sharded_checkpoint",
    "SHARDS_DIR",
    "read_metadata",
    "resolve_checkpoint",
    "run_details",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
METADATA_FILE = "metadata.json"
SHARDS_DIR = "shards"  # a sharded checkpoint's DCP folder; its .metadata is written last
_KEYWORDS = ("latest", "best")


@dataclass
class CheckpointMetadata:
    """What is known about one saved checkpoint.

    ``user`` is the ``metadata`` given to ``save_checkpoint``; it is stored in the
    checkpoint's ``metadata.json`` only, so ``CheckpointManager.checkpoints``
    leaves it empty and ``load_checkpoint`` fills it.
    """

    path: str
    epoch: int
    metrics: dict[str, float]
    is_best: bool
    timestamp: str
    model_size_mb: float
    optimizer_state_size_mb: float
    step: int = 0
    user: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/DataParallel ``.module`` and ``torch.compile``'s ``_orig_mod``."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), torch.nn.Module):
            model = inner
        else:
            return model


TRAINABLE_ONLY_ATTR = "kiln_save_trainable_only"


def saves_trainable_only(model: torch.nn.Module) -> bool:
    """True when ``model`` asks that checkpoints hold only its trainable parameters.

    A model built with frozen weights it can rebuild exactly (a LoRA adapter over a
    base model read from disk) sets ``kiln_save_trainable_only = True``; its
    checkpoints then hold the adapter and the optimizer state only, and load with
    ``strict=False``.
    """
    return bool(getattr(unwrap_model(model), TRAINABLE_ONLY_ATTR, False))


def model_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The state dict a checkpoint stores: all of it, or the trainable parameters only."""
    inner = unwrap_model(model)
    state = inner.state_dict()
    if not saves_trainable_only(inner):
        return state
    trainable = {name for name, p in inner.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """State-dict keys without DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.``."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a checkpoint folder holding DCP shards (a complete ``shards/.metadata``)."""
    return (Path(path) / SHARDS_DIR / ".metadata").is_file()


def _listing(path: Path, limit: int = 10) -> str:
    if not path.is_dir():
        return "nothing (it is not a directory)" if path.exists() else "nothing (it does not exist)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "nothing (empty directory)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _metric(metrics: Mapping[str, float], monitor: str) -> float | None:
    value = metrics.get(monitor)
    return value if value is not None and math.isfinite(value) else None


def _rank(entries: list[dict[str, Any]], monitor: str, mode: str) -> list[dict[str, Any]]:
    """Entries with a finite monitored metric, best first (ties: earlier save first)."""
    scored = [(e, _metric(e["metrics"], monitor)) for e in entries]
    ranked = [(i, e, v) for i, (e, v) in enumerate(scored) if v is not None]
    sign = MetricMode(mode).sign
    ranked.sort(key=lambda t: (sign * t[2], t[0]))
    return [e for _, e, _ in ranked]


def read_metadata(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``metadata.json`` of one checkpoint folder (CheckpointError if unreadable)."""
    ckpt = Path(ckpt)
    try:
        with open(ckpt / METADATA_FILE, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(
            f"{ckpt} is not a complete kiln checkpoint: {METADATA_FILE} is missing; it "
            f"contains: {_listing(ckpt)}"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {ckpt / METADATA_FILE}: {exc}") from exc


def _entry_from_metadata(name: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "epoch": int(meta.get("epoch", 0)),
        "step": int(meta.get("step", 0)),
        "metrics": dict(meta.get("metrics", {})),
        "timestamp": str(meta.get("timestamp", "")),
        "model_size_mb": float(meta.get("model_size_mb", 0.0)),
        "optimizer_state_size_mb": float(meta.get("optimizer_state_size_mb", 0.0)),
    }


def run_details(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata with the run's details (``user``: model_config, task_spec, ...) on top."""
    return {**metadata, **metadata.get("user", {})}


@dataclass
class _Index:
    entries: list[dict[str, Any]]  # retained, in save order (last = latest)
    history: list[dict[str, Any]]  # every save, in order
    monitor: str | None
    mode: str | None
    pruned: list[str] = field(default_factory=list)  # dropped by the manifest, not yet removed


def _read_index(root: Path) -> _Index:
    """The manifest, reconciled with the directories that really exist.

    Manifest entries whose directory is gone are dropped; complete checkpoint
    directories missing from the manifest (a crash between rename and manifest
    write) are appended in timestamp order, unless the manifest's history already
    holds that very save: then the manifest dropped it and a crash came before the
    directory was removed, so it is listed in ``pruned`` and never loaded.
    """
    manifest: dict[str, Any] = {}
    if (root / MANIFEST_FILE).is_file():
        try:
            manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable %s: %s", root / MANIFEST_FILE, exc)
    complete = {
        p.name
        for p in (root.iterdir() if root.is_dir() else [])
        if p.is_dir() and not is_partial(p.name) and (p / METADATA_FILE).is_file()
    }
    entries = [e for e in manifest.get("checkpoints", []) if e.get("name") in complete]
    known = {e["name"] for e in entries}
    orphans = []
    monitor, mode = manifest.get("monitor"), manifest.get("mode")
    for name in sorted(complete - known):
        try:
            meta = json.loads((root / name / METADATA_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring checkpoint %s with unreadable metadata: %s", root / name, exc)
            continue
        if not _whole(root / name, meta):
            logger.warning("ignoring checkpoint %s: its files are not all there", root / name)
            continue
        orphans.append(_entry_from_metadata(name, meta))
        monitor = monitor or meta.get("monitor")
        mode = mode or meta.get("mode")
    orphans.sort(key=lambda e: (e["timestamp"], e["epoch"], e["step"]))
    history = list(manifest.get("history", []))
    recorded = {(h.get("name"), h.get("timestamp")) for h in history}
    pruned = [e["name"] for e in orphans if (e["name"], e["timestamp"]) in recorded]
    orphans = [e for e in orphans if e["name"] not in pruned]
    history += orphans
    return _Index(entries + orphans, history, monitor, mode, pruned)


def _whole(ckpt: Path, meta: Mapping[str, Any]) -> bool:
    """Every file ``meta`` lists is in ``ckpt``, at its recorded size where one is recorded.

    A folder outside the manifest may be an upload to storage that stopped part way
    (files arrive in any order there, metadata.json perhaps first).
    """
    sizes = meta.get("file_bytes") or {}
    for name in meta.get("files") or []:
        path = ckpt / name
        if not path.is_file():
            return False
        if name in sizes and path.stat().st_size != int(sizes[name]):
            return False
    return True


def _checkpoint_root(directory: Path) -> Path:
    """``directory`` itself, or its ``checkpoints/`` subdirectory (a run directory)."""
    has_own = (directory / MANIFEST_FILE).is_file() or any(
        p.is_dir() and (p / METADATA_FILE).is_file() for p in directory.iterdir()
    )
    if not has_own and (directory / "checkpoints").is_dir():
        return directory / "checkpoints"
    return directory


def resolve_checkpoint(
    path_or_keyword: str | os.PathLike[str], checkpoint_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Resolve ``"latest"``, ``"best"``, a checkpoint dir, or a checkpoint/run dir to one checkpoint.

    A directory holding checkpoints (or a run directory with ``checkpoints/``)
    resolves to its latest checkpoint. Raises CheckpointError saying what exists.
    """
    text = os.fspath(path_or_keyword)
    if text in _KEYWORDS:
        if checkpoint_dir is None:
            raise CheckpointError(
                f"checkpoint {text!r} needs a checkpoint directory to look in; pass "
                "checkpoint_dir or a path"
            )
        directory = Path(checkpoint_dir)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist")
        root = _checkpoint_root(directory)
        index = _read_index(root)
        if not index.entries:
            raise CheckpointError(
                f"no complete checkpoint in {str(root)!r} to resolve {text!r}; it contains: "
                f"{_listing(root)}"
            )
        if text == "latest":
            return root / index.entries[-1]["name"]
        monitor, mode = index.monitor or "val_loss", index.mode or "min"
        ranked = _rank(index.entries, monitor, mode)
        if not ranked:
            raise CheckpointError(
                f"no checkpoint in {str(root)!r} has a finite {monitor!r} metric, so there is no "
                f"'best'; use 'latest' ({index.entries[-1]['name']})"
            )
        return root / ranked[0]["name"]
    path = Path(text)
    if not path.exists() and checkpoint_dir is not None and (Path(checkpoint_dir) / text).exists():
        path = Path(checkpoint_dir) / text
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {text!r} does not exist; {str(path.parent)!r} contains: "
            f"{_listing(path.parent)}"
        )
    if is_partial(path.name):
        raise CheckpointError(f"{text!r} is an incomplete checkpoint (a save that did not finish)")
    if (path / METADATA_FILE).is_file():
        return path
    if path.is_dir():
        root = _checkpoint_root(path)
        if _read_index(root).entries:
            return resolve_checkpoint("latest", root)
    raise CheckpointError(
        f"{text!r} is not a kiln checkpoint (no {METADATA_FILE}); it contains: {_listing(path)}"
    )


def _torch_load(path: Path, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing") from None
    except Exception as exc:  # unpickling errors have many types
        raise CheckpointError(f"cannot load {str(path)!r} with weights_only=True: {exc}") from exc


class CheckpointState(NamedTuple):
    """What :func:`load_checkpoint_state` returns; unpacks as a 3-tuple."""

    model_state: dict[str, Any]
    train_state: dict[str, Any]
    metadata: dict[str, Any]


def load_model_state(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The model's state dict alone from a checkpoint folder (prefixes stripped)."""
    ckpt = resolve_checkpoint(path)
    state = _torch_load(ckpt / MODEL_FILE, map_location)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a {"model": state_dict, ...} file written by hand
    return strip_prefixes(state)


def load_checkpoint_state(
    path: str | os.PathLike[str], map_location: Any = "cpu"
) -> CheckpointState:
    """Read ``(model_state, train_state, metadata)`` from a checkpoint directory.

    ``path`` is anything :func:`resolve_checkpoint` accepts without a keyword.
    ``train_state`` is ``{}`` when the checkpoint has none.
    """
    ckpt = resolve_checkpoint(path)
    metadata = read_metadata(ckpt)
    model_state = _torch_load(ckpt / MODEL_FILE, map_location)
    train_path = ckpt / TRAIN_STATE_FILE
    train_state = _torch_load(train_path, map_location) if train_path.exists() else {}
    return CheckpointState(model_state, train_state, metadata)


def _metadata_object(ckpt: Path, meta: Mapping[str, Any]) -> CheckpointMetadata:
    return CheckpointMetadata(
        path=str(ckpt),
        epoch=int(meta.get("epoch", 0)),
        metrics=dict(meta.get("metrics", {})),
        is_best=bool(meta.get("is_best", False)),
        timestamp=str(meta.get("timestamp", "")),
        model_size_mb=float(meta.get("model_size_mb", 0.0)),
        optimizer_state_size_mb=float(meta.get("optimizer_state_size_mb", 0.0)),
        step=int(meta.get("step", 0)),
        user=dict(meta.get("user", {})),
    )
