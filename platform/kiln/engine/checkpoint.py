"""Writing checkpoints: crash-ordered saves on local disk, with best-k / last-n retention.

Layout of ``checkpoint_dir``::

    manifest.json            index: retained checkpoints, metrics, best/latest, save history
    epoch_0003/              one directory per checkpoint, named by epoch number
    epoch_0004_step_0000130/ a checkpoint taken inside epoch 4, at global step 130
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
next opens the directory. Loading lives in :mod:`kiln.engine.checkpoint_reader`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kiln._fs import (
    DEL_MARK,
    OLD_MARK,
    TMP_MARK,
    publish_dir,
    remove_dir,
    write_atomic,
    write_json_atomic,
    write_json_synced,
    write_synced,
)
from kiln.config.modes import MetricMode
from kiln.engine.checkpoint_reader import (
    MANIFEST_FILE,
    METADATA_FILE,
    MODEL_FILE,
    SHARDS_DIR,
    TRAIN_STATE_FILE,
    TRAINABLE_ONLY_ATTR,
    CheckpointMetadata,
    CheckpointState,
    _metadata_object,
    _metric,
    _rank,
    _read_index,
    is_sharded_checkpoint,
    load_checkpoint_state,
    model_state_dict,
    read_metadata,
    resolve_checkpoint,
    saves_trainable_only,
    strip_prefixes,
    unwrap_model,
)
from kiln.engine.seed import get_rng_state, set_rng_state
from kiln.errors import CheckpointError, CheckpointWriteError, ConfigError

# The reader's names are re-exported: ``from kiln.engine.checkpoint import ...`` keeps working.
__all__ = [
    "CheckpointMetadata",
    "CheckpointManager",
    "CheckpointState",
    "load_checkpoint_state",
    "read_metadata",
    "resolve_checkpoint",
    "unwrap_model",
    "TRAINABLE_ONLY_ATTR",
    "model_state_dict",
    "saves_trainable_only",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "TRAIN_STATE_FILE",
    "METADATA_FILE",
]

logger = logging.getLogger(__name__)

_FORMAT = "kiln.checkpoint/1"
_MANIFEST_FORMAT = "kiln.checkpoints/1"
_MB = float(2**20)


# ----------------------------------------------------------------------------- state dicts


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


def _better(a: float, b: float | None, mode: str) -> bool:
    return MetricMode(mode).better(a, b)


# ----------------------------------------------------------------------------- index


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
        on_error: a save that cannot be written (disk full, say): ``"raise"`` a
            CheckpointError naming the path and the bytes it needs, or ``"warn"``:
            log it, note it in :attr:`failed_saves`, and carry on without it. Either
            way nothing of that save remains and earlier checkpoints are untouched.
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
        on_error: str = "raise",
    ) -> None:
        errors = []
        if on_error not in ("raise", "warn"):
            errors.append(f"on_error must be 'raise' or 'warn'; got {on_error!r}")
        if not isinstance(keep_best_k, int) or keep_best_k < 0:
            errors.append(f"keep_best_k must be an int >= 0; got {keep_best_k!r}")
        if not isinstance(keep_last_n, int) or keep_last_n < 1:
            errors.append(
                f"keep_last_n must be an int >= 1 (the latest is kept); got {keep_last_n!r}"
            )
        if not isinstance(monitor, str) or not monitor:
            errors.append(f"monitor must be a metric name; got {monitor!r}")
        if mode not in tuple(MetricMode):
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
        self.on_error = on_error
        self.failed_saves: list[dict[str, Any]] = []  # saves skipped with on_error="warn"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self._init_runtime()
        self._clean_leftovers()
        index = _read_index(self.checkpoint_dir)
        for name in index.pruned:  # a crash between the manifest and the prune
            remove_dir(self.checkpoint_dir / name)
        self._entries = index.entries
        self._history = index.history
        self._warned_missing = False

    # -- runtime objects (not pickled) ------------------------------------------------

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[CheckpointMetadata | None]] = []
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
            if OLD_MARK in p.name:
                target = self.checkpoint_dir / p.name.split(OLD_MARK, 1)[0]
                if target.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.replace(p, target)
            elif TMP_MARK in p.name or DEL_MARK in p.name:
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

    def stage(self, epoch: int) -> Path:
        """An empty temporary directory for ``epoch``'s checkpoint, for files that other
        processes write into it first (each rank's shards of a sharded model); hand it to
        :meth:`save_checkpoint` as ``staged``. Left unpublished, it is removed like any
        ``*.tmp-*`` leftover."""
        tmp = self._tmp_dir(f"epoch_{epoch:04d}")
        tmp.mkdir()
        return tmp

    def _tmp_dir(self, name: str) -> Path:
        return self.checkpoint_dir / f"{name}{TMP_MARK}{uuid.uuid4().hex}"

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
        model_state: Mapping[str, Any] | None = None,
        staged: Path | None = None,
        staged_files: Mapping[str, int] | None = None,
        within_epoch: bool = False,
        extra_state: Mapping[str, Any] | None = None,
    ) -> CheckpointMetadata | None:
        """Save ``epoch_{epoch:04d}`` (replacing one of the same epoch), then prune.

        ``within_epoch``: a checkpoint taken inside epoch ``epoch`` at global ``step``,
        saved as ``epoch_{epoch:04d}_step_{step:07d}``. ``extra_state`` (tensors
        allowed) goes into ``train_state.pt`` beside the optimizer state.

        Always saves; use :meth:`should_save` to honour ``save_interval_epochs``.
        With ``blocking=False`` the state dicts are copied to CPU here and written by
        one background thread; the returned sizes are then tensor byte counts, and
        errors surface from :meth:`wait` (also called by the next save, any load,
        and :meth:`close`). A blocking save that failed with
        ``on_error="warn"`` returns None. ``model_state`` stands in for ``model``'s own
        state dict: a CPU snapshot the caller no longer changes (a sharded model's,
        gathered on this rank), written as given; ``staged`` is a directory from
        :meth:`stage` whose files the checkpoint keeps. ``staged_files`` lists them
        (path relative to the checkpoint -> bytes), with any that other nodes upload
        into the checkpoint's folder in storage; default: the files under ``staged``.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise CheckpointError(f"epoch must be an int >= 0; got {epoch!r}")
        clean = _clean_metrics(metrics)
        value = _metric(clean, self.monitor)
        if value is None and not self._warned_missing and not within_epoch:
            self._warned_missing = True
            logger.warning(
                "checkpoint metrics have no finite %r (got keys %s); such checkpoints are kept "
                "as 'last' only, never 'best'",
                self.monitor,
                sorted(clean),
            )
        snapshot = model_state is not None  # already a CPU copy: no second one
        model_state = model_state_dict(model) if model_state is None else dict(model_state)
        train_state = {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": get_rng_state(),
            "epoch": epoch,
            "step": int(step),
            **dict(extra_state or {}),
        }
        name = f"epoch_{epoch:04d}" + (f"_step_{int(step):07d}" if within_epoch else "")
        info = {
            "name": name,
            "epoch": epoch,
            "step": int(step),
            "metrics": clean,
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "user": json.loads(json.dumps(dict(metadata or {}), default=str)),
            "staged_files": None if staged_files is None else dict(staged_files),
        }
        self.wait()  # the previous save (a whole epoch ago) is done, or its error stops the run
        if blocking:
            return self._write(info, model_state, train_state, staged)
        return self._save_in_background(
            info,
            model_state if snapshot else _to_cpu(model_state),
            _to_cpu(train_state),
            value,
            staged,
        )

    def _save_in_background(
        self,
        info: dict[str, Any],
        model_state: Any,
        train_state: Any,
        value: float | None,
        staged: Path | None = None,
    ) -> CheckpointMetadata:
        """Queue the write of CPU snapshots on the writer thread; describe it now."""
        with self._lock:
            best = self._best_seen()
            for pending in self._pending_values:
                best = pending if _better(pending, best, self.mode) else best
            is_best = value is not None and _better(value, best, self.mode)
            if value is not None:
                self._pending_values.append(value)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-ckpt")
        self._pending.append(
            self._executor.submit(self._write, info, model_state, train_state, staged)
        )
        return CheckpointMetadata(
            path=str(self.checkpoint_dir / info["name"]),
            epoch=info["epoch"],
            metrics=info["metrics"],
            is_best=is_best,
            timestamp=info["timestamp"],
            model_size_mb=_nbytes(model_state) / _MB,
            optimizer_state_size_mb=_nbytes(train_state) / _MB,
            step=info["step"],
            user=info["user"],
        )

    def _write(
        self, info: dict[str, Any], model_state: Any, train_state: Any, staged: Path | None = None
    ) -> CheckpointMetadata | None:
        try:
            return self._write_files(info, model_state, train_state, staged)
        except OSError as exc:
            needed = _nbytes(model_state) + _nbytes(train_state)
            try:
                free: int | str = shutil.disk_usage(self.checkpoint_dir).free
            except OSError:
                free = "unknown"
            message = (
                f"checkpoint {info['name']!r} (epoch {info['epoch']}) could not be written to "
                f"{str(self.checkpoint_dir / info['name'])!r}: {exc.strerror or exc}; it needs about {needed} bytes "
                f"({needed / _MB:.1f} MiB of tensors) and {free} bytes are free there. Nothing "
                "of it was kept and earlier checkpoints are intact; free some space or lower "
                "keep_best_k/keep_last_n, or set on_checkpoint_error='warn' to keep training "
                "without it"
            )
            if self.on_error == "raise":
                raise CheckpointWriteError(message) from exc
            logger.warning("%s", message)
            with self._lock:
                self.failed_saves.append(
                    {"epoch": info["epoch"], "name": info["name"], "error": message}
                )
            return None

    def _write_files(
        self, info: dict[str, Any], model_state: Any, train_state: Any, staged: Path | None = None
    ) -> CheckpointMetadata:
        import kiln

        name = info["name"]
        final = self.checkpoint_dir / name
        tmp = staged if staged is not None else self._tmp_dir(name)
        value = _metric(info["metrics"], self.monitor)
        with self._lock:
            is_best = value is not None and _better(value, self._best_seen(), self.mode)
        staged_files = info.pop("staged_files", None)
        if staged is not None and staged_files is None:
            staged_files = {
                str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()
            }
        staged_files = staged_files or {}
        tmp.mkdir(exist_ok=staged is not None)
        try:
            model_bytes = write_synced(tmp / MODEL_FILE, lambda f: torch.save(model_state, f))
            train_bytes = write_synced(tmp / TRAIN_STATE_FILE, lambda f: torch.save(train_state, f))
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
                files=[MODEL_FILE, TRAIN_STATE_FILE, *sorted(staged_files)],
                file_bytes={MODEL_FILE: model_bytes, TRAIN_STATE_FILE: train_bytes, **staged_files},
            )
            meta.pop("name")
            entry.pop(
                "user"
            )  # user metadata lives in metadata.json only (keeps the manifest small)
            write_json_synced(tmp / METADATA_FILE, meta)
            publish_dir(tmp, final)  # an older save of this epoch is replaced, crash-ordered
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._lock:
            entries = [e for e in self._entries if e["name"] != name] + [entry]
            keep = _select_retained(
                entries, self.keep_best_k, self.keep_last_n, self.monitor, self.mode
            )
            dropped = [e["name"] for e in entries if e["name"] not in keep]
            before = self._entries, list(self._history)
            self._entries = [e for e in entries if e["name"] in keep]
            self._history.append(
                {k: entry[k] for k in ("name", "epoch", "step", "metrics", "timestamp")}
            )
            try:
                self._write_manifest()
            except BaseException:  # e.g. the disk filled up: the save did not happen
                self._entries, self._history = before
                remove_dir(final)
                raise
        for old in dropped:
            remove_dir(self.checkpoint_dir / old)
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
        write_json_atomic(
            self.checkpoint_dir / MANIFEST_FILE,
            {
                "format": _MANIFEST_FORMAT,
                "monitor": self.monitor,
                "mode": self.mode,
                "latest": latest,
                "best": best["name"] if best else None,
                "checkpoints": checkpoints,
                "history": self._history,
            },
        )

    def _backup(self, name: str, dropped: list[str]) -> None:
        assert self.drive_backup_path is not None
        dest = self.drive_backup_path
        try:
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / f"{name}{TMP_MARK}{uuid.uuid4().hex}"
            shutil.copytree(self.checkpoint_dir / name, tmp)
            publish_dir(tmp, dest / name)
            manifest = (self.checkpoint_dir / MANIFEST_FILE).read_bytes()
            write_atomic(dest / MANIFEST_FILE, lambda f: f.write(manifest))
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
            unwrap_model(model).load_state_dict(strip_prefixes(model_state), strict=strict)
        for label, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if obj is None:
                continue
            state = train_state.get(label)
            if state is None and label == "optimizer" and is_sharded_checkpoint(ckpt):
                raise CheckpointError(
                    f"checkpoint {str(ckpt)!r} is sharded (strategy='fsdp'): its optimizer "
                    f"state is in {SHARDS_DIR}/, one shard per rank; resume the run with "
                    "resume_from (kiln.engine.sharded_checkpoint.load_sharded reads it)"
                )
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
