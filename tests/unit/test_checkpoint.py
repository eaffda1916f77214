"""CheckpointManager: retention, round trips, background saves, crash safety, manifest reload."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kiln.engine.checkpoint as ckpt_mod
from kiln.engine.checkpoint import (
    CheckpointManager,
    load_checkpoint_state,
    resolve_checkpoint,
    unwrap_model,
)
from kiln.errors import CheckpointError, ConfigError

LOSSES = [0.9, 0.5, 0.7, 0.4, 0.8, 0.6, 0.95, 0.85]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _trained(seed: int = 0):
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def _dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_retention_best_k_and_last_n(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_best_k=2, keep_last_n=2)
    model = _model()
    for epoch, loss in enumerate(LOSSES):
        meta = mgr.save_checkpoint(epoch, {"val_loss": loss}, model)
        assert Path(mgr.get_latest_checkpoint()).name == f"epoch_{epoch:04d}"
        assert Path(meta.path).is_dir()
    # best two: epoch 3 (0.4), epoch 1 (0.5); last two: 6, 7
    assert _dirs(tmp_path) == ["epoch_0001", "epoch_0003", "epoch_0006", "epoch_0007"]
    assert Path(mgr.get_best_checkpoint()).name == "epoch_0003"
    assert [c.epoch for c in mgr.checkpoints] == [1, 3, 6, 7]
    assert [c.is_best for c in mgr.checkpoints] == [False, True, False, False]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["latest"] == "epoch_0007" and manifest["best"] == "epoch_0003"
    assert [c["name"] for c in manifest["checkpoints"]] == _dirs(tmp_path)


def test_retention_mode_max_and_latest_always_kept(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_best_k=1, keep_last_n=1, monitor="acc", mode="max")
    model = _model()
    for epoch, acc in enumerate([0.5, 0.9, 0.6, 0.1]):
        mgr.save_checkpoint(epoch, {"acc": acc}, model)
    assert _dirs(tmp_path) == ["epoch_0001", "epoch_0003"]


def test_is_best_flag_on_save(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_best_k=0, keep_last_n=1)
    model = _model()
    flags = [mgr.save_checkpoint(e, {"val_loss": v}, model).is_best for e, v in enumerate(LOSSES)]
    assert flags == [True, True, False, True, False, False, False, False]
    assert _dirs(tmp_path) == ["epoch_0007"]  # best pruned because keep_best_k=0


def test_round_trip_model_optimizer_scheduler_scaler(tmp_path):
    model, opt, sched = _trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mgr = CheckpointManager(tmp_path)
    saved = mgr.save_checkpoint(
        2, {"val_loss": 0.3}, model, opt, sched, {"note": "x"}, scaler=scaler, step=30
    )
    assert saved.step == 30 and saved.user == {"note": "x"} and saved.model_size_mb > 0

    model2, opt2, sched2 = _trained(seed=1)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    loaded = mgr.load_checkpoint("latest", model2, opt2, sched2, scaler2)
    assert loaded.epoch == 2 and loaded.step == 30 and loaded.metrics == {"val_loss": 0.3}
    assert _same_state(model.state_dict(), model2.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert scaler2.get_scale() == 1024.0
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        assert _same_state(s1["state"][k], s2["state"][k])


def test_restore_rng(tmp_path):
    mgr = CheckpointManager(tmp_path)
    torch.manual_seed(11)
    mgr.save_checkpoint(0, {"val_loss": 1.0}, _model())
    expected = torch.rand(4)
    torch.rand(100)  # move the generator on
    mgr.load_checkpoint("latest", None, restore_rng=True)
    assert torch.equal(torch.rand(4), expected)


def test_weights_only_files_and_metadata(tmp_path):
    model, opt, sched = _trained()
    CheckpointManager(tmp_path).save_checkpoint(0, {"val_loss": 0.5}, model, opt, sched)
    ckpt = tmp_path / "epoch_0000"
    assert sorted(p.name for p in ckpt.iterdir()) == ["metadata.json", "model.pt", "train_state.pt"]
    torch.load(ckpt / "train_state.pt", weights_only=True)  # must not raise
    model_state, train_state, meta = load_checkpoint_state(ckpt)
    assert load_checkpoint_state(ckpt).metadata == meta
    assert _same_state(model_state, model.state_dict())
    assert set(train_state) >= {"optimizer", "scheduler", "scaler", "rng", "epoch", "step"}
    assert meta["monitor"] == "val_loss" and meta["kiln_version"]


def test_unwraps_dataparallel_and_compile(tmp_path):
    inner = _model()
    wrapped = torch.nn.DataParallel(inner)
    assert unwrap_model(wrapped) is inner
    compiled = torch.compile(inner)  # wrapping only; nothing is compiled until called
    assert unwrap_model(torch.nn.DataParallel(compiled)) is inner
    mgr = CheckpointManager(tmp_path)
    mgr.save_checkpoint(0, {"val_loss": 1.0}, wrapped)
    state, _, _ = load_checkpoint_state(tmp_path / "epoch_0000")
    assert not any(k.startswith("module.") for k in state)
    target = _model(seed=3)
    mgr.load_checkpoint("latest", torch.nn.DataParallel(target))
    assert _same_state(target.state_dict(), inner.state_dict())
    # a state dict saved with prefixes (by another tool) still loads
    prefixed = {f"module._orig_mod.{k}": v for k, v in inner.state_dict().items()}
    torch.save(prefixed, tmp_path / "epoch_0000" / "model.pt")
    other = _model(seed=4)
    mgr.load_checkpoint(tmp_path / "epoch_0000", other)
    assert _same_state(other.state_dict(), inner.state_dict())


def test_background_save_equals_blocking(tmp_path):
    model, opt, sched = _trained()
    blocking = CheckpointManager(tmp_path / "a")
    background = CheckpointManager(tmp_path / "b")
    blocking.save_checkpoint(0, {"val_loss": 0.5}, model, opt, sched)
    meta = background.save_checkpoint(0, {"val_loss": 0.5}, model, opt, sched, blocking=False)
    assert meta.is_best and meta.path.endswith("epoch_0000")
    with torch.no_grad():  # changes after the call must not leak into the snapshot
        for p in model.parameters():
            p.add_(100.0)
    background.wait()
    a = load_checkpoint_state(tmp_path / "a" / "epoch_0000")
    b = load_checkpoint_state(tmp_path / "b" / "epoch_0000")
    assert _same_state(a[0], b[0])
    assert not _same_state(a[0], model.state_dict())
    assert a[1]["scheduler"] == b[1]["scheduler"]
    for k, v in a[1]["optimizer"]["state"].items():
        assert _same_state(v, b[1]["optimizer"]["state"][k])
    background.close()


def test_background_saves_in_order_with_retention(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_best_k=2, keep_last_n=2)
    model = _model()
    flags = [
        mgr.save_checkpoint(e, {"val_loss": v}, model, blocking=False).is_best
        for e, v in enumerate(LOSSES)
    ]
    mgr.close()
    assert flags == [True, True, False, True, False, False, False, False]
    assert _dirs(tmp_path) == ["epoch_0001", "epoch_0003", "epoch_0006", "epoch_0007"]


def test_wait_surfaces_background_error(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    model = _model()
    mgr.save_checkpoint(0, {"val_loss": 1.0}, model)

    def boom(path, write):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "write_synced", boom)
    mgr.save_checkpoint(1, {"val_loss": 0.5}, model, blocking=False)
    with pytest.raises(OSError, match="disk full"):
        mgr.wait()
    mgr.wait()  # the error is reported once
    assert _dirs(tmp_path) == ["epoch_0000"]
    assert Path(mgr.get_latest_checkpoint()).name == "epoch_0000"
    mgr.close()


def test_failed_save_leaves_previous_loadable(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    model = _model()
    mgr.save_checkpoint(0, {"val_loss": 1.0}, model)
    real_save = torch.save
    calls = []

    def partial_then_fail(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # model.pt written, train_state.pt half written
            f.write(b"partial")
            raise OSError("crash while writing")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", partial_then_fail)
    with pytest.raises(OSError, match="crash while writing"):
        mgr.save_checkpoint(1, {"val_loss": 0.1}, _model(seed=5))
    monkeypatch.undo()
    assert _dirs(tmp_path) == ["epoch_0000"]
    fresh = CheckpointManager(tmp_path)
    target = _model(seed=9)
    meta = fresh.load_checkpoint("latest", target)
    assert meta.epoch == 0
    assert _same_state(target.state_dict(), model.state_dict())


def test_process_crash_mid_save_is_ignored_and_cleaned(tmp_path):
    """A real crash (os._exit) just before the rename leaves a tmp dir; nothing loads it."""
    script = textwrap.dedent(
        f"""
        import os, torch
        from kiln.engine.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        mgr.save_checkpoint(0, {{"val_loss": 1.0}}, model)
        real_replace = os.replace
        def crash(src, dst):
            if ".tmp-" in str(src) and "epoch_0001" in str(src):
                os._exit(3)
            return real_replace(src, dst)
        os.replace = crash
        mgr.save_checkpoint(1, {{"val_loss": 0.1}}, model)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    leftovers = [n for n in _dirs(tmp_path) if ".tmp-" in n]
    assert len(leftovers) == 1 and leftovers[0].startswith("epoch_0001")
    assert (tmp_path / leftovers[0] / "metadata.json").exists()  # fully written, never renamed

    assert resolve_checkpoint("latest", tmp_path).name == "epoch_0000"
    assert resolve_checkpoint("best", tmp_path).name == "epoch_0000"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(tmp_path / leftovers[0])
    mgr = CheckpointManager(tmp_path)  # cleans the leftover
    assert _dirs(tmp_path) == ["epoch_0000"]
    meta = mgr.load_checkpoint("latest", torch.nn.Linear(3, 2))
    assert meta.epoch == 0


