"""Training when the disk fills up: the run stops with a clear message, or with
``on_checkpoint_error="warn"`` carries on without that checkpoint; either way no part of
the failed save remains and the earlier checkpoints load.

In-process runs (``num_workers=0``), so a monkeypatched write reaches the worker.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from drill_record import record

import kiln._fs as fs
import kiln.engine.checkpoint as ckpt_mod
from kiln import ConfigError, Trainer, TrainingConfig
from kiln._fs import is_partial
from kiln.engine.checkpoint import CheckpointManager, load_checkpoint_state, resolve_checkpoint
from kiln.errors import CheckpointError

pytestmark = pytest.mark.integration


def _trainer(tmp_path: Path, **kw) -> Trainer:
    base = dict(
        epochs=4,
        batch_size=16,
        learning_rate=1e-2,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        random_seed=7,
        tracking=False,
        keep_last_n=5,
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    return Trainer(
        training_config=TrainingConfig(**{**base, **kw}),
        storage_path=tmp_path / "runs",
        db_path=tmp_path / "kiln.db",
        artifacts_dir=tmp_path / "artifacts",
    )


def _disk_full_at(monkeypatch, name: str, calls: list[str]) -> None:
    """Every file write into checkpoint ``name`` fails with ENOSPC after a few bytes."""
    real = ckpt_mod.write_synced

    def write_synced(path, write):
        if Path(path).parent.name.startswith(name):
            with open(path, "wb") as handle:  # a first chunk lands, then the disk is full
                handle.write(b"\0" * 64)
            calls.append(str(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write)

    monkeypatch.setattr(ckpt_mod, "write_synced", write_synced)


def _checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _all_load(root: Path, names: list[str]) -> None:
    for name in names:
        if name.startswith("epoch_"):
            _, _, meta = load_checkpoint_state(root / name)
            assert f"epoch_{meta['epoch']:04d}" == name


def test_disk_full_fails_the_run_with_path_and_bytes(tmp_path, monkeypatch):
    calls: list[str] = []
    _disk_full_at(monkeypatch, "epoch_0003", calls)
    with pytest.raises(Exception) as info:
        _trainer(tmp_path).train("iris")
    message = str(info.value)
    assert calls, "the injected failure never ran"
    root = tmp_path / "ckpt"
    assert str(root / "epoch_0003") in message, message
    needed = re.search(r"needs about (\d+) bytes", message)
    assert needed and int(needed.group(1)) > 0, message
    assert "No space left on device" in message and "on_checkpoint_error='warn'" in message
    names = _checkpoints(root)
    assert names == ["epoch_0001", "epoch_0002", "manifest.json"], names
    _all_load(root, names)
    assert resolve_checkpoint("latest", root).name == "epoch_0002"
    record("faults_disk_full", {"bytes_needed_in_message": int(needed.group(1))})


def test_disk_full_with_warn_keeps_training(tmp_path, monkeypatch, caplog):
    calls: list[str] = []
    _disk_full_at(monkeypatch, "epoch_0003", calls)
    with caplog.at_level(logging.WARNING, logger="kiln.engine.checkpoint"):
        results = _trainer(tmp_path, on_checkpoint_error="warn").train("iris")
    assert calls
    assert [row["epoch"] for row in results["history"]] == [1, 2, 3, 4]
    noted = {row["epoch"]: row.get("checkpoint_error") for row in results["history"]}
    assert noted[1] is None and noted[2] is None and noted[4] is None
    assert str(tmp_path / "ckpt" / "epoch_0003") in noted[3]
    assert any("epoch_0003" in r.getMessage() for r in caplog.records)
    root = tmp_path / "ckpt"
    names = _checkpoints(root)
    assert names == ["epoch_0001", "epoch_0002", "epoch_0004", "manifest.json"], names
    _all_load(root, names)
    assert resolve_checkpoint("latest", root).name == "epoch_0004"


def test_manifest_write_failing_undoes_the_save(tmp_path, monkeypatch):
    """The disk fills up at the manifest, after the rename: the new checkpoint is taken back."""
    root = tmp_path / "ckpt"
    model = torch.nn.Linear(3, 2)
    with CheckpointManager(root, keep_last_n=5) as manager:
        manager.save_checkpoint(1, {"val_loss": 0.5}, model)

        def full(path, write):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(ckpt_mod, "write_json_atomic", lambda p, d, **k: full(p, None))
        with pytest.raises(CheckpointError, match="epoch_0002"):
            manager.save_checkpoint(2, {"val_loss": 0.4}, model)
        monkeypatch.setattr(ckpt_mod, "write_json_atomic", fs.write_json_atomic)
        assert [c.epoch for c in manager.checkpoints] == [1]
        assert not [n for n in _checkpoints(root) if is_partial(n)]
        assert _checkpoints(root) == ["epoch_0001", "manifest.json"]
        manager.save_checkpoint(3, {"val_loss": 0.3}, model)
    assert [c.epoch for c in CheckpointManager(root, keep_last_n=5).checkpoints] == [1, 3]


def test_on_checkpoint_error_is_validated():
    with pytest.raises(ConfigError, match=r"on_checkpoint_error='ignore' must be 'raise'"):
        TrainingConfig(on_checkpoint_error="ignore").validate()
    with pytest.raises(ConfigError, match="on_error must be 'raise' or 'warn'"):
        CheckpointManager("unused", on_error="skip")
