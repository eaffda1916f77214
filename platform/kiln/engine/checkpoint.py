"""Crash-ordered checkpoints on local disk, with best-k / last-n retention.

Layout of ``checkpoint_dir``::

    manifest.json            index: retained checkpoints, metrics, best/latest, save history
    epoch_0003/              one directory per checkpoint, named by epoch number
        model.pt             model state dict (DDP ``.module`` / ``torch.compile`` unwrapped)
        train_state.pt       optimizer, scheduler, GradScaler, RNG states, epoch, step
        metadata.json        epoch, step, metrics, timestamp, monitor, sizes, kiln version, user

Order of a save, so that a crash at any point leaves the previous checkpoints
loadable and nothing half-written visible:

1. write every file into ``epoch_0003.tmp-<uuid>/``, flush + fsync each, fsync the dir;
2. ``os.replace`` it to ``epoch_0003`` and fsync ``checkpoint_dir``;
3. rewrite ``manifest.json`` atomically (tmp file, fsync, ``os.replace``);
4. only then prune: rename a dropped checkpoint to ``*.del-<uuid>`` and remove it.

Retention keeps the union of the ``keep_last_n`` most recent saves, the
``keep_best_k`` best by ``monitor`` (``mode``), and always the latest. A leftover
``*.tmp-*`` / ``*.del-*`` directory is never loaded and is removed when a manager
next opens the directory. Every ``torch.load`` here uses ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import torch

from kiln.engine.seed import get_rng_state, set_rng_state
from kiln.errors import CheckpointError, ConfigError

__all__ = [
    "CheckpointMetadata",
    "CheckpointManager",
    "CheckpointState",
    "load_checkpoint_state",
    "resolve_checkpoint",
    "unwrap_model",
    "model_state_dict",
    "saves_trainable_only",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "TRAIN_STATE_FILE",
    "METADATA_FILE",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
METADATA_FILE = "metadata.json"
_FORMAT = "kiln.checkpoint/1"
_MANIFEST_FORMAT = "kiln.checkpoints/1"
_TMP, _DEL, _OLD = ".tmp-", ".del-", ".old-"
_MB = float(2**20)
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


# ----------------------------------------------------------------------------- filesystem


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_synced(obj: Any, path: Path) -> int:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _write_json_synced(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}{_TMP}{uuid.uuid4().hex}")
    try:
        _write_json_synced(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _remove_dir(path: Path) -> None:
    """Rename aside (atomic) then delete, so a crash never leaves a half-deleted checkpoint."""
    if not path.exists():
        return
    aside = path.with_name(f"{path.name}{_DEL}{uuid.uuid4().hex}")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _is_partial(name: str) -> bool:
    return any(marker in name for marker in (_TMP, _DEL, _OLD))


def _listing(path: Path, limit: int = 10) -> str:
    if not path.is_dir():
        return "nothing (it is not a directory)" if path.exists() else "nothing (it does not exist)"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "nothing (empty directory)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ----------------------------------------------------------------------------- state dicts


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


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor detached and copied to CPU (the snapshot for async saves)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        try:
            out[str(key)] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            raise CheckpointError(
                f"metric {key!r} must be a number; got {value!r} ({type(value).__name__})"
            ) from None
    return out


def _metric(metrics: Mapping[str, float], monitor: str) -> float | None:
    value = metrics.get(monitor)
    return value if value is not None and math.isfinite(value) else None


def _better(a: float, b: float | None, mode: str) -> bool:
    return b is None or (a < b if mode == "min" else a > b)


# ----------------------------------------------------------------------------- index


def _rank(entries: list[dict[str, Any]], monitor: str, mode: str) -> list[dict[str, Any]]:
    """Entries with a finite monitored metric, best first (ties: earlier save first)."""
    scored = [(e, _metric(e["metrics"], monitor)) for e in entries]
    ranked = [(i, e, v) for i, (e, v) in enumerate(scored) if v is not None]
    ranked.sort(key=lambda t: (t[2] if mode == "min" else -t[2], t[0]))
    return [e for _, e, _ in ranked]


def _select_retained(
    entries: list[dict[str, Any]], keep_best_k: int, keep_last_n: int, monitor: str, mode: str
) -> set[str]:
    """Names to keep: last-n by save order, best-k by monitor, and always the latest."""
    names = [e["name"] for e in entries]
    keep = set(names[-keep_last_n:]) if keep_last_n > 0 else set()
    if names:
        keep.add(names[-1])
    keep.update(e["name"] for e in _rank(entries, monitor, mode)[:keep_best_k])
    return keep


def _read_metadata(ckpt: Path) -> dict[str, Any]:
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


@dataclass
class _Index:
    entries: list[dict[str, Any]]  # retained, in save order (last = latest)
    history: list[dict[str, Any]]  # every save, in order
    monitor: str | None
    mode: str | None


def _read_index(root: Path) -> _Index:
    """The manifest, reconciled with the directories that really exist.

    Manifest entries whose directory is gone are dropped; complete checkpoint
    directories missing from the manifest (a crash between rename and manifest
    write) are appended in timestamp order.
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
        if p.is_dir() and not _is_partial(p.name) and (p / METADATA_FILE).is_file()
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
        orphans.append(_entry_from_metadata(name, meta))
        monitor = monitor or meta.get("monitor")
        mode = mode or meta.get("mode")
    orphans.sort(key=lambda e: (e["timestamp"], e["epoch"], e["step"]))
    history = list(manifest.get("history", []))
    recorded = {(h.get("name"), h.get("timestamp")) for h in history}
    history += [e for e in orphans if (e["name"], e["timestamp"]) not in recorded]
    return _Index(entries + orphans, history, monitor, mode)


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
    if _is_partial(path.name):
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


