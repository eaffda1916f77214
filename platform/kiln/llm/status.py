"""TrainingStatusWriter: a JSON status file a UI (or ``kiln llm status``) polls.

Every update replaces the whole file atomically (temp file in the same folder,
fsync, ``os.replace``), so a reader sees the previous status or the new one, never
a torn file. Fields::

    state         starting | loading_model | preparing_data | training | evaluating
                  | saving | completed | failed
    step, total_steps, epoch, loss, eval_loss, learning_rate, tokens_per_s, eta_s,
    started_at, updated_at (ISO 8601, UTC), error (the message when failed)
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError

__all__ = ["TrainingState", "TrainingStatusWriter", "read_status"]


class TrainingState(str, enum.Enum):
    """Lifecycle of a fine-tuning job; ``is_terminal`` for completed and failed."""

    STARTING = "starting"
    LOADING_MODEL = "loading_model"
    PREPARING_DATA = "preparing_data"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SAVING = "saving"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (TrainingState.COMPLETED, TrainingState.FAILED)


_FIELDS = (
    "step",
    "total_steps",
    "epoch",
    "loss",
    "eval_loss",
    "learning_rate",
    "tokens_per_s",
    "eta_s",
    "error",
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON: temp file, fsync, rename, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class TrainingStatusWriter:
    """Writes the status of one job to ``path`` (thread-safe; picklable for Ray workers).

    ``update(state=..., **fields)`` merges fields into the current status and replaces
    the file; the ETA is derived from the steps done, the total and the elapsed time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {
            "state": TrainingState.STARTING.value,
            **{k: None for k in _FIELDS},
            "started_at": None,
            "updated_at": None,
        }
        self._started = time.monotonic()
        self._train_started: tuple[float, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def status(self) -> dict[str, Any]:
        """A copy of the last status written."""
        with self._lock:
            return dict(self._status)

    def update(self, state: TrainingState | str | None = None, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` (and a new ``state``) into the status and write it."""
        unknown = sorted(set(fields) - set(_FIELDS))
        if unknown:
            raise ConfigError(
                f"status fields {unknown!r} are unknown; allowed: {', '.join(_FIELDS)}"
            )
        with self._lock:
            s = self._status
            if state is not None:
                s["state"] = TrainingState(state).value
            s.update(fields)
            if s["started_at"] is None:
                s["started_at"] = _now()
            self._update_eta(s)
            s["updated_at"] = _now()
            snapshot = dict(s)
            write_json_atomic(self.path, snapshot)
        return snapshot

    def _update_eta(self, s: dict[str, Any]) -> None:
        step, total = s.get("step"), s.get("total_steps")
        if s["state"] != TrainingState.TRAINING.value or not step or not total:
            if s["state"] in (TrainingState.COMPLETED.value, TrainingState.FAILED.value):
                s["eta_s"] = 0.0 if s["state"] == TrainingState.COMPLETED.value else None
            return
        now = time.monotonic()
        if self._train_started is None:
            self._train_started = (now, step)
            return
        t0, step0 = self._train_started
        if step > step0:
            s["eta_s"] = round((now - t0) / (step - step0) * max(0, total - step), 2)

    def fail(self, error: str) -> dict[str, Any]:
        """Mark the job failed with ``error``."""
        return self.update(TrainingState.FAILED, error=error)


def read_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The status at ``path`` (raises FileNotFoundError, or ConfigError for a non-status file)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"status file {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict) or "state" not in data:
        raise ConfigError(f"status file {str(path)!r} has no 'state'; is it a kiln status file?")
    return data
