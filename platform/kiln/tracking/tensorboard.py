"""kiln's own TensorBoard event files, one folder per run.

The driver writes them: every numeric metric of each epoch under its kiln name
(``train_loss``, ``val_accuracy``, custom metrics, ...) at step = the epoch, and the
per-step rows (``log_every_n_steps``) as ``step/loss`` and ``step/lr`` at step = the
global step. During a run, :class:`LiveTensorBoard` (a progress sink: rank 0's epoch
events reach the driver as they happen, from worker actors too) adds each epoch's
scalars as it ends and flushes, so TensorBoard shows a run while it trains; once the
history is back it adds the per-step rows and any epoch it did not see (a resumed
run's earlier epochs), each scalar once. The folder is
``<runs>/<run_name>/tensorboard``, so::

    tensorboard --logdir $KILN_HOME/runs

shows every run's curves. Files are written with ``tensorboardX``; :func:`read_scalars`
reads them back (records framed as TFRecords, each an ``Event`` protobuf).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.tracking.recorder import numeric_metrics

logger = logging.getLogger(__name__)

__all__ = ["LiveTensorBoard", "write_history", "read_scalars", "STEP_TAGS"]

#: Tags of the per-step rows, by the key of a ``steps`` row they come from.
STEP_TAGS = {"loss": "step/loss", "lr": "step/lr"}


def write_history(logdir: str | Path, history: list[dict[str, Any]]) -> Path | None:
    """Write a run's per-epoch and per-step scalars to an event file in ``logdir``.

    Returns the folder, or None when the history is empty (no file is written).
    """
    if not history:
        return None
    writer = _writer(Path(logdir))
    try:
        _write_rows(writer, history, written=set())
    finally:
        writer.close()  # flushes the file
    return Path(logdir)


class LiveTensorBoard:
    """One run's event file, written as the run goes (see the module docstring).

    Register it with :func:`kiln.engine.progress.add_sink` for the run; then
    :meth:`finish` with the run's history (or :meth:`close` when the run failed: what
    was written stays). Events of Tune trials (tagged ``trial``) are not this run's.
    """

    def __init__(self, logdir: str | Path) -> None:
        self.logdir = Path(logdir)
        self._writer: _EventFile | None = None
        self._written: set[tuple[int, str]] = set()  # (epoch, tag) written live
        self._lock = threading.Lock()
        self.error: str | None = None  # why live writing stopped

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("kind") != "epoch" or event.get("trial") is not None:
            return
        epoch = int(event["epoch"])
        with self._lock:
            if self.error is not None:
                return
            try:
                if self._writer is None:
                    self._writer = _writer(self.logdir)
                now = time.time()
                for name, value in numeric_metrics(event.get("metrics") or {}).items():
                    if (epoch, name) not in self._written:
                        self._writer.add_scalar(name, value, epoch, now)
                        self._written.add((epoch, name))
                self._writer.flush()  # TensorBoard shows it now
            except OSError as exc:  # e.g. a full disk: the run goes on; finish() tries again
                self.error = f"{type(exc).__name__}: {exc}"
                logger.warning("TensorBoard: live writing stopped (%s)", self.error)

    def finish(self, history: list[dict[str, Any]]) -> Path | None:
        """Add the per-step rows and every epoch scalar not written live (a resumed run's
        earlier epochs, numbers added after the epoch's event); close. The folder, or
        None when nothing at all was written."""
        with self._lock:
            if self._writer is None and not history:
                return None
            writer = self._writer or _writer(self.logdir)
            self._writer = None
            try:
                _write_rows(writer, history, written=self._written)
            finally:
                writer.close()
        return self.logdir

    def close(self) -> None:
        """Close the file (a failed run keeps the epochs it wrote)."""
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None


class _EventFile:
    """One event file, written in the caller's thread with tensorboardX's record writer
    (SummaryWriter queues events for a background thread, and its flush() does not wait
    for that queue: here a flush means the scalars are on disk)."""

    def __init__(self, logdir: Path) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        logdir.mkdir(parents=True, exist_ok=True)
        self._events = EventsWriter(str(logdir / "events"))  # events.out.tfevents.<t>.<host>

    def add_scalar(self, tag: str, value: float, step: int, walltime: float | None) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        summary = scalar(tag, float(value))
        wall = time.time() if walltime is None else float(walltime)
        self._events.write_event(Event(wall_time=wall, step=int(step), summary=summary))

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


def _writer(logdir: Path) -> _EventFile:
    return _EventFile(logdir)


def _write_rows(writer: Any, history: list[dict[str, Any]], written: set[tuple[int, str]]) -> None:
    """Each row's epoch scalars (but those ``written`` already) and its steps."""
    for row in history:
        epoch = int(row["epoch"])
        walltime = row.get("timestamp")
        for name, value in numeric_metrics(row).items():
            if (epoch, name) not in written:
                writer.add_scalar(name, value, epoch, walltime)
        for step in row.get("steps", []):
            for key, tag in STEP_TAGS.items():
                if key in step:
                    writer.add_scalar(tag, float(step[key]), int(step["step"]), walltime)


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``logdir``: ``tag -> [(step, value), ...]``."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        for record in _records(path.read_bytes(), path):
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((int(event.step), value.simple_value))
    return out


def _records(data: bytes, path: Path) -> Iterator[bytes]:
    """The payloads of a TFRecord file (length, its CRC, payload, its CRC), CRCs checked."""
    from tensorboardX.record_writer import masked_crc32c

    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise ValueError(f"{str(path)!r}: truncated record header at byte {offset}")
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        payload = data[offset + 12 : offset + 12 + length]
        end = offset + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(data):
            raise ValueError(f"{str(path)!r}: corrupt record at byte {offset}")
        (payload_crc,) = struct.unpack("<I", data[end - 4 : end])
        if payload_crc != masked_crc32c(payload):
            raise ValueError(f"{str(path)!r}: corrupt record payload at byte {offset}")
        yield payload
        offset = end