def test_manifest_write_error_takes_the_save_back(tmp_path, monkeypatch):
    """A manifest write that fails (not a crash: tests/unit/test_checkpoint_crashes.py has
    that) removes the renamed directory, so no unindexed checkpoint is adopted later."""
    mgr = CheckpointManager(tmp_path, keep_last_n=1, keep_best_k=0)
    mgr.save_checkpoint(0, {"val_loss": 1.0}, _model())

    def no_manifest(path, obj):
        raise OSError("manifest write failed")

    monkeypatch.setattr(ckpt_mod, "write_json_atomic", no_manifest)
    with pytest.raises(OSError):
        mgr.save_checkpoint(1, {"val_loss": 0.5}, _model())
    monkeypatch.undo()
    assert _dirs(tmp_path) == ["epoch_0000"]
    reopened = CheckpointManager(tmp_path, keep_last_n=1, keep_best_k=0)
    assert Path(reopened.get_latest_checkpoint()).name == "epoch_0000"
    reopened.save_checkpoint(2, {"val_loss": 0.4}, _model())
    assert _dirs(tmp_path) == ["epoch_0002"]


def test_manifest_reload_continues_retention(tmp_path):
    model = _model()
    first = CheckpointManager(tmp_path, keep_best_k=2, keep_last_n=2)
    for epoch, loss in enumerate(LOSSES[:4]):
        first.save_checkpoint(epoch, {"val_loss": loss}, model)
    second = CheckpointManager(tmp_path, keep_best_k=2, keep_last_n=2)
    assert [c.epoch for c in second.checkpoints] == [c.epoch for c in first.checkpoints]
    assert second.get_best_checkpoint() == first.get_best_checkpoint()
    for epoch, loss in enumerate(LOSSES[4:], start=4):
        second.save_checkpoint(epoch, {"val_loss": loss}, model)
    assert _dirs(tmp_path) == ["epoch_0001", "epoch_0003", "epoch_0006", "epoch_0007"]
    history = second.get_checkpoint_history()
    assert list(history["epoch"]) == list(range(8))
    assert list(history["val_loss"]) == LOSSES
    assert history["is_best"].sum() == 1 and bool(history.loc[3, "is_best"])
    assert list(history["retained"]) == [False, True, False, True, False, False, True, True]
    assert {"epoch", "path", "is_best", "timestamp"} <= set(history.columns)


