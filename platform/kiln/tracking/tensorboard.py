"""kiln's own TensorBoard event files, one folder per run.

The driver writes them once the run's history is back (as it does for W&B and
MLflow): every numeric metric of each epoch under its kiln name (``train_loss``,
``val_accuracy``, custom metrics, ...) at step = the epoch, and the per-step rows
(``log_every_n_steps``) as ``step/loss`` and ``step/lr`` at step = the global step.
Each scalar carries the epoch's wall time. The folder is
``<runs>/<run_name>/tensorboard``, so::

    tensorboard --logdir $KILN_HOME/runs

shows every run's curves. Files are written with ``tensorboardX``; :func:`read_scalars`
reads them back (records framed as TFRecords, each an ``Event`` protobuf).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.tracking.recorder import numeric_metrics

__all__ = ["write_history", "read_scalars", "STEP_TAGS"]

#: Tags of the per-step rows, by the key of a ``steps`` row they come from.
STEP_TAGS = {"loss": "step/loss", "lr": "step/lr"}


def write_history(logdir: str | Path, history: list[dict[str, Any]]) -> Path | None:
    """Write a run's per-epoch and per-step scalars to an event file in ``logdir``.

    Returns the folder, or None when the history is empty (no file is written).
    """
    if not history:
        return None
    from tensorboardX import SummaryWriter

    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(logdir=str(logdir), flush_secs=3600)
    try:
        for row in history:
            epoch = int(row["epoch"])
            walltime = row.get("timestamp")
            for name, value in numeric_metrics(row).items():
                writer.add_scalar(name, value, global_step=epoch, walltime=walltime)
            for step in row.get("steps", []):
                for key, tag in STEP_TAGS.items():
                    if key in step:
                        writer.add_scalar(
                            tag, float(step[key]), global_step=int(step["step"]), walltime=walltime
                        )
    finally:
        writer.close()  # flushes the file
    return logdir


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