def load_checkpoint_state(
    path: str | os.PathLike[str], map_location: Any = "cpu"
) -> CheckpointState:
    """Read ``(model_state, train_state, metadata)`` from a checkpoint directory.

    ``path`` is anything :func:`resolve_checkpoint` accepts without a keyword.
    ``train_state`` is ``{}`` when the checkpoint has none.
    """
    ckpt = resolve_checkpoint(path)
    metadata = _read_metadata(ckpt)
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


# ----------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves, indexes, prunes and loads the checkpoints of one run directory.

    Args:
        checkpoint_dir: created if missing. An existing directory's manifest is
            reloaded, so a resumed run keeps pruning correctly.
        keep_best_k: best checkpoints kept by ``monitor`` (>= 0).
        keep_last_n: most recent checkpoints kept (>= 1; the latest is always kept).
        monitor: metric name ranking checkpoints; a save without it is "last" only.
        mode: ``"min"`` or ``"max"``.
        save_interval_epochs: used by :meth:`should_save` (callers decide).
        drive_backup: also copy every checkpoint (and the manifest) to
            ``drive_backup_path``; pruned checkpoints are removed there too. Backup
            failures are logged, not raised.
        drive_backup_path: the backup directory (any mounted path).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        keep_best_k: int = 3,
        keep_last_n: int = 5,
        monitor: str = "val_loss",
        mode: str = "min",
        save_interval_epochs: int = 1,
        drive_backup: bool = False,
        drive_backup_path: str | os.PathLike[str] | None = None,
    ) -> None:
        errors = []
        if not isinstance(keep_best_k, int) or keep_best_k < 0:
            errors.append(f"keep_best_k must be an int >= 0; got {keep_best_k!r}")
        if not isinstance(keep_last_n, int) or keep_last_n < 1:
            errors.append(
                f"keep_last_n must be an int >= 1 (the latest is kept); got {keep_last_n!r}"
            )
        if not isinstance(monitor, str) or not monitor:
            errors.append(f"monitor must be a metric name; got {monitor!r}")
        if mode not in ("min", "max"):
            errors.append(f"mode must be 'min' or 'max'; got {mode!r}")
        if not isinstance(save_interval_epochs, int) or save_interval_epochs < 1:
            errors.append(f"save_interval_epochs must be an int >= 1; got {save_interval_epochs!r}")
        if drive_backup and not drive_backup_path:
            errors.append(f"drive_backup=True needs drive_backup_path; got {drive_backup_path!r}")
        if (
            drive_backup_path
            and Path(drive_backup_path).resolve() == Path(checkpoint_dir).resolve()
        ):
            errors.append(
                f"drive_backup_path must differ from checkpoint_dir; got {drive_backup_path!r}"
            )
        if errors:
            raise ConfigError(errors)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.keep_best_k = keep_best_k
        self.keep_last_n = keep_last_n
        self.monitor = monitor
        self.mode = mode
        self.save_interval_epochs = save_interval_epochs
        self.drive_backup = bool(drive_backup)
        self.drive_backup_path = Path(drive_backup_path) if drive_backup_path else None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._init_runtime()
        self._clean_leftovers()
        index = _read_index(self.checkpoint_dir)
        self._entries = index.entries
        self._history = index.history
        self._warned_missing = False

    # -- runtime objects (not pickled) ------------------------------------------------

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[CheckpointMetadata]] = []
        self._pending_values: list[float] = []  # monitored values of unfinished async saves

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_lock", "_executor", "_pending", "_pending_values"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._executor = None
        self._pending = []
        self._pending_values = []

    def _clean_leftovers(self) -> None:
        """Remove ``*.tmp-*``/``*.del-*`` leftovers; put back an ``*.old-*`` whose target is gone."""
        for p in self.checkpoint_dir.iterdir():
            if _OLD in p.name:
                target = self.checkpoint_dir / p.name.split(_OLD, 1)[0]
                if target.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.replace(p, target)
            elif _TMP in p.name or _DEL in p.name:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    # -- queries ------------------------------------------------------------------------

    def should_save(self, epoch: int, is_last: bool = False) -> bool:
        """True for the last epoch and every ``save_interval_epochs``-th one.

        ``epoch`` is the number of the epoch just finished, counted from 1 as
        kiln's loop counts (epochs 3, 6, 9, ... for an interval of 3).
        """
        return is_last or epoch % self.save_interval_epochs == 0

    def _best_entry(self) -> dict[str, Any] | None:
        ranked = _rank(self._entries, self.monitor, self.mode)
        return ranked[0] if ranked else None

    def _best_seen(self) -> float | None:
        ranked = _rank(self._history, self.monitor, self.mode)
        return _metric(ranked[0]["metrics"], self.monitor) if ranked else None

    def _as_metadata(self, entry: Mapping[str, Any], best_name: str | None) -> CheckpointMetadata:
        return CheckpointMetadata(
            path=str(self.checkpoint_dir / entry["name"]),
            epoch=int(entry["epoch"]),
            metrics=dict(entry["metrics"]),
            is_best=entry["name"] == best_name,
            timestamp=str(entry["timestamp"]),
            model_size_mb=float(entry.get("model_size_mb", 0.0)),
            optimizer_state_size_mb=float(entry.get("optimizer_state_size_mb", 0.0)),
            step=int(entry.get("step", 0)),
        )

    @property
    def checkpoints(self) -> list[CheckpointMetadata]:
        """Retained checkpoints in save order; ``is_best`` marks the current best."""
        with self._lock:
            best = self._best_entry()
            name = best["name"] if best else None
            return [self._as_metadata(e, name) for e in self._entries]

    def get_best_checkpoint(self) -> str | None:
        """Path of the retained checkpoint with the best ``monitor`` value, or None."""
        with self._lock:
            best = self._best_entry()
            return str(self.checkpoint_dir / best["name"]) if best else None

    def get_latest_checkpoint(self) -> str | None:
        """Path of the most recently saved checkpoint, or None."""
        with self._lock:
            return str(self.checkpoint_dir / self._entries[-1]["name"]) if self._entries else None

    def get_checkpoint_history(self) -> Any:
        """A pandas DataFrame of every save: epoch, step, path, is_best, retained, timestamp, metrics."""
        import pandas as pd

        with self._lock:
            best = self._best_entry()
            best_name = best["name"] if best else None
            retained = {e["name"]: e["timestamp"] for e in self._entries}
            rows = []
            for h in self._history:
                row = {
                    "epoch": h["epoch"],
                    "step": h.get("step", 0),
                    "path": str(self.checkpoint_dir / h["name"]),
                    "is_best": h["name"] == best_name and retained.get(h["name"]) == h["timestamp"],
                    "retained": retained.get(h["name"]) == h["timestamp"],
                    "timestamp": h["timestamp"],
                }
                row.update(h.get("metrics", {}))
                rows.append(row)
        columns = ["epoch", "step", "path", "is_best", "retained", "timestamp"]
        return pd.DataFrame(rows, columns=None if rows else columns)

    # -- saving -------------------------------------------------------------------------

    def save_checkpoint(
        self,
        epoch: int,
        metrics: Mapping[str, Any] | None,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        scaler: Any = None,
        step: int = 0,
        blocking: bool = True,
    ) -> CheckpointMetadata:
        """Save ``epoch_{epoch:04d}`` (replacing one of the same epoch), then prune.

        Always saves; use :meth:`should_save` to honour ``save_interval_epochs``.
        With ``blocking=False`` the state dicts are copied to CPU here and written by
        one background thread; the returned sizes are then tensor byte counts, and
        errors surface from :meth:`wait` (also called by the next blocking save,
        any load, and :meth:`close`).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise CheckpointError(f"epoch must be an int >= 0; got {epoch!r}")
        clean = _clean_metrics(metrics)
        value = _metric(clean, self.monitor)
        if value is None and not self._warned_missing:
            self._warned_missing = True
            logger.warning(
                "checkpoint metrics have no finite %r (got keys %s); such checkpoints are kept "
                "as 'last' only, never 'best'",
                self.monitor,
                sorted(clean),
            )
        model_state = model_state_dict(model)
        train_state = {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": get_rng_state(),
            "epoch": epoch,
            "step": int(step),
        }
        info = {
            "name": f"epoch_{epoch:04d}",
            "epoch": epoch,
            "step": int(step),
            "metrics": clean,
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "user": json.loads(json.dumps(dict(metadata or {}), default=str)),
        }
        if blocking:
            self.wait()
            return self._write(info, model_state, train_state)
        model_state, train_state = _to_cpu(model_state), _to_cpu(train_state)
        with self._lock:
            best = self._best_seen()
            for pending in self._pending_values:
                best = pending if _better(pending, best, self.mode) else best
            is_best = value is not None and _better(value, best, self.mode)
            if value is not None:
                self._pending_values.append(value)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-ckpt")
        self._pending.append(self._executor.submit(self._write, info, model_state, train_state))
        return CheckpointMetadata(
            path=str(self.checkpoint_dir / info["name"]),
            epoch=epoch,
            metrics=clean,
            is_best=is_best,
            timestamp=info["timestamp"],
            model_size_mb=_nbytes(model_state) / _MB,
            optimizer_state_size_mb=_nbytes(train_state) / _MB,
            step=int(step),
            user=info["user"],
        )

    def _write(
        self, info: dict[str, Any], model_state: Any, train_state: Any
    ) -> CheckpointMetadata:
        import kiln

        name = info["name"]
        final = self.checkpoint_dir / name
        tag = uuid.uuid4().hex
        tmp = self.checkpoint_dir / f"{name}{_TMP}{tag}"
        value = _metric(info["metrics"], self.monitor)
        with self._lock:
            is_best = value is not None and _better(value, self._best_seen(), self.mode)
        aside: Path | None = None
        tmp.mkdir()
        try:
            model_bytes = _save_synced(model_state, tmp / MODEL_FILE)
            train_bytes = _save_synced(train_state, tmp / TRAIN_STATE_FILE)
            entry = dict(
                info, model_size_mb=model_bytes / _MB, optimizer_state_size_mb=train_bytes / _MB
            )
            meta = dict(
                entry,
                format=_FORMAT,
                is_best=is_best,
                monitor=self.monitor,
                mode=self.mode,
                kiln_version=kiln.__version__,
                torch_version=torch.__version__,
                files=[MODEL_FILE, TRAIN_STATE_FILE],
            )
            meta.pop("name")
            entry.pop(
                "user"
            )  # user metadata lives in metadata.json only (keeps the manifest small)
            _write_json_synced(meta, tmp / METADATA_FILE)
            _fsync_dir(tmp)
            if final.exists():
                aside = self.checkpoint_dir / f"{name}{_OLD}{tag}"
                os.replace(final, aside)
            os.replace(tmp, final)
            _fsync_dir(self.checkpoint_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if aside is not None and not final.exists():
                os.replace(aside, final)
            raise
        with self._lock:
            entries = [e for e in self._entries if e["name"] != name] + [entry]
            keep = _select_retained(
                entries, self.keep_best_k, self.keep_last_n, self.monitor, self.mode
            )
            dropped = [e["name"] for e in entries if e["name"] not in keep]
            self._entries = [e for e in entries if e["name"] in keep]
            self._history.append(
                {k: entry[k] for k in ("name", "epoch", "step", "metrics", "timestamp")}
            )
            self._write_manifest()
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        for old in dropped:
            _remove_dir(self.checkpoint_dir / old)
        if self.drive_backup:
            self._backup(name, dropped)
        return _metadata_object(final, meta)

    def _write_manifest(self) -> None:
        best = self._best_entry()
        latest = self._entries[-1]["name"] if self._entries else None
        checkpoints = [
            dict(
                e,
                is_best=best is not None and e["name"] == best["name"],
                is_latest=e["name"] == latest,
            )
            for e in self._entries
        ]
        _write_json_atomic(
            {
                "format": _MANIFEST_FORMAT,
                "monitor": self.monitor,
                "mode": self.mode,
                "latest": latest,
                "best": best["name"] if best else None,
                "checkpoints": checkpoints,
                "history": self._history,
            },
            self.checkpoint_dir / MANIFEST_FILE,
        )

    def _backup(self, name: str, dropped: list[str]) -> None:
        assert self.drive_backup_path is not None
        dest = self.drive_backup_path
        try:
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / f"{name}{_TMP}{uuid.uuid4().hex}"
            shutil.copytree(self.checkpoint_dir / name, tmp)
            if (dest / name).exists():
                shutil.rmtree(dest / name)
            os.replace(tmp, dest / name)
            manifest_tmp = dest / f"{MANIFEST_FILE}{_TMP}{uuid.uuid4().hex}"
            shutil.copy2(self.checkpoint_dir / MANIFEST_FILE, manifest_tmp)
            os.replace(manifest_tmp, dest / MANIFEST_FILE)
            for old in dropped:
                shutil.rmtree(dest / old, ignore_errors=True)
        except OSError as exc:
            logger.warning("checkpoint backup of %s to %s failed: %s", name, dest, exc)

    def wait(self) -> None:
        """Block until background saves finish; re-raise the first error among them."""
        pending, self._pending = self._pending, []
        error: BaseException | None = None
        for future in pending:
            try:
                future.result()
            except BaseException as exc:
                error = error or exc
        with self._lock:
            if not self._pending:
                self._pending_values = []
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for background saves and stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loading ------------------------------------------------------------------------

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        *,
        restore_rng: bool = False,
        map_location: Any = "cpu",
        strict: bool = True,
    ) -> CheckpointMetadata:
        """Load a checkpoint (a path, a name in this dir, ``"latest"`` or ``"best"``) into objects.

        Raises CheckpointError when the checkpoint, or a state asked for, is missing.
        """
        self.wait()
        ckpt = resolve_checkpoint(path, self.checkpoint_dir)
        model_state, train_state, meta = load_checkpoint_state(ckpt, map_location)
        if model is not None:
            unwrap_model(model).load_state_dict(_strip_prefixes(model_state), strict=strict)
        for label, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if obj is None:
                continue
            state = train_state.get(label)
            if state is None:
                raise CheckpointError(f"checkpoint {str(ckpt)!r} has no {label} state to load")
            obj.load_state_dict(state)
        if restore_rng:
            if "rng" not in train_state:
                raise CheckpointError(f"checkpoint {str(ckpt)!r} has no RNG state")
            set_rng_state(train_state["rng"])
        return _metadata_object(ckpt, meta)

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.checkpoint_dir)!r}, keep_best_k={self.keep_best_k}, "
            f"keep_last_n={self.keep_last_n}, monitor={self.monitor!r}, mode={self.mode!r})"
        )