def test_overwrite_same_epoch(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save_checkpoint(0, {"val_loss": 1.0}, _model(0))
    mgr.save_checkpoint(1, {"val_loss": 0.9}, _model(0))
    replacement = _model(7)
    mgr.save_checkpoint(0, {"val_loss": 0.8}, replacement)  # e.g. resumed from an earlier epoch
    assert _dirs(tmp_path) == ["epoch_0000", "epoch_0001"]
    assert Path(mgr.get_latest_checkpoint()).name == "epoch_0000"
    state, _, meta = load_checkpoint_state(tmp_path / "epoch_0000")
    assert meta["metrics"] == {"val_loss": 0.8}
    assert _same_state(state, replacement.state_dict())


def test_missing_monitor_metric_is_last_only(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_best_k=1, keep_last_n=1)
    model = _model()
    with caplog.at_level(logging.WARNING, logger="kiln.engine.checkpoint"):
        a = mgr.save_checkpoint(0, {"train_loss": 1.0}, model)
        b = mgr.save_checkpoint(1, {"train_loss": 0.5}, model)
        c = mgr.save_checkpoint(2, {"val_loss": float("nan")}, model)
    assert not (a.is_best or b.is_best or c.is_best)
    assert caplog.text.count("no finite 'val_loss'") == 1
    assert mgr.get_best_checkpoint() is None
    assert _dirs(tmp_path) == ["epoch_0002"]
    with pytest.raises(CheckpointError, match="no checkpoint .* has a finite 'val_loss'"):
        mgr.load_checkpoint("best", model)


def test_resolve_and_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no metadata.json.*model.pt"):
        load_checkpoint_state(bare)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint .*empty directory"):
        resolve_checkpoint("latest", empty)
    with pytest.raises(CheckpointError, match="needs a checkpoint directory"):
        resolve_checkpoint("latest")


def test_resolve_run_dir_and_directory_path(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run / "checkpoints")
    model = _model()
    mgr.save_checkpoint(0, {"val_loss": 0.2}, model)
    mgr.save_checkpoint(1, {"val_loss": 0.3}, model)
    assert resolve_checkpoint("latest", run).name == "epoch_0001"
    assert resolve_checkpoint("best", run).name == "epoch_0000"
    assert resolve_checkpoint(run).name == "epoch_0001"
    assert resolve_checkpoint("epoch_0000", run / "checkpoints").name == "epoch_0000"
    assert resolve_checkpoint(run / "checkpoints" / "epoch_0000").name == "epoch_0000"


def test_missing_optimizer_state_raises(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model = _model()
    mgr.save_checkpoint(0, {"val_loss": 1.0}, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        mgr.load_checkpoint("latest", model, opt)


def test_should_save_interval(tmp_path):
    mgr = CheckpointManager(tmp_path, save_interval_epochs=3)
    assert [e for e in range(1, 8) if mgr.should_save(e)] == [3, 6]
    assert mgr.should_save(6, is_last=True)


def test_validation_collects_errors(tmp_path):
    with pytest.raises(ConfigError) as info:
        CheckpointManager(tmp_path, keep_best_k=-1, keep_last_n=0, mode="avg", drive_backup=True)
    errors = info.value.errors
    assert len(errors) == 4
    assert any("mode must be 'min' or 'max'; got 'avg'" in e for e in errors)
    assert any("keep_last_n" in e and "got 0" in e for e in errors)


def test_drive_backup_mirrors_checkpoints(tmp_path):
    backup = tmp_path / "backup"
    mgr = CheckpointManager(
        tmp_path / "ckpt", keep_best_k=1, keep_last_n=1, drive_backup=True, drive_backup_path=backup
    )
    model = _model()
    for epoch, loss in enumerate([0.5, 0.7, 0.9]):
        mgr.save_checkpoint(epoch, {"val_loss": loss}, model)
    assert _dirs(backup) == _dirs(tmp_path / "ckpt") == ["epoch_0000", "epoch_0002"]
    assert (backup / "manifest.json").exists()
    assert resolve_checkpoint("latest", backup).name == "epoch_0002"


def test_manager_pickles(tmp_path):
    import cloudpickle

    mgr = CheckpointManager(tmp_path)
    mgr.save_checkpoint(0, {"val_loss": 1.0}, _model(), blocking=False)
    mgr.wait()
    clone = pickle.loads(cloudpickle.dumps(mgr))
    assert clone.get_latest_checkpoint() == mgr.get_latest_checkpoint()
    clone.save_checkpoint(1, {"val_loss": 0.5}, _model(), blocking=False)
    clone.close()
    mgr.close()
